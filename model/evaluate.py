"""Held-out evaluation (colour, grayscale, hue/saturation shifted), int8 agreement, plots and CV."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from model import data  # noqa: E402
from model.classifier import CARD_NAME, Classifier  # noqa: E402
from model.metrics import binary_metrics, with_intervals  # noqa: E402

STRESS_MODES = ("colour", "grayscale", "hue_saturation")
HUE_SHIFT_DEG = 90.0  # purple stain turned anywhere from red to blue


def stress(images: np.ndarray, mode: str, seed: int = 0) -> np.ndarray:
    """Test images as given, in grayscale, or each with a random hue shift (±90°) and saturation ×0.5–1.5."""
    if mode == "colour":
        return images
    if mode == "grayscale":
        return np.stack([cv2.cvtColor(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB) for im in images])
    rng = np.random.default_rng(seed)
    shifted = []
    for im in images:
        hsv = cv2.cvtColor(im, cv2.COLOR_RGB2HSV)  # float32: H in [0, 360), S in [0, 1]
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-HUE_SHIFT_DEG, HUE_SHIFT_DEG)) % 360
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
        shifted.append(np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1))
    return np.stack(shifted)


def predict(classifier: Classifier, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities for all images, in batches."""
    return np.concatenate([classifier.classify(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])


def score(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """Binary metrics at the card's threshold, and the positive decisions."""
    p_all = classifier.p_all(predict(classifier, images))
    decisions = p_all >= classifier.threshold
    return binary_metrics(labels, decisions, p_all), decisions


def evaluate_artifacts(out_dir: Path, root: Path, seed: int = 42) -> dict:
    """Score the float32 and int8 artifacts on the test split; store metrics and plots beside them."""
    card_path = out_dir / CARD_NAME
    card = json.loads(card_path.read_text())
    dataset, samples = data.load_dataset(root)
    test = data.card_splits(card, dataset, samples, seed)["test"]
    labels = np.array([s.label for s in test])
    images = data.load_images(root, test, int(card["input_size"]))
    metrics: dict = {"test_images": len(test)}
    decisions, p_all = {}, {}
    for kind in ("float32", "int8"):
        clf = Classifier.load(out_dir / card["artifacts"][kind]["file"])
        for mode in STRESS_MODES:
            result, decided = score(clf, stress(images, mode, seed), labels)
            metrics.setdefault(mode, {})[kind] = result
            decisions[kind, mode] = decided
        p_all[kind] = clf.p_all(predict(clf, images))
    metrics["int8_agreement"] = {m: float(np.mean(decisions["float32", m] == decisions["int8", m]))
                                 for m in STRESS_MODES}
    if len(card["classes"]) > 2:
        clf = Classifier.load(out_dir / card["artifacts"]["int8"]["file"])
        metrics["subtype"] = subtype_report(out_dir, card, [s.subtype for s in test], predict(clf, images))
    card["metrics"] = with_intervals({**card.get("metrics", {}), **metrics})
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    _plots(out_dir, card, labels, p_all["int8"], decisions["int8", "colour"])
    return card["metrics"]


def subtype_scores(names: list[str], subtypes: list[str], probabilities: np.ndarray) -> dict:
    """Per-class recall (Wilson 95 %) and precision, balanced accuracy and confusion matrix of argmax calls."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    from model.metrics import wilson_interval

    truth = np.array([names.index(s) for s in subtypes])
    predicted = probabilities.argmax(1)
    matrix = confusion_matrix(truth, predicted, labels=range(len(names)))
    per_class = {}
    for k, name in enumerate(names):
        n, hits, called = int(matrix[k].sum()), int(matrix[k, k]), int(matrix[:, k].sum())
        per_class[name] = {"n": n, "recall": hits / n if n else None, "recall_ci": wilson_interval(hits, n) if n else None,
                           "precision": hits / called if called else None}
    return {"accuracy": float(np.mean(truth == predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
            "confusion": matrix.tolist(), "per_class": per_class}


def subtype_report(out_dir: Path, card: dict, subtypes: list[str], probabilities: np.ndarray) -> dict:
    """`subtype_scores` of a multi-class head on the test split, and its confusion matrix PNG."""
    scores = subtype_scores(card["classes"], subtypes, probabilities)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ConfusionMatrixDisplay(np.array(scores["confusion"]), display_labels=card["classes"]).plot(ax=ax, colorbar=False)
    ax.set_title(f"{card['name']} int8, test split (argmax)")
    fig.savefig(out_dir / "confusion_subtype.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return scores


def _plots(out_dir: Path, card: dict, labels: np.ndarray, p_all: np.ndarray, decisions: np.ndarray) -> None:
    """ROC and confusion matrix of the served (int8) model; training curves from history.json."""
    fig, ax = plt.subplots(figsize=(5, 5))
    RocCurveDisplay.from_predictions(labels, p_all, name=f"{card['name']} int8", ax=ax)
    ax.set_title("ROC on the held-out test split")
    fig.savefig(out_dir / "roc.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    ConfusionMatrixDisplay.from_predictions(labels, decisions.astype(int), display_labels=["Benign", "ALL"],
                                            ax=ax, colorbar=False)
    ax.set_title(f"Test split, threshold {card['threshold']:.3f}")
    fig.savefig(out_dir / "confusion.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    history_path = out_dir / "history.json"
    if history_path.exists():
        history = json.loads(history_path.read_text())
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            ax.plot(history[key], label="train")
            ax.plot(history[f"val_{key}"], label="validation")
            ax.set_xlabel("epoch")
            ax.set_title(key)
            ax.legend()
        fig.savefig(out_dir / "training.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


def cross_validate(root: Path, arch: str, folds: int, seed: int, epochs: int | None = None) -> dict:
    """Stratified, duplicate-grouped k-fold CV of one recipe: mean and sd of each metric."""
    from model.calibration import choose_threshold
    from model.networks import INPUT_SIZES
    from model.train import MIN_SENSITIVITY, architecture, fit, p_all

    dataset, samples = data.load_dataset(root)
    groups = data.duplicate_groups(samples, data.duplicate_pairs(root))
    images = data.load_images(root, samples, INPUT_SIZES[architecture(arch)])
    labels = np.array([s.label for s in samples])
    per_fold = []
    for k, test_idx in enumerate(data.grouped_folds(samples, groups, folds, seed)):
        rest = np.setdiff1d(np.arange(len(samples)), test_idx)
        rest_samples = [samples[i] for i in rest]
        val_local = data.grouped_folds(rest_samples, groups[rest], 6, seed + k)[0]
        val_idx = rest[val_local]
        train_idx = np.setdiff1d(rest, val_idx)
        model, _ = fit(arch, images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], 2, seed + k, epochs)
        threshold = choose_threshold(labels[val_idx], p_all(model, images[val_idx]), MIN_SENSITIVITY)
        fold = {}
        for mode in STRESS_MODES:
            x = stress(images[test_idx], mode, seed)
            p_test = p_all(model, x)
            fold[mode] = binary_metrics(labels[test_idx], p_test >= threshold, p_test)
        per_fold.append(fold)
    keys = ("balanced_accuracy", "sensitivity", "specificity", "roc_auc")
    return {"folds": folds, "per_fold": per_fold,
            **{mode: {key: {"mean": float(np.mean([f[mode][key] for f in per_fold])),
                            "sd": float(np.std([f[mode][key] for f in per_fold]))} for key in keys}
               for mode in STRESS_MODES}}
