"""The input gate: cheap image-quality checks on the preprocessed tensor and an out-of-distribution
score on the network's own features.

All of it is NumPy on the tensor that `model.preprocess.preprocess` gives (size x size x 3, float32
in [0, 1]) and on the feature output of the same LiteRT invocation, so serving stays one invocation
per batch and never imports TensorFlow. Thresholds are fitted on the training and validation splits by
`model.calibrate`; the fitted feature density sits beside the artifact (`<name>_gate.npz`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import cv2
import numpy as np

# (reason, statistic, refuse when the statistic is "below" or "above" its threshold, or "blank": below
# the fixed BLANK_CONTRAST), in the order
# they are tried: the first that fails names the reason, and each names what its statistic sees. Defocus
# comes first (a blurred bright field also clips more pixels). Underexposure comes before low contrast (luma
# contrast falls with the light: at x0.3 exposure 9 of 43 held-out smears were called flat) but after the
# exposure-invariant colour checks, so a dark photograph is refused for its colour, a dark smear as
# "underexposed". The colour checks see a colour unlike the stained smears the model learnt from: another
# laboratory's stain or camera, a grayscale capture, or a frame that is no smear; they cannot tell these
# apart, so the reason does not claim to.
QUALITY_RULES = (
    ("blank", "contrast", "blank"),               # blank or solid frames: named by their brightness
    ("out_of_focus", "focus", "below"),
    ("overexposed", "clipped", "above"),
    ("overexposed", "brightness", "above"),
    ("not_a_blood_smear", "focus", "above"),      # more fine detail than any smear: noise, text, textures
    ("unfamiliar_colour", "saturation", "below"),  # no stain colour: grey frames, grayscale captures
    ("unfamiliar_colour", "colour", "above"),     # colour unlike the stained smears (distance, see below)
    ("underexposed", "brightness", "below"),
    ("low_contrast", "contrast", "below"),        # flatter than any smear (dim or washed-out captures, flat frames)
)
BLANK_CONTRAST = 0.01  # luma standard deviation of a blank frame (2.5 grey levels; smears: >= 0.05)
DARK_FLAT, BRIGHT_FLAT = 0.15, 0.85  # a blank frame darker / brighter than this is under- / overexposed
MARGIN = 1.25  # a threshold sits at least this factor beyond the most extreme validation image
# ... and never short of the most extreme image the model learnt from (training and validation: a validation
# split of whole capture blocks missed a grainy capture mode of 57 training images). The margin keeps the
# exposure limits where the network still reads (the darkest training smear sets a floor 17 % higher, which
# called 22 of 43 held-out smears at x0.7 exposure underexposed, where the network alone is right on 0.953,
# and turned one held-out Negative, Benign-230, into a refusal).
# The focus floor is a capture-quality limit instead: the softest VALIDATION image. A 5 px defocus at 224 px
# overlaps the softest real captures (served default, grouped split, radius-5 defocus of the 506 test images:
# with the floor 25 % lower 8 were decided, at the softest training image (0.063) 5, at the softest validation
# image (0.067) none; 1 of the 2,261 training images lies below it and is refused as out_of_focus).
COLOUR_WIDTH = 3


def _statistics(image: np.ndarray) -> tuple[float, ...]:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    mean = cv2.mean(grey)[0]
    std = max(cv2.norm(grey, cv2.NORM_L2SQR) / grey.size - mean * mean, 0.0) ** 0.5  # faster than meanStdDev
    laplacian = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)
    focus = cv2.norm(laplacian, cv2.NORM_L2SQR) / grey.size / max(std * std, 1e-8)  # its mean is ~0
    clipped = cv2.countNonZero(cv2.compare(grey, 0.9999, cv2.CMP_GE)) / grey.size  # white in all channels
    saturation = cv2.mean(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))[1]
    linear = np.array(cv2.mean(cv2.multiply(image, image))[:3])  # ~linear light (gamma 2)
    r, g = linear[:2] / max(linear.sum(), 1e-6)
    return mean, std, focus, clipped, saturation, r, g, saturation


def image_statistics(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image quality statistics of a preprocessed batch (N, size, size, 3) RGB float32 in [0, 1].

    * `brightness`, `contrast`: mean and standard deviation of luma.
    * `focus`: mean square of the 4-neighbour Laplacian of luma over the variance of luma; a
      defocused capture keeps its coarse contrast and loses the fine detail, whatever its exposure.
    * `clipped`: share of pixels clipped to white in every channel.
    * `saturation`: mean HSV saturation (the stain), unchanged by exposure.
    * `colour_vector`: chromaticity (r, g) of the mean linear-light colour and the mean saturation
      (unchanged by exposure); `colour` is its distance to the training smears (`model.policy`).

    OpenCV per image: about 0.05 ms for a 128 px image on this machine.
    """
    rows = np.array([_statistics(image) for image in batch], np.float32).reshape(len(batch), -1)
    return {"brightness": rows[:, 0], "contrast": rows[:, 1], "focus": rows[:, 2], "clipped": rows[:, 3],
            "saturation": rows[:, 4], "colour_vector": rows[:, 5:]}


