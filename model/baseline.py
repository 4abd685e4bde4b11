"""The stain shortcut, measured: logistic regression on global colour statistics (no cells involved)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model import data
from model.metrics import binary_metrics

BASELINE_SIZE = 224


def colour_statistics(images: np.ndarray, grayscale: bool = False) -> np.ndarray:
    """Per channel mean, sd and 5th/50th/95th percentiles: 15 features in RGB, 5 in grayscale."""
    if grayscale:
        images = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in images])[..., None]
    flat = images.reshape(len(images), -1, images.shape[-1])
    stats = [flat.mean(1), flat.std(1), *np.percentile(flat, [5, 50, 95], axis=1)]
    return np.concatenate(stats, axis=1)


def run_baseline(root: Path, seed: int = 42) -> dict[str, dict]:
    """Fit on the train split, score the test split, in colour and in grayscale."""
    dataset, samples = data.load_dataset(root)
    splits = data.load_splits(dataset, samples, seed)
    images = {k: data.load_images(root, splits[k], BASELINE_SIZE) for k in ("train", "test")}
    labels = {k: np.array([s.label for s in splits[k]]) for k in ("train", "test")}
    results = {}
    for name, gray in (("colour_statistics", False), ("grayscale_statistics", True)):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        clf.fit(colour_statistics(images["train"], gray), labels["train"])
        features = colour_statistics(images["test"], gray)
        results[name] = binary_metrics(labels["test"], clf.predict(features), clf.predict_proba(features)[:, 1])
    return results
