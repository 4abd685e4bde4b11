"""The input gate's quality thresholds, on synthetic training and validation statistics."""

from __future__ import annotations

import numpy as np

from model.gate import MARGIN, QUALITY_RULES, fit_quality_thresholds, quality_reasons


def _statistics(rng: np.random.Generator, n: int, focus: tuple[float, float]) -> dict[str, np.ndarray]:
    return {name: rng.uniform(low, high, n).astype(np.float32) for name, (low, high) in
            {"brightness": (0.6, 0.8), "contrast": (0.06, 0.2), "focus": focus, "clipped": (0.0, 0.05),
             "saturation": (0.05, 0.3), "colour": (0.0, 3.0)}.items()}


def test_thresholds_pass_every_learnt_image_keep_the_validation_margin_and_the_focus_floor_is_the_softest_one():
    rng = np.random.default_rng(0)
    validation = _statistics(rng, 200, (0.07, 0.9))
    train = _statistics(rng, 800, (0.06, 1.6))  # a grainier capture mode, and one softer capture
    learnt = {k: np.concatenate([train[k], validation[k]]) for k in validation}
    thresholds = fit_quality_thresholds(train, validation)
    assert set(thresholds) == {f"{stat}_{side}" for _, stat, side in QUALITY_RULES}
    assert thresholds["focus_below"] == validation["focus"].min()  # a 5 px defocus reaches the margin below it
    assert thresholds["focus_above"] == learnt["focus"].max()  # the grainier training mode, beyond the margin
    assert thresholds["contrast_below"] == validation["contrast"].min() / MARGIN  # the margin, beyond training
    reasons = quality_reasons(learnt, thresholds)
    assert set(reasons) <= {None, "out_of_focus"}
    assert reasons.count("out_of_focus") == int((train["focus"] < validation["focus"].min()).sum())
    softer = {**validation, "focus": validation["focus"] * 0.99}
    assert quality_reasons(softer, thresholds).count("out_of_focus") == 1  # only the softest falls below


def test_each_failure_is_named_by_what_the_gate_sees():
    """Rule order, without data: exposure before the exposure-dependent contrast; colour before exposure."""
    rng = np.random.default_rng(1)
    thresholds = fit_quality_thresholds(_statistics(rng, 100, (0.07, 0.9)), _statistics(rng, 100, (0.07, 0.9)))
    smear = {"brightness": 0.7, "contrast": 0.1, "focus": 0.5, "clipped": 0.0, "saturation": 0.15, "colour": 1.0}
    cases = {
        "dim smear, contrast fallen with the light": ({"brightness": 0.3, "contrast": 0.03}, "underexposed"),
        "smear of normal exposure and low contrast": ({"contrast": 0.03}, "low_contrast"),
        "grayscale capture of a smear": ({"saturation": 0.0}, "unfamiliar_colour"),
        "dark frame of a foreign colour": ({"brightness": 0.3, "colour": 9.0}, "unfamiliar_colour"),
        "noise or texture": ({"focus": 5.0, "colour": 9.0}, "not_a_blood_smear"),
        "blank mid-grey frame": ({"contrast": 0.001, "saturation": 0.0}, "not_a_blood_smear"),
        "blank dark frame": ({"brightness": 0.05, "contrast": 0.001}, "underexposed"),
        "a smear": ({}, None),
    }
    for name, (changes, reason) in cases.items():
        stats = {k: np.array([v], np.float32) for k, v in {**smear, **changes}.items()}
        assert quality_reasons(stats, thresholds) == [reason], name


def test_a_negative_never_contradicts_the_most_probable_class():
    """The answer rule without data: below the band is Negative only while Benign leads; a band that starts
    above 0.5 (a 4-class head's) would otherwise let a leading leukaemia subtype through as Negative."""
    from unittest import mock

    from model.policy import DecisionPolicy

    p_all = np.array([0.55, 0.55, 0.30, 0.70, 0.95])
    benign_on_top = np.array([False, True, True, False, False])
    batch = np.zeros((len(p_all), 8, 8, 3), np.float32)
    policy = DecisionPolicy(calibrated=True, threshold=0.9, band=(0.6, 0.9))
    with mock.patch.object(DecisionPolicy, "gate", return_value=([None] * len(p_all), None)):
        labels = [(d.label, d.reason) for d in policy.decide(batch, p_all, None, None, benign_on_top)]
        unchanged = [d.label for d in policy.decide(batch, p_all, None)]
        binary = [d.label for d in DecisionPolicy(calibrated=True, threshold=0.5, band=(0.1, 0.5)).decide(
            batch, p_all, None, None, p_all < 0.5)]
    assert labels == [("Indeterminate", "borderline"), ("Negative", None), ("Negative", None),
                      ("Indeterminate", "borderline"), ("Positive", None)]
    assert unchanged == ["Negative", "Negative", "Negative", "Indeterminate", "Positive"]
    assert binary == ["Positive", "Positive", "Indeterminate", "Positive", "Positive"]  # band below 0.5: no-op


