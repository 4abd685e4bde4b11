"""Answers that can be trusted: the input gate refuses failed captures and non-smears, borderline
cases are Indeterminate, confidences are calibrated, explanations decode, the policy files match
the card. All on the SHIPPED artifacts through `Classifier.assess`."""

from __future__ import annotations

import json
import shutil
from unittest import mock

import cv2
import numpy as np
import pytest

from agent.config import Inference
from model import data, ood
from model.calibration import choose_band, expected_calibration_error, wilson
from model.classifier import CARD_NAME, DEFAULT_ARTIFACT, Classifier, file_sha256
from model.explain import explain, heat_grid
from model.gate import QUALITY_RULES
from model.preprocess import ImageError, ImageLimits, jpeg_quality, preprocess
from model.trust_report import assess_all

ARTIFACTS = DEFAULT_ARTIFACT.parent.parent
SHIPPED = sorted(p.name for p in ARTIFACTS.iterdir() if (p / CARD_NAME).is_file())
# Measured on the served model's own held-out split (grouped test): 55 of 506 = 0.109 refused (gate 2,
# borderline 53); 35 of them benign, 34 borderline leaning benign (P(ALL) 0.06-0.47). The earlier 0.03
# (15/489) was `cellnet` on the per-image split, whose test images share fields with its training images;
# the `cellnet` recipe retrained on the grouped split refuses 0.162 of the grouped test (docs/trust.md).
MAX_HELD_OUT_REFUSAL = 0.12
BCCD_FIELDS, MAX_BCCD_FIELDS_DECIDED = 364, 3
FLOORS_ANSWERED = {"sensitivity": 0.98, "specificity": 0.97}


@pytest.fixture(scope="module")
def served() -> Classifier:
    return Classifier.load(DEFAULT_ARTIFACT)


@pytest.fixture(scope="module")
def held_out(data_root, served):
    """The served model's held-out split (its card names the split it was trained on)."""
    dataset, samples = data.load_dataset(data_root)
    test = data.card_splits(served.card, dataset, samples)["test"]
    return test, np.array([s.label for s in test])


def _assess_bytes(clf: Classifier, payloads: list[bytes]):
    images = np.stack([preprocess(b, clf.input_size) for b in payloads])
    return assess_all(clf, images, [jpeg_quality(b) for b in payloads])


def test_every_failed_capture_is_indeterminate_with_its_reason(served, data_root, held_out):
    test, _ = held_out
    smears = [(data_root / s.path).read_bytes() for s in test[::24]]
    for name, payloads in ood.failed_captures(smears).items():
        expected = ood.EXPECTED_REASONS[ood.failure_type(name)]
        for d in _assess_bytes(served, payloads):
            assert d.label == "Indeterminate" and d.confidence is None, (name, d)
            assert d.reason in expected, (name, d.reason, expected)
            assert not d.positive


def test_defocus_of_radius_5_is_refused_on_every_held_out_image(served, data_root, held_out):
    """The mildest failed-capture defocus (a 5 px pillbox at 224 px) on the whole held-out split, not a sample."""
    test, _ = held_out
    payloads = [ood.encode(ood.defocus(ood.decode((data_root / s.path).read_bytes()), 5), ".jpg", 95) for s in test]
    diagnoses = _assess_bytes(served, payloads)
    decided = [s.path for s, d in zip(test, diagnoses, strict=True) if d.label != "Indeterminate"]
    assert not decided, f"{len(decided)} of {len(test)} defocused captures decided: {decided[:5]}"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_quality_gate_passes_every_smear_the_model_learnt_from(name, data_root):
    """A capture like those the network was trained on is no failed capture: no training or validation
    image may be refused by a quality rule (a validation split made of whole capture blocks can miss a
    capture mode that training has), but for the rare training image softer than every validation one."""
    clf = Classifier.load(ARTIFACTS / name / f"{name}_int8.tflite")
    dataset, samples = data.load_dataset(data_root)
    splits = data.card_splits(clf.card, dataset, samples)
    learnt = splits["train"] + splits["val"]
    images = data.load_images(data_root, learnt, clf.input_size)
    quality = {reason for reason, _, _ in QUALITY_RULES}
    diagnoses = assess_all(clf, images)
    refused = [(s.path, d.reason) for s, d in zip(learnt, diagnoses, strict=True) if d.reason in quality]
    softer = [path for path, reason in refused if reason == "out_of_focus"]
    assert len(softer) <= len(learnt) / 1000 and len(refused) == len(softer), \
        f"{len(refused)} of {len(learnt)} training and validation smears refused: {refused[:6]}"
    # nor by the joint colour x feature limit: `unfamiliar_image` where the feature limit alone lets them through
    joint = [s.path for s, d in zip(learnt, diagnoses, strict=True)
             if d.reason == "unfamiliar_image" and d.ood_score <= clf.policy.ood_threshold]
    assert not joint, f"{len(joint)} refused by the joint limit: {joint[:6]}"