def fit_quality_thresholds(train: dict[str, np.ndarray], validation: dict[str, np.ndarray]) -> dict[str, float]:
    """Each rule's threshold `MARGIN` beyond the most extreme `validation` image or at the most extreme image
    the model learnt from (`train` or `validation`), whichever refuses less, so none of them fails a check;
    but the focus floor at the softest validation image. The upper brightness limit, bounded by 1, moves a
    fifth of the way to 1 instead of by the margin."""
    thresholds = {}
    for _, stat, side in QUALITY_RULES:
        reference = validation[stat]
        values = np.concatenate([train[stat], reference])
        if side == "blank":
            value = BLANK_CONTRAST
        elif side == "above" and stat == "brightness":
            value = float(max(values.max(), reference.max() + (1 - reference.max()) / 5))
        elif stat == "focus" and side == "below":
            value = float(reference.min())
        elif side == "below":
            value = float(min(values.min(), reference.min() / MARGIN))
        else:
            value = upper_limit(train[stat], reference)
        thresholds[f"{stat}_{side}"] = value
    return thresholds


def upper_limit(train: np.ndarray, validation: np.ndarray) -> float:
    """`MARGIN` beyond the highest validation value, or the highest value learnt from, whichever refuses less
    (for non-negative statistics; `validation` must not be empty)."""
    return float(max(train.max(initial=0.0), validation.max() * MARGIN))


def joint_score(colour: np.ndarray, ood: np.ndarray, colour_limit: float, ood_limit: float) -> np.ndarray:
    """Colour distance and feature-density score, each over its own limit, multiplied: large only when both
    are. Smears of another laboratory that pass both limits tend to lie near both; this data set's own
    smears were measured near one at most (docs/trust.md)."""
    return (colour / colour_limit) * (ood / ood_limit)


def quality_reasons(stats: dict[str, np.ndarray], thresholds: dict[str, float]) -> list[str | None]:
    """The first failed quality rule's reason per image, or None (`stats` must hold `colour`). Fails closed: a
    statistic that is not a finite number fails the first rule that reads it."""
    finite = {stat: np.where(np.isfinite(stats[stat]), stats[stat], np.nan) for _, stat, _ in QUALITY_RULES}
    failed = np.stack([~(finite[stat] <= thresholds[f"{stat}_{side}"]) if side == "above"
                       else ~(finite[stat] >= thresholds[f"{stat}_{side}"]) for _, stat, side in QUALITY_RULES])
    first = failed.argmax(0)
    reasons: list[str | None] = []
    for i, rule in enumerate(first):
        reason = QUALITY_RULES[rule][0] if failed[rule, i] else None
        if reason == "blank":
            b = stats["brightness"][i]
            reason = "underexposed" if b < DARK_FLAT else "overexposed" if b > BRIGHT_FLAT else "not_a_blood_smear"
        reasons.append(reason)
    return reasons


def _whitener(covariance: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """W with W W^T = covariance^-1, from its eigen-decomposition; eigenvalues below `floor` x the largest
    are raised to it (dead channels give a singular covariance, where a Cholesky factor does not exist)."""
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, floor * values.max())
    return (vectors / np.sqrt(values)).astype(np.float32)


