"""The stain evaluation protocol's variants (docs/stain_protocol.md), applied to preprocessed test images.

Each variant takes float32 RGB images in [0, 1] at the model's input size (the output of
`model.preprocess.preprocess`) and returns images of the same kind. Random variants draw one value
per image from `numpy.random.default_rng(seed)` in image order, so a (variant, seed) pair is the same
test set for every model.

The stain transfer maps each image to colour statistics no model is trained on: the Lab mean and
standard deviation of one BCCD field (normal blood, another laboratory, other microscope), drawn at
random per image, by Reinhard's transfer. The statistics are computed once from the BCCD images and
committed (`data/stain/bccd_lab_statistics.csv`), so evaluation does not need BCCD itself.

    python -m model stains --bccd ../shared/data/BCCD      # (re)writes the statistics file
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from model import data

VARIANTS = ("colour", "grayscale", "hue_full", "hue_far", "saturation", "bccd_transfer")
RANDOM_VARIANTS = ("hue_full", "hue_far", "saturation", "bccd_transfer")
HUE_FULL_DEG = (0.0, 360.0)
HUE_FAR_DEG = (90.0, 270.0)  # the far half of the circle: never inside a ±90° training jitter
SATURATION_FACTOR = (0.3, 1.7)
BCCD_STATS_FILE = data.SPLIT_DIR / "stain" / "bccd_lab_statistics.csv"
LAB_COLUMNS = ("L_mean", "a_mean", "b_mean", "L_sd", "a_sd", "b_sd")


def lab_statistics(rgb: np.ndarray) -> np.ndarray:
    """Per-channel mean and sd of an RGB float32 [0, 1] image in OpenCV's float Lab (L 0..100)."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb, np.float32), cv2.COLOR_RGB2LAB).reshape(-1, 3)
    return np.concatenate([lab.mean(0), lab.std(0)])


def bccd_statistics(bccd_root: Path) -> list[tuple[str, np.ndarray]]:
    """Lab statistics of every BCCD field (`JPEGImages/*.jpg`), whole field, as decoded."""
    files = sorted((bccd_root / "JPEGImages").glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no BCCD images under {bccd_root / 'JPEGImages'}")
    out = []
    for f in files:
        bgr = cv2.imread(str(f))
        if bgr is None:
            raise FileNotFoundError(f"cannot read {f}")
        out.append((f.name, lab_statistics(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0)))
    return out


def write_bccd_statistics(stats: list[tuple[str, np.ndarray]], path: Path = BCCD_STATS_FILE) -> Path:
    """The committed statistics file: one row per BCCD field."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", *LAB_COLUMNS])
        for name, s in stats:
            writer.writerow([name, *(f"{v:.4f}" for v in s)])
    return path


def read_bccd_statistics(path: Path = BCCD_STATS_FILE) -> np.ndarray:
    """(fields, 6) array of the committed BCCD Lab statistics."""
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m model stains --bccd DIR`")
    with path.open() as fh:
        return np.array([[float(row[c]) for c in LAB_COLUMNS] for row in csv.DictReader(fh)], np.float32)


def reinhard(rgb: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Reinhard et al. (2001) colour transfer in Lab: match each channel's mean and sd to `target`."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb, np.float32), cv2.COLOR_RGB2LAB)
    source = lab_statistics(rgb)
    lab = (lab - source[:3]) / np.maximum(source[3:], 1e-6) * target[3:] + target[:3]
    return np.clip(cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB), 0.0, 1.0)


def _hsv_shift(rgb: np.ndarray, hue_deg: float, saturation: float) -> np.ndarray:
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb, np.float32), cv2.COLOR_RGB2HSV)  # H 0..360, S 0..1
    hsv[..., 0] = (hsv[..., 0] + hue_deg) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 1.0)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)


def apply_variant(images: np.ndarray, variant: str, seed: int = 0, bccd: np.ndarray | None = None) -> np.ndarray:
    """The protocol variant of a batch of test images (N, H, W, 3) float32 in [0, 1]."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown stain variant {variant!r} (one of {', '.join(VARIANTS)})")
    if variant == "colour":
        return images
    if variant == "grayscale":
        return np.stack([cv2.cvtColor(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB) for im in images])
    rng = np.random.default_rng(seed)
    if variant == "bccd_transfer":
        targets = bccd if bccd is not None else read_bccd_statistics()
        picks = rng.integers(0, len(targets), len(images))
        return np.stack([reinhard(im, targets[k]) for im, k in zip(images, picks, strict=True)])
    if variant == "saturation":
        factors = rng.uniform(*SATURATION_FACTOR, len(images))
        return np.stack([_hsv_shift(im, 0.0, f) for im, f in zip(images, factors, strict=True)])
    low, high = HUE_FULL_DEG if variant == "hue_full" else HUE_FAR_DEG
    shifts = rng.uniform(low, high, len(images))
    return np.stack([_hsv_shift(im, h, 1.0) for im, h in zip(images, shifts, strict=True)])
