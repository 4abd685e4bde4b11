"""The grouped split: field twins found on the real images, and no group across train/val/test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model import data, grouped, twins

GROUPED_DIR = data.split_dir("ALL_Aria2021") / grouped.GROUPED
KNOWN_TWINS = (("Pre/WBC-Malignant-Pre-347.jpg", "Pre/WBC-Malignant-Pre-346.jpg"),
               ("Early/WBC-Malignant-Early-856.jpg", "Early/WBC-Malignant-Early-857.jpg"),
               ("Benign/WBC-Benign-482.jpg", "Benign/WBC-Benign-483.jpg"),
               ("Pro/WBC-Malignant-Pro-519.jpg", "Pro/WBC-Malignant-Pro-440.jpg"))


@pytest.fixture(scope="module")
def committed(data_root):
    dataset, samples = data.load_dataset(data_root)
    splits = data.load_splits(dataset, samples, split=grouped.GROUPED)
    rows = [ln.split() for ln in data.read_list(GROUPED_DIR / "groups.txt")]
    return samples, splits, {r[0]: int(r[1]) for r in rows}, {r[0]: r[2] for r in rows}


def test_matcher_finds_the_known_twins_on_the_real_images(data_root):
    listed = {frozenset(p) for p in twins.read_twins(data.split_dir("ALL_Aria2021") / twins.TWINS_FILE)}
    for a, b in KNOWN_TWINS:
        score = twins.pair_score(twins.grey_field(data_root / a), twins.grey_field(data_root / b))
        assert score >= twins.TWIN_NCC, (a, b, score)
        assert frozenset((a, b)) in listed, (a, b)
    # a neighbour of the same folder that is another field stays below the threshold
    other = twins.pair_score(twins.grey_field(data_root / "Pro/WBC-Malignant-Pro-519.jpg"),
                             twins.grey_field(data_root / "Pro/WBC-Malignant-Pro-441.jpg"))
    assert other < 0.5


def test_matcher_tolerates_a_stage_shift(data_root):
    field = twins.grey_field(data_root / "Early/WBC-Malignant-Early-100.jpg")
    shifted = np.roll(field, (40, -30), axis=(0, 1))
    assert twins.match_score(twins.centre_crop(field), shifted) > 0.99


def test_no_group_straddles_the_grouped_split(data_root, committed):
    samples, splits, group, _ = committed
    side = {s.path: name for name, members in splits.items() for s in members}
    assert len(side) == sum(len(v) for v in splits.values()) == len(samples)
    groups_by_side = {name: {group[s.path] for s in members} for name, members in splits.items()}
    assert not groups_by_side["train"] & groups_by_side["val"]
    assert not groups_by_side["train"] & groups_by_side["test"]
    assert not groups_by_side["val"] & groups_by_side["test"]
    links = data.duplicate_pairs(data_root) + twins.read_twins(data.split_dir("ALL_Aria2021") / twins.TWINS_FILE)
    assert len(links) > 85
    for a, b in links:
        assert side[a] == side[b], (a, b)
    for name, members in splits.items():
        for subtype in data.ARIA_CLASSES:
            assert sum(s.subtype == subtype for s in members) >= 40, (name, subtype)


def test_capture_blocks_are_runs_of_one_stream_on_one_side(committed):
    samples, splits, _, block = committed
    side = {s.path: name for name, members in splits.items() for s in members}
    members: dict[str, list[str]] = {}
    for path, name in block.items():
        members.setdefault(name, []).append(path)
    assert all(name != "-" for name in members)
    for name, paths in members.items():
        subtype = name.split("/")[0]
        assert {p.split("/")[0] for p in paths} == {subtype}
        assert len({side[p] for p in paths}) == 1, name
        steps = np.diff(sorted(grouped.file_number(p) for p in paths))
        assert len(set(steps.tolist())) <= 1, name  # consecutive images of one stream: n, n+p, n+2p, ...


def test_cv_folds_are_grouped_and_cover_everything(committed):
    samples, _, group, _ = committed
    groups = np.array([group[s.path] for s in samples])
    folds = grouped.cv_indices(samples, groups, 5, 42)
    assert np.array_equal(np.sort(np.concatenate([f["test"] for f in folds])), np.arange(len(samples)))
    for f in folds:
        parts = [set(groups[f[k]]) for k in ("train", "val", "test")]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
        assert sum(len(f[k]) for k in f) == len(samples)


def test_a_folds_served_band_is_scored_on_what_it_answers():
    """The CV's band estimate: fitted on validation outputs, it refuses the test images inside it (and, for a
    4-class head, the Negatives whose top class is a leukaemia subtype) and scores only the rest."""
    from model.cv import served_band

    rng = np.random.default_rng(0)
    val_labels = np.repeat([0, 1], [200, 800])
    p_val = np.clip(np.where(val_labels == 1, rng.normal(0.9, 0.1, 1000), rng.normal(0.1, 0.1, 1000)), 1e-4, 1 - 1e-4)
    test_labels = np.array([0, 0, 0, 1, 1, 1, 1])
    p_test = np.array([0.01, 0.02, 0.99, 0.47, 0.97, 0.98, 0.03])
    result = served_band(val_labels, p_val, test_labels, p_test, threshold=0.5)
    low, high = result["limits"]
    assert 0.02 < low <= 0.5 <= high < 0.97  # what this synthetic validation gives: a band around the middle
    assert result["borderline"] == 1 and result["n"] == 7  # 0.47
    answered = result["answered"]
    assert (answered["tp"], answered["fn"], answered["tn"], answered["fp"]) == (2, 1, 2, 1)
    on_top = np.array([True, False, True, True, True, True, True])  # the second Negative: a subtype leads
    assert served_band(val_labels, p_val, test_labels, p_test, 0.5, on_top)["borderline"] == 2


def test_the_cv_summary_pools_the_band_over_the_folds_that_estimated_it():
    """Counts are pooled (a fold whose band answers nothing adds only borderline images, not NaN), and so is
    the share of each class left borderline: a band can buy its specificity by refusing most benign smears."""
    from model.cv import summary

    def fold(k, borderline, tp=0, fn=0, tn=0, fp=0):
        answered = {"tp": tp, "fn": fn, "tn": tn, "fp": fp} if borderline < 100 else None
        return {"repeat": 0, "fold": k, "protocol": {}, "benign": {"test": 25},
                "served_band": {"n": 100, "borderline": borderline, "answered": answered}}

    out = summary([{"repeat": 0, "fold": 0, "protocol": {}}, fold(1, 10, 70, 0, 18, 2), fold(2, 20, 59, 1, 20, 0),
                   fold(3, 100)])["served_band"]
    assert out["folds"] == ["0-1", "0-2", "0-3"] and out["n"] == 300
    assert out["borderline_share"] == pytest.approx(130 / 300)
    assert out["sensitivity"] == pytest.approx(129 / 130) and out["specificity"] == pytest.approx(38 / 40)
    assert out["sensitivity_ci95"][0] < 129 / 130 < out["sensitivity_ci95"][1]
    assert out["benign_borderline"] == 25 - 20 + 25 - 20 + 25 and out["benign_borderline_share"] == pytest.approx(35 / 75)
    assert out["all_borderline"] == 75 - 70 + 75 - 60 + 75 and out["all_borderline_share"] == pytest.approx(95 / 225)


def test_the_cv_summary_gives_the_sample_sd_and_each_repeats_pooled_counts_with_intervals():
    """Over folds the sd is the sample sd (five folds of 0.95, 0.97, 0.98, 0.99, 0.94: 0.0207, where the
    population sd, 0.0185, would pass a target of 0.02). Each repeat's test parts hold every image once, so its
    counts pool into one figure with a Wilson interval; Early pre-B's are counted from each fold's stored P(ALL)."""
    from model.calibration import wilson
    from model.cv import summary

    def fold(repeat, k, bal, tp, fn, tn, fp, early_hits):
        seed0 = {"balanced_accuracy": bal, "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                 "roc_auc": 0.99, "early_sensitivity": early_hits / 4, "tp": tp, "fn": fn, "tn": tn, "fp": fp}
        paths = [f"Early/e{i}.jpg" for i in range(4)] + ["Benign/b.jpg"]
        p_all = [0.9] * early_hits + [0.1] * (4 - early_hits) + [0.2]
        return {"repeat": repeat, "fold": k, "threshold": 0.5, "test_paths": paths, "p_all_colour": p_all,
                "protocol": {"colour": {"seed0": seed0, "seeds": {"balanced_accuracy": {"min": bal}}}}}

    accuracies = [0.95, 0.97, 0.98, 0.99, 0.94]
    results = [fold(0, k, a, 40 + k, 2, 9, 1, 4 - (k == 0)) for k, a in enumerate(accuracies)]
    results += [fold(1, 0, 0.96, 30, 5, 8, 2, 2)]
    out = summary(results)
    assert out["colour"]["balanced_accuracy"]["sd"] == pytest.approx(np.std(accuracies + [0.96], ddof=1))
    assert out["colour"]["balanced_accuracy"]["sd"] > np.std(accuracies + [0.96])
    first, second = out["pooled"]["0"], out["pooled"]["1"]
    assert first["folds"] == 5 and second["folds"] == 1
    tp = sum(40 + k for k in range(5))
    assert (first["colour"]["tp"], first["colour"]["fn"], first["colour"]["tn"], first["colour"]["fp"]) == (tp, 10, 45, 5)
    assert first["colour"]["sensitivity"] == pytest.approx(tp / (tp + 10))
    assert first["colour"]["sensitivity_ci95"] == pytest.approx(list(wilson(tp, tp + 10)))
    assert first["colour"]["specificity_ci95"] == pytest.approx(list(wilson(45, 50)))
    assert first["colour"]["balanced_accuracy"] == pytest.approx((tp / (tp + 10) + 45 / 50) / 2)
    assert (first["early"]["hits"], first["early"]["n"]) == (19, 20)
    assert first["early"]["sensitivity_ci95"] == pytest.approx(list(wilson(19, 20)))
    assert (second["early"]["hits"], second["early"]["n"]) == (2, 4)


def test_the_default_card_leads_with_its_recipes_grouped_cv_as_stored_beside_it():
    """The card carries the headline of the CV summary stored beside it (`python -m model cv --store`): folds,
    balanced accuracy and AUC over folds, and each repeat's pooled sensitivity, specificity and Early pre-B with
    their intervals, so the card cannot quote a summary other than the one it ships with."""
    from model.classifier import DEFAULT_ARTIFACT, read_card
    from model.cv import card_headline

    folder = DEFAULT_ARTIFACT.parent
    stored = json.loads((folder / "cv_grouped.json").read_text())
    headline = read_card(folder)["metrics"]["cv_grouped"]
    assert headline == card_headline(stored)
    assert headline["folds"] == stored["folds"] >= 5 and headline["balanced_accuracy"] == stored["colour"]["balanced_accuracy"]
    for repeat in headline["pooled"].values():
        low, high = repeat["sensitivity_ci95"]
        assert low < repeat["sensitivity"] < high and "early_sensitivity_ci95" in repeat
