"""Binary diagnostic metrics (scikit-learn), shared by evaluation, classification, baseline and replay."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_score, roc_auc_score

from model.calibration import wilson


def binary_metrics(y_true, y_pred, scores=None) -> dict:
    """Counts and rates for binary labels (1 = ALL), Wilson 95 % intervals of sensitivity and
    specificity; ROC AUC when scores are given."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel())
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    result = {
        "n": len(y_true), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": (tp + tn) / len(y_true) if len(y_true) else float("nan"),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "sensitivity_ci95": list(wilson(tp, tp + fn)),
        "specificity": specificity,
        "specificity_ci95": list(wilson(tn, tn + fp)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
    }
    if scores is not None and len(set(y_true.tolist())) == 2:
        result["roc_auc"] = float(roc_auc_score(y_true, scores))
    return result


def with_intervals(tree):
    """A copy of a metrics tree in which every dict holding confusion counts also holds the Wilson
    95 % intervals of its sensitivity and specificity (for cards written before they were recorded)."""
    if isinstance(tree, list):
        return [with_intervals(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    out = {k: with_intervals(v) for k, v in tree.items()}
    if {"tp", "fn", "tn", "fp", "sensitivity"} <= out.keys():
        out["sensitivity_ci95"] = list(wilson(out["tp"], out["tp"] + out["fn"]))
        out["specificity_ci95"] = list(wilson(out["tn"], out["tn"] + out["fp"]))
    return out


def outcome(label: int, positive: bool) -> str:
    """The original project's wording for one image's result."""
    if positive:
        return ("Acute Lymphoblastic Leukemia correctly detected (True Positive)" if label
                else "Acute Lymphoblastic Leukemia incorrectly detected (False Positive)")
    return ("Acute Lymphoblastic Leukemia correctly not detected (True Negative)" if not label
            else "Acute Lymphoblastic Leukemia incorrectly not detected (False Negative)")


def summary_line(m: dict) -> str:
    """One line of the headline figures."""
    text = (f"TP {m['tp']} FP {m['fp']} TN {m['tn']} FN {m['fn']} | accuracy {m['accuracy']:.4f} "
            f"sensitivity {m['sensitivity']:.4f} specificity {m['specificity']:.4f} "
            f"balanced {m['balanced_accuracy']:.4f}")
    return text + (f" ROC AUC {m['roc_auc']:.4f}" if "roc_auc" in m else "")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy), (nan, nan) when n is 0."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)
