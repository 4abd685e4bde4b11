"""The shipped 4-class head (`cellnet_subtype`: Benign / Early pre-B / Pre-B / Pro-B, the cellnet recipe
trained on the grouped split): it loads as the agent loads a model and sorts the grouped test split's
subtypes far above chance (0.25 balanced accuracy for four classes)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from model import data
from model.classifier import DEFAULT_ARTIFACT, Classifier, read_card

FOLDER = DEFAULT_ARTIFACT.parent.parent / "cellnet_subtype"
FLOOR = 0.78  # measured 0.832 (int8, seed 42; Benign recall 0.548 is its weak class)


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
