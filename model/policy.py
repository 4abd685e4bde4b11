"""The decision policy of one artifact, read from its model card: input gate -> calibrated
probability -> indeterminate band.

Card layout (written by `python -m model calibrate`):

    "decision": {
      "quality": {"contrast_below": ..., ...},        # image-quality thresholds (shared by all kinds)
      "min_jpeg_quality": 20,                           # for callers that pass the payload's JPEG quality
      "gate_file": {"file": "<name>_gate.npz", "sha256": "..."},   # feature and colour densities
      "int8": {"threshold": t, "band": [low, high], "temperature": T, "bias": b, "ood_threshold": s,
               "joint_threshold": j},                 # colour x feature distance (`model.gate.joint_score`)
      "float32": {...}                                  # the `.keras` artifact uses these too
    }

Without a `decision` section the policy is uncalibrated and `Classifier.load` refuses the artifact
(unless asked not to, which only fitting does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.calibration import Calibration
from model.gate import FeatureDensity, image_statistics, joint_score, load_density, quality_reasons

# Every reason an Indeterminate answer can carry (docs/protocol.md).
REASONS = ("underexposed", "overexposed", "low_contrast", "out_of_focus", "heavily_compressed", "not_a_blood_smear",
           "unfamiliar_colour", "unfamiliar_image", "borderline")


def borderline(p_all: np.ndarray, band: tuple[float, float], benign_on_top: np.ndarray | None = None) -> np.ndarray:
    """Images the band leaves undecided: P(ALL) inside [low, high) or not a number, or below the band while a
    leukaemia class is the most probable one (`benign_on_top` False), where a Negative would contradict the outputs."""
    low, high = band
    undecided = ~(p_all < low) & ~(p_all >= high)
    if benign_on_top is not None:
        undecided |= (p_all < low) & ~np.asarray(benign_on_top, bool)
    return undecided


@dataclass(frozen=True)
class Decision:
    label: str
    reason: str | None
    confidence: float | None
    ood_score: float | None


@dataclass(frozen=True)
class DecisionPolicy:
    """What turns one image's outputs into Positive, Negative or Indeterminate (with a reason)."""

    calibrated: bool
    threshold: float = 0.5
    band: tuple[float, float] = (0.5, 0.5)
    calibration: Calibration = Calibration()
    quality: dict | None = None
    min_jpeg_quality: int = 0
    density: FeatureDensity | None = None
    colour_density: FeatureDensity | None = None
    ood_threshold: float = float("inf")
    joint_threshold: float = float("inf")  # cards fitted before the joint rule have none: the rule is off

    @classmethod
    def from_card(cls, card: dict, kind: str, folder: Path) -> DecisionPolicy:
        section = card.get("decision")
        if not section:
            return cls(calibrated=False)
        entry = section["float32" if kind == "keras" else kind]
        gate_file = folder / section["gate_file"]["file"]
        if not gate_file.is_file():
            raise FileNotFoundError(f"gate file {gate_file} named by the model card does not exist")
        from model.classifier import file_sha256

        if file_sha256(gate_file) != section["gate_file"]["sha256"]:
            raise ValueError(f"gate file {gate_file} does not match the SHA-256 in the model card")
        joint_threshold = float(entry.get("joint_threshold", "inf"))  # cards fitted before the joint rule: off
        if not joint_threshold > 0:
            raise ValueError(f"joint_threshold {joint_threshold} in the model card is not a positive number")
        return cls(calibrated=True, threshold=float(entry["threshold"]), band=(float(entry["band"][0]),
                   float(entry["band"][1])), calibration=Calibration(float(entry["temperature"]), float(entry["bias"])),
                   quality=dict(section["quality"]), min_jpeg_quality=int(section["min_jpeg_quality"]),
                   density=load_density(gate_file, "float32" if kind == "keras" else kind),
                   colour_density=load_density(gate_file, "colour"), ood_threshold=float(entry["ood_threshold"]),
                   joint_threshold=joint_threshold)

    def quality_statistics(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """`model.gate.image_statistics` plus `colour`, the distance to the training smears' colour."""
        stats = image_statistics(batch)
        stats["colour"] = self.colour_density.score(stats["colour_vector"])
        return stats

    def gate(self, batch: np.ndarray, features: np.ndarray | None,
             jpeg_quality: Sequence[int | None] | None = None) -> tuple[list[str | None], np.ndarray | None]:
        """Gate reason (or None) and out-of-distribution score per image. `unfamiliar_image` is given when the
        feature score passes its limit, or when colour and features are unusual together (`joint_score` passes
        the joint limit: then the score returned can lie below its own limit)."""
        stats = self.quality_statistics(batch)
        reasons = quality_reasons(stats, self.quality)
        if jpeg_quality is not None:  # a fact of the payload: it names the reason before the tensor's symptoms
            reasons = [("heavily_compressed" if q is not None and q < self.min_jpeg_quality else r)
                       for r, q in zip(reasons, jpeg_quality, strict=True)]
        scores = None
        if self.density is not None and features is not None:
            scores = self.density.score(features)
            joint = joint_score(stats["colour"], scores, self.quality["colour_above"], self.ood_threshold)
            familiar = (scores <= self.ood_threshold) & (joint <= self.joint_threshold)  # false for NaN: closed
            reasons = [r or (None if ok else "unfamiliar_image") for r, ok in zip(reasons, familiar, strict=True)]
        return reasons, scores

    def decide(self, batch: np.ndarray, p_all: np.ndarray, features: np.ndarray | None,
               jpeg_quality: Sequence[int | None] | None = None, benign_on_top: np.ndarray | None = None) -> list[Decision]:
        """Gate, band, then the answer. `benign_on_top` (per image: is Benign the most probable class?) keeps
        a Negative from contradicting the outputs: a multi-class head's band can start above 0.5, and a
        leukaemia subtype can lead wherever P(ALL) > 0.5; such an image is `borderline`."""
        if not self.calibrated:
            raise ValueError("no decision policy: run `python -m model calibrate` on this artifact")
        reasons, scores = self.gate(batch, features, jpeg_quality)
        q = self.calibration(p_all)
        high = self.band[1]
        undecided = borderline(np.asarray(p_all), self.band, benign_on_top)
        out = []
        for i, (reason, p) in enumerate(zip(reasons, p_all, strict=True)):
            score = None if scores is None else float(scores[i])
            if reason is None and undecided[i]:
                reason = "borderline"
            if reason is not None:
                out.append(Decision("Indeterminate", reason, None, score))
            elif p >= high:
                out.append(Decision("Positive", None, float(q[i]), score))
            else:
                out.append(Decision("Negative", None, float(1 - q[i]), score))
        return out