@dataclass(frozen=True)
class FeatureDensity:
    """Class-conditional Gaussians with a shared (Ledoit-Wolf shrunk) covariance per feature piece
    (Lee et al., 2018): the score of an image is the largest, over pieces, of its Mahalanobis distance
    to the nearest class mean divided by that piece's median distance on the validation split."""

    segments: tuple[int, ...]
    means: tuple[np.ndarray, ...]        # per piece: (classes, width)
    whiteners: tuple[np.ndarray, ...]    # per piece: W with W W^T = precision
    scales: tuple[float, ...]

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, segments: list[int]) -> FeatureDensity:
        from sklearn.covariance import LedoitWolf

        means, whiteners = [], []
        for piece in _split(features, segments):
            classes = np.unique(labels)
            mu = np.stack([piece[labels == c].mean(0) for c in classes])
            residuals = np.concatenate([piece[labels == c] - mu[k] for k, c in enumerate(classes)])
            covariance = LedoitWolf().fit(residuals).covariance_
            means.append(mu.astype(np.float32))
            whiteners.append(_whitener(covariance))
        return cls(tuple(segments), tuple(means), tuple(whiteners), tuple(1.0 for _ in segments))

    @cached_property
    def _stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block-diagonal whitener, whitened class means (classes, width) and piece starts."""
        whitener = np.zeros((sum(self.segments),) * 2, np.float32)
        starts = np.concatenate([[0], np.cumsum(self.segments)[:-1]]).astype(int)
        for start, width, w in zip(starts, self.segments, self.whiteners, strict=True):
            whitener[start:start + width, start:start + width] = w
        means = np.concatenate(self.means, axis=1) @ whitener
        return whitener, means, starts

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, pieces) Mahalanobis distance to the nearest class mean, per piece, unscaled."""
        if features.shape[1] != sum(self.segments):
            raise ValueError(f"features of width {features.shape[1]} do not match pieces {self.segments}")
        whitener, means, starts = self._stacked
        _single_threaded_blas()
        z = features.astype(np.float32) @ whitener
        squared = np.square(z[:, None, :] - means[None])  # (N, classes, width)
        return np.sqrt(np.add.reduceat(squared, starts, axis=2).min(1))

    def scaled(self, validation_features: np.ndarray) -> FeatureDensity:
        """The same density with each piece's scale set to its median validation distance."""
        medians = np.median(self.distances(validation_features), 0)
        return FeatureDensity(self.segments, self.means, self.whiteners, tuple(float(m) for m in medians))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Out-of-distribution score per image (1 is a typical validation image)."""
        return (self.distances(features) / np.asarray(self.scales, np.float32)).max(1)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}segments": np.asarray(self.segments), f"{prefix}scales": np.asarray(self.scales)}
        for k, (mu, w) in enumerate(zip(self.means, self.whiteners, strict=True)):
            out[f"{prefix}means_{k}"], out[f"{prefix}whitener_{k}"] = mu, w
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> FeatureDensity:
        segments = tuple(int(s) for s in arrays[f"{prefix}segments"])
        return cls(segments, tuple(arrays[f"{prefix}means_{k}"] for k in range(len(segments))),
                   tuple(arrays[f"{prefix}whitener_{k}"] for k in range(len(segments))),
                   tuple(float(s) for s in arrays[f"{prefix}scales"]))


@cache
def _single_threaded_blas() -> None:
    """Limit NumPy's BLAS to one thread, once per process: its threads would otherwise fight
    LiteRT's for the cores after every invocation (measured: 4 ms instead of 0.01 ms per batch of 8
    on this 2-core machine). Serving processes do no other BLAS work."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _split(features: np.ndarray, segments: list[int]) -> list[np.ndarray]:
    if sum(segments) != features.shape[1]:
        raise ValueError(f"features of width {features.shape[1]} do not match pieces {segments}")
    return np.split(features.astype(np.float32), np.cumsum(segments)[:-1], axis=1)


def save_densities(path: Path, densities: dict[str, FeatureDensity]) -> None:
    """One `.npz` (no pickles) holding named densities (`colour`, and one per artifact kind)."""
    arrays: dict[str, np.ndarray] = {}
    for kind, density in densities.items():
        arrays.update(density.arrays(f"{kind}/"))
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


def load_density(path: Path, name: str) -> FeatureDensity:
    with np.load(path, allow_pickle=False) as npz:
        return FeatureDensity.from_arrays({k: npz[k] for k in npz.files if k.startswith(f"{name}/")}, f"{name}/")
