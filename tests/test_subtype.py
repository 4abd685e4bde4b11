"""The shipped 4-class head (`cellnet_standardised_subtype`: Benign / Early pre-B / Pre-B / Pro-B, the
default's recipe trained on the default's grouped split): it is trained the way the default is, loads as
the agent loads a model and sorts the grouped test split's subtypes far above chance (0.25 balanced
accuracy for four classes), Early pre-B and Benign included."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, recall_score

from model import data, ood
from model.classifier import DEFAULT_ARTIFACT, Classifier, read_card
from model.preprocess import jpeg_quality, preprocess
from model.trust_report import assess_all

FOLDER = DEFAULT_ARTIFACT.parent.parent / "cellnet_standardised_subtype"
# Measured (int8, seed 42, grouped test split): balanced accuracy 0.975, Benign recall 0.940 (79/84),
# Early pre-B 0.967 (145/150). The floors leave about five images per class.
FLOOR = 0.93
RECALL_FLOORS = {"Benign": 0.88, "Early": 0.93}
MAX_BCCD_FIELDS_ANSWERED = 30  # measured 27 of 364 (96 before the joint rule)
# Of 372 BCCD white-cell crops it answers 2 (22 before the joint rule): BloodImage_00383_wbc0 Negative and
# BloodImage_00301_wbc0 Positive (P(ALL) 0.98), a false Positive on normal blood that this test holds from growing.
MAX_BCCD_CROPS_ANSWERED, MAX_BCCD_CROPS_POSITIVE = 2, 1


def test_subtype_head_is_trained_the_way_the_default_is():
    card, default = read_card(FOLDER), read_card(DEFAULT_ARTIFACT.parent)
    assert card["recipe"] == default["recipe"] and card["architecture"] == default["architecture"]
    assert card["training"]["recipe"] == default["training"]["recipe"]
    assert card["data"]["splits"] == default["data"]["splits"]


def test_subtype_head_sorts_the_grouped_test_split_far_above_chance(data_root):
    card = read_card(FOLDER)
    dataset, samples = data.load_dataset(data_root)
    test = data.card_splits(card, dataset, samples)["test"]
    assert card["classes"] == list(data.ARIA_CLASSES) and "grouped" in card["data"]["splits"]["test"]["file"]
    images = data.load_images(data_root, test, card["input_size"])
    clf = Classifier.load(FOLDER / card["artifacts"]["int8"]["file"])
    probabilities = np.concatenate([clf.classify(images[i:i + 64]) for i in range(0, len(images), 64)])
    truth = np.array([card["classes"].index(s.subtype) for s in test])
    score = balanced_accuracy_score(truth, probabilities.argmax(1))
    assert score >= FLOOR, f"4-class balanced accuracy {score:.3f} < {FLOOR} (chance 0.25)"
    recalls = dict(zip(card["classes"], recall_score(truth, probabilities.argmax(1), average=None), strict=True))
    assert all(recalls[c] >= floor for c, floor in RECALL_FLOORS.items()), recalls


def test_no_negative_answer_has_a_leukaemia_class_on_top(data_root):
    """The 4-class head's band starts at P(ALL) 0.64, so a Negative could carry Early pre-B as its most
    probable class (measured before the fix: 3 of 86 Negatives on the grouped test split, one of them
    Early-498, ALL). A screening answer must not contradict its own probabilities: those are borderline."""
    card = read_card(FOLDER)
    dataset, samples = data.load_dataset(data_root)
    test = data.card_splits(card, dataset, samples)["test"]
    images = data.load_images(data_root, test, card["input_size"])
    clf = Classifier.load(FOLDER / card["artifacts"]["int8"]["file"])
    diagnoses = assess_all(clf, images)
    contradicting = [(s.path, d.probabilities) for s, d in zip(test, diagnoses, strict=True)
                     if d.label == "Negative" and max(d.probabilities, key=d.probabilities.get) != "Benign"]
    assert not contradicting, contradicting
    assert sum(d.label == "Negative" for d in diagnoses) >= 75  # still answers Negative (measured 83: 78 benign, 5 ALL)


def test_normal_blood_of_another_laboratory_is_never_called_positive_and_mostly_refused(bccd_root):
    """Unlike the default, this head answers some BCCD fields (normal blood, another stain and camera):
    96 of 364, all Negative, before the gate's joint colour-and-feature rule; 27 after. None may be Positive.
    Its white-cell crops (framed as this data set's captures are) are answered rarely, one of them wrongly."""
    card = read_card(FOLDER)
    clf = Classifier.load(FOLDER / card["artifacts"]["int8"]["file"])
    fields, crops = ood.bccd(bccd_root)

    def labels_of(payloads: list[bytes]) -> list[str]:
        images = np.stack([preprocess(b, clf.input_size) for b in payloads])
        return [d.label for d in assess_all(clf, images, [jpeg_quality(b) for b in payloads])]

    labels = labels_of(list(fields.values()))
    assert len(labels) == len(fields) and "Positive" not in labels, labels.count("Positive")
    answered = len(labels) - labels.count("Indeterminate")
    assert answered <= MAX_BCCD_FIELDS_ANSWERED, f"{answered} of {len(labels)} BCCD fields answered"
    labels = labels_of(list(crops.values()))
    answered = len(labels) - labels.count("Indeterminate")
    assert answered <= MAX_BCCD_CROPS_ANSWERED and labels.count("Positive") <= MAX_BCCD_CROPS_POSITIVE, \
        f"{answered} of {len(labels)} BCCD crops answered, {labels.count('Positive')} Positive"