def test_fields_of_another_laboratory_are_not_diagnosed(served, bccd_root):
    """BCCD fields: normal blood, another stain and camera, on which the model was never validated. Measured
    for the served default: 3 of 364 decided (2 Negative, 1 Positive; 4 before the joint colour x feature
    limit); with the quality thresholds 25 % beyond the training extremes 8 were (4 Positive). Of the 372 crops
    centred on their white cells (framed as this data set's captures are) it decides none (measured)."""
    fields, crops = ood.bccd(bccd_root)
    assert len(fields) == BCCD_FIELDS, f"{len(fields)} BCCD fields at {bccd_root}, not the data set's {BCCD_FIELDS}"
    diagnoses = _assess_bytes(served, list(fields.values()))
    decided = [d.label for d in diagnoses if d.label != "Indeterminate"]
    assert len(decided) <= MAX_BCCD_FIELDS_DECIDED and decided.count("Positive") <= 1, \
        f"{len(decided)} of {len(fields)} BCCD fields decided: {sorted(decided)}"
    decided_crops = [(name, d.label) for name, d in zip(crops, _assess_bytes(served, list(crops.values())), strict=True)
                     if d.label != "Indeterminate"]
    assert not decided_crops, f"{len(decided_crops)} of {len(crops)} BCCD white-cell crops decided: {decided_crops}"


def test_smears_in_an_unvalidated_colour_are_not_called_non_smears(served, data_root, held_out, bccd_root):
    """Real smears in colours the model was not validated on (another laboratory's stain and camera, grayscale
    captures of held-out smears) are refused as `unfamiliar_colour`, never `not_a_blood_smear`. Before: 244
    of 364 BCCD fields and every grayscale capture were `not_a_blood_smear`; after, 243 fields are
    `unfamiliar_colour` and one (BloodImage_00390, luma sd 0.046) `low_contrast`."""
    fields, _ = ood.bccd(bccd_root)
    reasons = [d.reason for d in _assess_bytes(served, list(fields.values()))]
    assert "not_a_blood_smear" not in reasons and reasons.count("unfamiliar_colour") >= len(fields) // 2, reasons
    test, _ = held_out
    grey = [ood.encode(cv2.cvtColor(cv2.cvtColor(ood.decode((data_root / s.path).read_bytes()), cv2.COLOR_RGB2GRAY),
                                    cv2.COLOR_GRAY2RGB)) for s in test[::12]]
    reasons = [d.reason for d in _assess_bytes(served, grey)]
    assert set(reasons) <= {"unfamiliar_colour", "overexposed"} and reasons.count("unfamiliar_colour") >= 0.8 * len(grey), \
        reasons  # measured: 39 of 43; 4 grey captures also clip, which is checked first


def test_mild_underexposure_is_read_not_refused(served, data_root, held_out):
    """At x0.7 exposure the network still reads held-out smears (on these 43 PNGs: right on 42 without the
    gate), so the gate must not call them underexposed; with the floor at the darkest training smear it
    called 22 of 43 so."""
    test, labels = held_out
    smears = [ood.encode(ood.exposure(ood.decode((data_root / s.path).read_bytes()), 0.7)) for s in test[::12]]
    diagnoses = _assess_bytes(served, smears)
    assert not [d for d in diagnoses if d.reason == "underexposed"]
    decided = [(d.positive, bool(y)) for d, y in zip(diagnoses, labels[::12], strict=True) if d.label != "Indeterminate"]
    assert len(decided) >= 0.8 * len(smears) and np.mean([p == y for p, y in decided]) >= 0.95, decided


