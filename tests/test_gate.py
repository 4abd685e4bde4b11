"""The input gate's quality thresholds, on synthetic validation statistics."""

from __future__ import annotations

import numpy as np

from model.gate import MARGIN, QUALITY_RULES, fit_quality_thresholds, quality_reasons


def test_thresholds_refuse_no_validation_image_and_the_focus_floor_is_the_softest_one():
    rng = np.random.default_rng(0)
    stats = {name: rng.uniform(low, high, 200).astype(np.float32) for name, (low, high) in
             {"brightness": (0.6, 0.8), "contrast": (0.06, 0.2), "focus": (0.07, 0.9), "clipped": (0.0, 0.05),
              "saturation": (0.05, 0.3), "colour": (0.0, 3.0)}.items()}
    thresholds = fit_quality_thresholds(stats)
    assert set(thresholds) == {f"{stat}_{side}" for _, stat, side in QUALITY_RULES}
    assert thresholds["focus_below"] == stats["focus"].min()  # a 5 px defocus reaches the margin below it
    assert thresholds["contrast_below"] == stats["contrast"].min() / MARGIN
    assert thresholds["focus_above"] == stats["focus"].max() * MARGIN
    assert quality_reasons(stats, thresholds) == [None] * 200
    softer = {**stats, "focus": stats["focus"] * 0.99}
    assert quality_reasons(softer, thresholds).count("out_of_focus") == 1  # only the softest falls below
