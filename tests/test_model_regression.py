"""The models trained on the per-image split (`cellnet`, `allds2020`), evaluated on its held-out list
from the real data. The served default's floors are on the grouped split: tests/test_protocol_regression.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model import data
from model.classifier import CARD_NAME, Classifier
from model.evaluate import STRESS_MODES, score, stress
from model.train import ARTIFACTS

FLOORS = {  # cellnet
    "colour": {"balanced_accuracy": 0.97, "sensitivity": 0.98, "roc_auc": 0.995},
    "grayscale": {"balanced_accuracy": 0.90, "roc_auc": 0.98},
    "hue_saturation": {"balanced_accuracy": 0.90, "roc_auc": 0.98},
}


@pytest.fixture(scope="module")
def test_split(data_root):
    dataset, samples = data.load_dataset(data_root)
    test = data.load_splits(dataset, samples)["test"]
    return test, np.array([s.label for s in test])


def _scores(folder, data_root, test_split) -> dict:
    test, labels = test_split
    card = json.loads((folder / CARD_NAME).read_text())
    images = data.load_images(data_root, test, card["input_size"])
    results = {}
    for kind in ("float32", "int8"):
        clf = Classifier.load(folder / card["artifacts"][kind]["file"])
        assert clf.sha256 == card["artifacts"][kind]["sha256"]
        results[kind] = {mode: score(clf, stress(images, mode), labels) for mode in STRESS_MODES}
    return results


def test_cellnet_meets_its_per_image_floors(data_root, test_split):
    results = _scores(ARTIFACTS / "cellnet", data_root, test_split)
    for kind in ("float32", "int8"):
        for mode, floors in FLOORS.items():
            metrics = results[kind][mode][0]
            for key, floor in floors.items():
                assert metrics[key] >= floor, f"{kind} {mode} {key} {metrics[key]:.4f} < {floor}"
    for mode in STRESS_MODES:
        agreement = np.mean(results["float32"][mode][1] == results["int8"][mode][1])
        assert agreement >= 0.99, f"int8 agrees with float32 on only {agreement:.3f} of {mode} images"


def test_faithful_allds2020_runs_and_matches_its_card(data_root, test_split):
    folder = ARTIFACTS / "allds2020"
    card = json.loads((folder / CARD_NAME).read_text())
    results = _scores(folder, data_root, test_split)
    recorded = card["metrics"]["colour"]["int8"]
    measured = results["int8"]["colour"][0]
    assert abs(measured["tp"] - recorded["tp"]) <= 2 and abs(measured["tn"] - recorded["tn"]) <= 2
    assert measured["roc_auc"] == pytest.approx(recorded["roc_auc"], abs=2e-3)