def test_smears_too_small_to_read_are_refused_and_those_above_the_floor_are_read(served, data_root, held_out):
    """Held-out smears shrunk and sent as PNG (measured on all 506 of the grouped test split): down to 48 px the
    network reads them as at full size (answered sensitivity 398/399, specificity 51/51); at 32 px the gate
    refuses two thirds; at 24 px 64 of the 74 ALL smears answered were called Negative, at 16 px all 64. The
    default floor, for the agent as for `preprocess`, refuses them before the network."""
    test, labels = held_out
    limits = ImageLimits()
    assert Inference().min_side_px == limits.min_side
    cells = [ood.decode((data_root / s.path).read_bytes()) for s in test[::4]]
    for side in (16, 24, 32, limits.min_side - 1):
        with pytest.raises(ImageError) as info:
            preprocess(ood.encode(cv2.resize(cells[0], (side, side), interpolation=cv2.INTER_AREA)), 128, limits)
        assert info.value.code == "image_too_small"
    shrunk = [ood.encode(cv2.resize(c, (limits.min_side,) * 2, interpolation=cv2.INTER_AREA)) for c in cells]
    answered = [(d.positive, y) for d, y in zip(_assess_bytes(served, shrunk), labels[::4], strict=True)
                if d.label != "Indeterminate"]
    assert len(answered) >= 0.8 * len(shrunk)
    positives = [p for p, y in answered if y]
    negatives = [not p for p, y in answered if not y]
    assert np.mean(positives) >= FLOORS_ANSWERED["sensitivity"] and np.mean(negatives) >= FLOORS_ANSWERED["specificity"]


def test_photographs_are_not_diagnosed(served):
    photos = ood.photographs()
    assert len(photos) >= 20
    for name, d in zip(photos, _assess_bytes(served, list(photos.values())), strict=True):
        assert d.label == "Indeterminate" and d.reason != "borderline", (name, d)


def test_held_out_split_is_answered_with_calibrated_confidence(served, data_root, held_out):
    test, labels = held_out
    images = data.load_images(data_root, test, served.input_size)
    diagnoses = assess_all(served, images)
    refused = np.array([d.label == "Indeterminate" for d in diagnoses])
    assert refused.mean() <= MAX_HELD_OUT_REFUSAL, f"{refused.sum()} of {len(refused)} held-out images refused"
    assert all(d.reason is not None for d in diagnoses if d.label == "Indeterminate")
    answered = [(d, y) for d, y in zip(diagnoses, labels, strict=True) if d.label != "Indeterminate"]
    assert all(d.confidence >= 0.5 and d.reason is None for d, _ in answered)
    tp = sum(d.positive and y for d, y in answered)
    tn = sum(not d.positive and not y for d, y in answered)
    sensitivity = tp / sum(y for _, y in answered)
    specificity = tn / sum(1 - y for _, y in answered)
    assert sensitivity >= FLOORS_ANSWERED["sensitivity"] and specificity >= FLOORS_ANSWERED["specificity"], \
        (sensitivity, specificity)
    confidence = np.array([d.confidence for d, _ in answered])
    correct = np.array([d.positive == bool(y) for d, y in answered])
    assert expected_calibration_error(confidence, correct) <= 0.03


def test_assess_is_one_invocation_per_batch(served, data_root, held_out):
    test, _ = held_out
    images = data.load_images(data_root, test[:8], served.input_size)
    with mock.patch.object(served, "_run", wraps=served._run) as run:
        diagnoses = served.assess(images)
    assert run.call_count == 1 and len(diagnoses) == 8


@pytest.mark.parametrize("name", SHIPPED)
def test_gate_files_match_the_cards_and_every_kind_assesses(name, data_root, held_out):
    folder = ARTIFACTS / name
    card = json.loads((folder / CARD_NAME).read_text())
    gate = card["decision"]["gate_file"]
    assert file_sha256(folder / gate["file"]) == gate["sha256"]
    test, _ = held_out
    images = data.load_images(data_root, test[:4], card["input_size"])
    for kind in ("int8", "float32"):
        clf = Classifier.load(folder / card["artifacts"][kind]["file"])
        assert clf.threshold == card["decision"][kind]["threshold"]
        results = clf.assess(images)
        assert [d.label for d in results] and all(d.ood_score is not None for d in results)
        low, high = card["decision"][kind]["band"]
        for d in results:
            assert d.label == "Indeterminate" or not (low <= d.p_all < high)


