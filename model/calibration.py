"""Calibrated probability, operating threshold and indeterminate band, and the statistics that
describe them (expected calibration error, Wilson intervals, predictive values).

NumPy only at serving time; fitting uses scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-6
ECE_BINS = 15


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


@dataclass(frozen=True)
class Calibration:
    """q = sigmoid(logit(P(ALL)) / temperature + bias): temperature scaling with a bias term (Platt
    scaling of the logit). The bias is needed because the network was trained with balanced class
    weights while the validation split is 85 % ALL."""

    temperature: float = 1.0
    bias: float = 0.0

    @classmethod
    def fit(cls, p_all: np.ndarray, labels: np.ndarray) -> Calibration:
        """Maximum likelihood on validation outputs (a practically unpenalised logistic regression)."""
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1e6, max_iter=1000).fit(logit(p_all)[:, None], labels)
        slope = float(model.coef_[0, 0])
        if slope <= 0:
            raise ValueError("calibration slope is not positive: the scores do not rank the classes")
        return cls(1.0 / slope, float(model.intercept_[0]))

    def __call__(self, p_all: np.ndarray) -> np.ndarray:
        return sigmoid(logit(p_all) / self.temperature + self.bias)

    def inverse(self, q: float) -> float:
        """The raw P(ALL) whose calibrated probability is q."""
        return float(sigmoid((logit(np.array(q)) - self.bias) * self.temperature))


def choose_threshold(labels: np.ndarray, p_all: np.ndarray, min_sensitivity: float) -> float:
    """Highest threshold on P(ALL) whose sensitivity on these labels reaches `min_sensitivity`."""
    positives = np.sort(p_all[labels == 1])
    allowed_misses = int(math.floor(len(positives) * (1 - min_sensitivity) + 1e-9))
    return float(positives[allowed_misses])


def choose_band(labels: np.ndarray, p_all: np.ndarray, must_contain: tuple[float, ...], min_sensitivity: float,
                min_specificity: float) -> tuple[float, float]:
    """The narrowest band [low, high) on P(ALL) (fewest images inside) that contains every value of
    `must_contain` and outside which the decisions (>= high: Positive, < low: Negative) reach the
    given sensitivity and specificity on these labels."""
    lo_max, hi_min = min(must_contain), max(must_contain)
    values = np.unique(p_all)
    lows = np.concatenate([values[values <= lo_max], [lo_max]])
    highs = np.concatenate([[hi_min], values[values > hi_min], [np.inf]])
    best = None
    for low in lows:
        for high in highs:
            if high < low:
                continue
            inside = (p_all >= low) & (p_all < high)
            positive, negative = p_all >= high, p_all < low
            tp, fn = np.sum(positive & (labels == 1)), np.sum(negative & (labels == 1))
            tn, fp = np.sum(negative & (labels == 0)), np.sum(positive & (labels == 0))
            if tp + fn == 0 or tn + fp == 0:
                continue
            if tp / (tp + fn) >= min_sensitivity and tn / (tn + fp) >= min_specificity:
                count = int(inside.sum())
                if best is None or count < best[0]:
                    best = (count, float(low), float(high))
                break  # a higher `high` only adds images to the band
    if best is None:
        raise ValueError("no indeterminate band reaches the sensitivity and specificity asked for")
    return best[1], best[2]


def expected_calibration_error(probability: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |observed frequency - predicted probability| over equal-width bins, weighted by count."""
    probability, outcome = np.asarray(probability, float), np.asarray(outcome, float)
    index = np.minimum((probability * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(outcome[members].mean() - probability[members].mean())
    return float(total / max(len(probability), 1))


def reliability(probability: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per non-empty bin: mean predicted probability, observed frequency, count."""
    index = np.minimum((np.asarray(probability) * bins).astype(int), bins - 1)
    rows = [(probability[index == b].mean(), outcome[index == b].mean(), int((index == b).sum()))
            for b in range(bins) if (index == b).any()]
    return tuple(np.array(c) for c in zip(*rows, strict=True)) if rows else (np.array([]),) * 3


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) at a prevalence, by Bayes' rule."""
    tp, fn = sensitivity * prevalence, (1 - sensitivity) * prevalence
    tn, fp = specificity * (1 - prevalence), (1 - specificity) * (1 - prevalence)
    return tp / (tp + fp) if tp + fp else float("nan"), tn / (tn + fn) if tn + fn else float("nan")
