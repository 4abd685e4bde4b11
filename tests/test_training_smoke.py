"""A short real training run on real images produces loadable, consistent artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from model import data
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


def test_a_cv_fold_trains_and_scores_the_subtype_head(data_root):
    """One short grouped-CV fold with the 4-class head: the screen is scored on P(ALL), the subtypes per class;
    the served band is fitted on the fold's validation part (as `model.calibrate` does) and scored on its test
    part."""
    from model import grouped
    from model.cv import read_groups, run_fold

    _, samples = data.load_dataset(data_root)
    fold = grouped.cv_indices(samples, read_groups(data_root, samples), 5, 42)[0]
    picked = {k: v[::12] for k, v in fold.items()}  # a few hundred images, every class in every part
    chosen = [samples[i] for k in ("train", "val", "test") for i in picked[k]]
    sizes = [len(picked[k]) for k in ("train", "val", "test")]
    bounds = np.cumsum([0, *sizes])
    parts = {k: np.arange(bounds[j], bounds[j + 1]) for j, k in enumerate(("train", "val", "test"))}
    images = data.load_images(data_root, chosen, 100)
    result = run_fold("allds2020", images, chosen, parts, seed=5, epochs=1, classes="subtype")
    assert result["classes"] == ["Benign", "Early", "Pre", "Pro"]
    labels = [s.label for s in chosen[bounds[2]:]]
    assert len(result["p_all_colour"]) == sizes[2]  # the P(ALL) kept per test image is the one scored
    assert result["protocol"]["colour"]["seed0"]["roc_auc"] == pytest.approx(roc_auc_score(labels, result["p_all_colour"]),
                                                                           abs=1e-4)
    p_test, p_val = np.array(result["p_all_colour"]), np.array(result["p_all_val"])
    assert len(p_val) == sizes[1]  # kept, so any other operating rule can be scored on the fold later
    band = result["served_band"]
    low, high = band["limits"]
    assert low <= result["threshold"] <= high
    assert band["n"] == sizes[2] and band["borderline"] >= int(((p_test >= low) & (p_test < high)).sum())
    assert (band["answered"] is None) == (band["borderline"] == band["n"])
    assert band["answered"] is None or band["answered"]["n"] == band["n"] - band["borderline"]
    subtype = result["subtype"]
    assert set(subtype["per_class"]) == {"Benign", "Early", "Pre", "Pro"}
    matrix = np.array(subtype["confusion"])
    assert matrix.shape == (4, 4) and matrix.sum() == sizes[2]
    assert matrix.sum(1).tolist() == [sum(s.subtype == c for s in chosen[bounds[2]:]) for c in result["classes"]]


def test_cv_refuses_to_resume_from_folds_of_another_recipe_or_head(data_root, tmp_path):
    """Resuming skips finished folds; a fold file of another recipe, head or budget must stop the run, not be
    summarised as this one (e.g. `--classes subtype` pointed at the binary CV's folder); a folder of its own
    folds resumes."""
    from model.cv import cross_validate

    (tmp_path / "0-0.json").write_text(json.dumps({"recipe": "cellnet_standardised", "epochs_budget": None}) + "\n")
    with pytest.raises(ValueError, match="binary"):
        cross_validate(data_root, "cellnet_standardised", out=tmp_path, classes="subtype")
    with pytest.raises(ValueError, match="cellnet_standardised"):
        cross_validate(data_root, "cellnet", out=tmp_path)
    resumed = tmp_path / "resumed"  # the binary CV's committed folds (written before folds named their classes)
    shutil.copytree(data.REPO / "docs" / "cv" / "cellnet_standardised", resumed)
    summary = cross_validate(data_root, "cellnet_standardised", repeats=2, out=resumed, only={"none"})
    assert summary["folds"] == len(list(resumed.glob("*-*.json"))) >= 5 and summary["head"] == "binary"


def test_cv_resumes_a_folder_holding_more_repeats_than_asked(data_root, tmp_path):
    """The second repeat's folds (their own partition and seed) do not stop a run asked for one repeat: the
    committed folder holds both repeats, and all ten folds are summarised."""
    from model.cv import cross_validate

    shutil.copytree(data.REPO / "docs" / "cv" / "cellnet_standardised", tmp_path, dirs_exist_ok=True)
    assert {p.stem[0] for p in tmp_path.glob("*-*.json")} == {"0", "1"}
    summary = cross_validate(data_root, "cellnet_standardised", out=tmp_path, only={"none"})
    assert summary["folds"] == len(list(tmp_path.glob("*-*.json"))) == 10 and sorted(summary["pooled"]) == ["0", "1"]


@pytest.mark.parametrize("kwargs", [{"folds": 4}, {"seed": 7}, {"repeats": 2, "only": {"1-0"}}])
def test_cv_refuses_to_resume_from_folds_of_another_partition(data_root, tmp_path, kwargs):
    """A fold file is only this run's if it holds this run's test part and seed: resuming the committed folds
    with another fold count or seed must stop the run, not summarise them as its own (the last case: the
    second repeat's fold 0 file holding the first repeat's fold)."""
    from model.cv import cross_validate

    shutil.copytree(data.REPO / "docs" / "cv" / "cellnet_standardised", tmp_path, dirs_exist_ok=True)
    if "repeats" in kwargs:
        shutil.copy(tmp_path / "0-0.json", tmp_path / "1-0.json")
    kwargs.setdefault("only", {"none"})
    with pytest.raises(ValueError, match="another partition"):
        cross_validate(data_root, "cellnet_standardised", out=tmp_path, **kwargs)
