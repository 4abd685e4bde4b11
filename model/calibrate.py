"""Fit the decision policy of an artifact folder: `python -m model calibrate --artifact DIR`
(also the last step of `python -m model train`).

On the artifacts' own outputs (int8 and float32 separately; `.keras` uses float32's):
* feature density on the TRAINING split (class-conditional Mahalanobis per feature piece);
* image-quality thresholds 25 % beyond the most extreme VALIDATION image and never short of the most
  extreme TRAINING or validation image (none of them refused: a validation split of whole capture
  blocks can miss a capture mode that training has); the focus floor is the softest validation image;
* on the VALIDATION split: the out-of-distribution threshold (gate refuses at most 0.5 % of validation
  images in all); the joint limit on colour x feature distance (`model.gate.joint_score`) 25 % beyond
  the validation image it passes with the highest product, never short of the highest training one;
  then on the images the gate passes: calibration (temperature and bias), the operating threshold (sensitivity
  >= 0.98) and the indeterminate band (decisions outside it reach sensitivity >= 0.995 and
  specificity >= 0.99, and it contains both the threshold and calibrated probability 0.5, so a
  decision's confidence is never below 0.5).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from model import data
from model.calibration import Calibration, choose_band, choose_threshold
from model.classifier import CARD_NAME, Classifier, file_sha256
from model.gate import (
    COLOUR_WIDTH,
    MARGIN,
    FeatureDensity,
    fit_quality_thresholds,
    image_statistics,
    joint_score,
    quality_reasons,
    save_densities,
    upper_limit,
)

MAX_GATE_REFUSAL = 0.005  # the issue allows 1 %; half leaves room for the band within 3 % in all
MIN_SENSITIVITY = 0.98  # operating threshold
BAND_SENSITIVITY, BAND_SPECIFICITY = 0.995, 0.99
MIN_JPEG_QUALITY = 20  # below it the network's answers degrade (see the card's compression sweep)
KINDS = ("int8", "float32")
NEVER_DECIDE = (0.0, 1.01)  # a band holding every probability
log = logging.getLogger(__name__)


def outputs(clf: Classifier, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """P(ALL) and features of every image, in batches."""
    p, f = [], []
    for i in range(0, len(images), batch_size):
        probabilities, features = clf.run(images[i:i + batch_size])
        if features is None:
            raise ValueError(f"{clf.path.name} has no feature output: re-export it (`python -m model export`)")
        p.append(clf.p_all(probabilities))
        f.append(features)
    return np.concatenate(p), np.concatenate(f)


def fit_band(labels: np.ndarray, p_all: np.ndarray, threshold: float, name: str) -> tuple[Calibration, tuple[float, float]]:
    """Calibration and indeterminate band on validation outputs; a model that cannot meet the band's
    targets anywhere never decides (and `name` is logged)."""
    try:
        calibration = Calibration.fit(p_all, labels)
        return calibration, choose_band(labels, p_all, (threshold, calibration.inverse(0.5)), BAND_SENSITIVITY,
                                        BAND_SPECIFICITY)
    except ValueError as exc:
        log.warning("%s: %s; every answer will be borderline", name, exc)
        return Calibration(), NEVER_DECIDE


def fit_policy(out_dir: Path, root: Path, seed: int = 42) -> dict:
    """Fit and store the decision policy of every artifact kind; returns the card's `decision` section."""
    card_path = out_dir / CARD_NAME
    card = json.loads(card_path.read_text())
    dataset, samples = data.load_dataset(root)
    splits = data.card_splits(card, dataset, samples, seed)
    limit = card.get("data", {}).get("limit_per_split")
    if limit:  # a smoke run's artifacts: fit on the subset it trained on
        rng = np.random.default_rng(card.get("training", {}).get("seed", seed))
        splits = {k: [v[i] for i in sorted(rng.permutation(len(v))[:limit])] for k, v in splits.items()}
    size = int(card["input_size"])
    images = {k: data.load_images(root, splits[k], size) for k in ("train", "val")}
    labels = {k: np.array([s.label for s in splits[k]]) for k in ("train", "val")}
    train_stats, val_stats = image_statistics(images["train"]), image_statistics(images["val"])
    colour = FeatureDensity.fit(train_stats["colour_vector"], np.zeros(len(images["train"])), [COLOUR_WIDTH])
    colour = colour.scaled(val_stats["colour_vector"])
    for stats in (train_stats, val_stats):
        stats["colour"] = colour.score(stats["colour_vector"])
    quality = fit_quality_thresholds(train_stats, val_stats)
    passed_quality = np.array([r is None for r in quality_reasons(val_stats, quality)])
    n_val = len(labels["val"])
    ood_budget = int(math.floor(MAX_GATE_REFUSAL * n_val)) - int((~passed_quality).sum())
    train_passed = np.array([r is None for r in quality_reasons(train_stats, quality)])
    section: dict = {"quality": quality, "min_jpeg_quality": MIN_JPEG_QUALITY}
    densities, fit_report = {"colour": colour}, {}
    for kind in KINDS:
        clf = Classifier.load(out_dir / card["artifacts"][kind]["file"], require_policy=False)
        p_train, f_train = outputs(clf, images["train"])
        p_val, f_val = outputs(clf, images["val"])
        density = FeatureDensity.fit(f_train, labels["train"], card["feature_segments"]).scaled(f_val[passed_quality])
        scores = density.score(f_val)
        candidates = np.sort(scores[passed_quality])[::-1]
        ood_threshold = float(candidates[max(ood_budget, 0)]) if len(candidates) > max(ood_budget, 0) else float("inf")
        answered = passed_quality & (scores <= ood_threshold)
        train_scores = density.score(f_train)
        joint = {"train": joint_score(train_stats["colour"], train_scores, quality["colour_above"], ood_threshold)[
                     train_passed & (train_scores <= ood_threshold)],
                 "validation": joint_score(val_stats["colour"], scores, quality["colour_above"], ood_threshold)[answered]}
        joint_threshold = upper_limit(joint["train"], joint["validation"])
        y, p = labels["val"][answered], p_val[answered]
        threshold = choose_threshold(y, p, MIN_SENSITIVITY)
        calibration, band = fit_band(y, p, threshold, f"{card['name']} {kind}")
        densities[kind] = density
        section[kind] = {"threshold": threshold, "band": list(band), "temperature": calibration.temperature,
                         "bias": calibration.bias, "ood_threshold": ood_threshold, "joint_threshold": joint_threshold}
        in_band = (p >= band[0]) & (p < band[1])
        fit_report[kind] = {"validation_images": n_val, "refused_quality": int((~passed_quality).sum()),
                            "refused_unfamiliar": int((passed_quality & ~answered).sum()),
                            "borderline": int(in_band.sum()),
                            "highest_joint_product": {k: float(v.max()) for k, v in joint.items()}}
    gate_file = out_dir / f"{card['name']}_gate.npz"
    save_densities(gate_file, densities)
    section["gate_file"] = {"file": gate_file.name, "sha256": file_sha256(gate_file)}
    section["validation_fit"] = fit_report
    section["rules"] = (f"quality thresholds {MARGIN - 1:.0%} beyond the most extreme validation image and never short "
                        f"of the most extreme training or validation image (the focus floor: the softest validation "
                        f"image); "
                        f"out-of-distribution score on the validation split (at most {MAX_GATE_REFUSAL:.1%} refused "
                        f"in all); joint colour x feature limit {MARGIN - 1:.0%} beyond the validation images and "
                        f"never short of the training images it passes; on the validation images it passes: "
                        f"temperature and bias by maximum likelihood, threshold = highest P(ALL) with sensitivity "
                        f">= {MIN_SENSITIVITY}, band = narrowest containing the threshold and calibrated 0.5 "
                        f"outside which sensitivity >= {BAND_SENSITIVITY} and specificity >= {BAND_SPECIFICITY}")
    card["decision"] = section
    card["threshold"] = section["int8"]["threshold"]
    card["operating_point"] = (f"highest P(ALL) threshold with validation sensitivity >= {MIN_SENSITIVITY}, chosen "
                               f"on the int8 artifact's own outputs (each artifact kind has its own in `decision`)")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return section