def test_an_image_unusual_in_colour_and_features_together_is_unfamiliar():
    """The joint rule without data: another laboratory's smear sits near both the colour limit and the
    feature-density limit, where the held-out smears reach only one of them. An image is `unfamiliar_image`
    when the product of its two distances, each over its own limit, passes the joint limit; a card without one
    (fitted before the rule) keeps the two limits alone."""
    from unittest import mock

    from model.policy import DecisionPolicy

    thresholds = fit_quality_thresholds(*(_statistics(np.random.default_rng(s), 100, (0.07, 0.9)) for s in (2, 3)))
    colour_limit, ood_limit = thresholds["colour_above"], 2.0
    ratios = np.array([(0.5, 0.5), (0.85, 0.85), (0.95, 0.2), (0.2, 0.95), (0.5, 1.1)])  # (colour, features) / limit
    smear = {"brightness": 0.7, "contrast": 0.1, "focus": 0.5, "clipped": 0.0, "saturation": 0.15}
    stats = {**{k: np.full(len(ratios), v, np.float32) for k, v in smear.items()}, "colour": ratios[:, 0] * colour_limit}
    density = mock.Mock(score=mock.Mock(return_value=ratios[:, 1] * ood_limit))
    batch, features = np.zeros((len(ratios), 8, 8, 3), np.float32), np.zeros((len(ratios), 4), np.float32)
    with mock.patch.object(DecisionPolicy, "quality_statistics", return_value=stats):
        joint = DecisionPolicy(calibrated=True, quality=thresholds, density=density, ood_threshold=ood_limit,
                               joint_threshold=0.6).gate(batch, features)[0]
        older = DecisionPolicy(calibrated=True, quality=thresholds, density=density, ood_threshold=ood_limit).gate(
            batch, features)[0]
    assert joint == [None, "unfamiliar_image", None, None, "unfamiliar_image"]
    assert older == [None, None, None, None, "unfamiliar_image"]


def test_a_card_fitted_before_the_joint_rule_serves_without_it_and_a_bad_limit_is_refused():
    import copy
    import json

    import pytest

    from model.classifier import CARD_NAME, DEFAULT_ARTIFACT
    from model.policy import DecisionPolicy

    folder = DEFAULT_ARTIFACT.parent
    card = json.loads((folder / CARD_NAME).read_text())
    assert DecisionPolicy.from_card(card, "int8", folder).joint_threshold == card["decision"]["int8"]["joint_threshold"]
    older = copy.deepcopy(card)
    del older["decision"]["int8"]["joint_threshold"]
    assert DecisionPolicy.from_card(older, "int8", folder).joint_threshold == float("inf")
    for bad in (0.0, -1.0, float("nan")):
        older["decision"]["int8"]["joint_threshold"] = bad
        with pytest.raises(ValueError, match="joint_threshold"):
            DecisionPolicy.from_card(older, "int8", folder)


def test_a_statistic_score_or_probability_that_is_not_a_number_is_refused_not_answered():
    """Fail closed: a comparison with NaN is false, so a rule written as "refuse when above" would let a
    non-finite statistic, feature score, joint product or P(ALL) through to a Positive or Negative."""
    from unittest import mock

    from model.policy import DecisionPolicy

    thresholds = fit_quality_thresholds(*(_statistics(np.random.default_rng(s), 100, (0.07, 0.9)) for s in (4, 5)))
    smear = {"brightness": 0.7, "contrast": 0.1, "focus": 0.5, "clipped": 0.0, "saturation": 0.15, "colour": 1.0}
    for stat in smear:
        for bad in (np.nan, np.inf, -np.inf):
            stats = {k: np.array([bad if k == stat else v], np.float32) for k, v in smear.items()}
            assert quality_reasons(stats, thresholds) != [None], (stat, bad)

    stats = {k: np.full(4, v, np.float32) for k, v in smear.items()}
    stats["colour"][2] = np.nan  # a colour the joint product cannot weigh
    density = mock.Mock(score=mock.Mock(return_value=np.array([0.5, np.nan, 0.5, 0.5])))
    batch, features = np.zeros((4, 8, 8, 3), np.float32), np.zeros((4, 4), np.float32)
    policy = DecisionPolicy(calibrated=True, threshold=0.5, band=(0.3, 0.6), quality=thresholds, density=density,
                            ood_threshold=2.0, joint_threshold=0.6)
    with mock.patch.object(DecisionPolicy, "quality_statistics", return_value=stats), \
            mock.patch("model.policy.quality_reasons", return_value=[None] * 4):
        decisions = policy.decide(batch, np.array([0.9, 0.9, 0.9, np.nan]), features)
    assert [d.label for d in decisions] == ["Positive", "Indeterminate", "Indeterminate", "Indeterminate"]