def test_a_tampered_gate_file_or_a_card_without_policy_fails_loudly(tmp_path):
    folder = tmp_path / DEFAULT_ARTIFACT.parent.name
    shutil.copytree(DEFAULT_ARTIFACT.parent, folder)
    card = json.loads((folder / CARD_NAME).read_text())
    gate = folder / card["decision"]["gate_file"]["file"]
    gate.write_bytes(gate.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        Classifier.load(folder / DEFAULT_ARTIFACT.name)
    del card["decision"]
    (folder / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="calibrate"):
        Classifier.load(folder / DEFAULT_ARTIFACT.name)
    assert Classifier.load(folder / DEFAULT_ARTIFACT.name, require_policy=False).classify(
        np.zeros((1, 128, 128, 3), np.float32)).shape == (1, 2)


def test_explanation_is_a_png_of_the_requested_size(served, data_root):
    tensor = preprocess((data_root / "Pre/WBC-Malignant-Pre-001.jpg").read_bytes(), served.input_size)
    result = explain(served, tensor, (640, 480))
    image = cv2.imdecode(np.frombuffer(result.png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (480, 640, 4) and result.ms > 0 and "occlusion" in result.method
    assert image[..., 3].max() > 0  # some heat
    with pytest.raises(ValueError):
        explain(served, tensor[:64], (640, 480))


def test_explanations_of_held_out_images_have_heat(served, data_root, held_out):
    """A confident answer must still explain itself: no occlusion map of the served model is blank (every
    tenth held-out image; `python -m model evaluate` counts them all into the card)."""
    test, _ = held_out
    images = data.load_images(data_root, test[::10], served.input_size)
    blank = [s.path for s, image in zip(test[::10], images, strict=True) if heat_grid(served, image).max() == 0]
    assert not blank, f"{len(blank)} of {len(images)} explanations blank: {blank[:5]}"


def test_wilson_interval_matches_published_values():
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(0, 10)
    assert low == 0 and round(high, 4) == 0.2775


def test_band_meets_its_targets_outside_and_contains_the_threshold():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(80, int), np.ones(400, int)]
    p = np.clip(np.r_[rng.beta(1, 8, 80), rng.beta(8, 1, 400)], 0, 1)
    low, high = choose_band(labels, p, (0.4, 0.5), 0.995, 0.99)
    assert low <= 0.4 and high >= 0.5
    decided = (p < low) | (p >= high)
    positive = p >= high
    assert np.sum(positive & decided & (labels == 1)) / np.sum(decided & (labels == 1)) >= 0.995
    assert np.sum(~positive & decided & (labels == 0)) / np.sum(decided & (labels == 0)) >= 0.99


def test_keras_artifact_assesses_like_float32(data_root, held_out):
    """Evaluation path: the `.keras` file (TensorFlow) uses float32's policy and answers alike."""
    test, _ = held_out
    folder = DEFAULT_ARTIFACT.parent
    card = json.loads((folder / CARD_NAME).read_text())
    images = data.load_images(data_root, test[:16], card["input_size"])
    keras_answers = Classifier.load(folder / card["artifacts"]["keras"]["file"]).assess(images)
    float_answers = Classifier.load(folder / card["artifacts"]["float32"]["file"]).assess(images)
    assert [d.label for d in keras_answers] == [d.label for d in float_answers]
    for k, f in zip(keras_answers, float_answers, strict=True):
        # measured up to 0.0014 apart (cellnet_standardised: TensorFlow's and LiteRT's float arithmetic)
        assert abs(k.p_all - f.p_all) < 2e-3 and abs(k.ood_score - f.ood_score) < 1e-2


def test_jpeg_quality_is_read_from_the_header():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for quality in (10, 20, 50, 75, 95):
        estimate = jpeg_quality(ood.encode(image, ".jpg", quality))
        assert abs(estimate - quality) <= 3, (quality, estimate)
    jpeg = ood.encode(image, ".jpg", 50)
    assert jpeg_quality(ood.encode(image)) is None  # PNG
    for bad in (b"", b"\xff\xd8", jpeg[:30], b"\xff\xd8\xff\xdb\xff\xff" + b"\x00" * 10, b"not an image"):
        assert jpeg_quality(bad) is None
