"""A short real training run on real images produces loadable, consistent artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.calibrate import fit_policy
from model.classifier import CARD_NAME, Classifier
from model.preprocess import preprocess_file
from model.train import train


@pytest.mark.parametrize("classes, names", [("binary", ["Benign", "ALL"]),
                                            ("subtype", ["Benign", "Early", "Pre", "Pro"])])
def test_one_epoch_on_real_images_exports_loadable_artifacts(data_root, tmp_path, classes, names):
    out = train(data_root, "allds2020", epochs=1, seed=5, classes=classes, out_dir=tmp_path / "smoke", limit=150)
    with pytest.raises(ValueError, match="calibrate"):  # no decision policy yet
        Classifier.load(out / "allds2020_int8.tflite" if classes == "binary" else out / "allds2020_subtype_int8.tflite")
    decision = fit_policy(out, data_root)
    card = json.loads((out / CARD_NAME).read_text())
    assert card["decision"] == decision and card["threshold"] == decision["int8"]["threshold"]
    assert card["data"]["limit_per_split"] == 150 and card["training"]["epochs_run"] == 1
    assert 0.0 <= card["threshold"] <= 1.0 and card["classes"] == names
    batch = np.stack([preprocess_file(data_root / p, card["input_size"])
                      for p in ("Benign/WBC-Benign-001.jpg", "Pre/WBC-Malignant-Pre-001.jpg")])
    outputs = {}
    for kind, entry in card["artifacts"].items():
        clf = Classifier.load(out / entry["file"])
        assert clf.sha256 == entry["sha256"] and clf.classes == names
        outputs[kind] = clf.classify(batch)
        assert outputs[kind].shape == (2, len(names)) and np.allclose(outputs[kind].sum(1), 1, atol=0.02)
        diagnoses = clf.assess(batch)
        assert all(d.label in ("Positive", "Negative", "Indeterminate") and set(d.probabilities) == set(names)
                   for d in diagnoses)
    np.testing.assert_allclose(outputs["keras"], outputs["float32"], atol=1e-4)
