"""Where the served model looked: occlusion sensitivity on the serving path (LiteRT, one invocation).

The input is copied once per position of an occluding patch (a quarter of the side, moved an eighth
at a time: 49 positions) filled by the image's mean colour; the original and all copies go through
the served artifact in ONE batched invocation, and the heat of a cell is how much hiding it lowers,
on average over the patches that cover it, the probability of the class the model chose.

Why occlusion and not Grad-CAM: Grad-CAM needs gradients, which a `.tflite` file has not; it would
mean shipping and loading a second, float32 gradient graph (not the int8 model that answers), and
explaining that graph instead of the served one. Occlusion explains the served int8 artifact itself
with nothing added, at the cost of 50 forward passes in one batch (about 30-40 ms on this 2-core
machine, `bench/trust.py`; a Pi 4 core is several times slower, so some hundreds of ms there),
acceptable for an answer that is asked for, not sent with every diagnosis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np

from model.classifier import Classifier

GRID = 8          # heat cells per side (16 px of a 128 px input)
PATCH_CELLS = 2   # each occluding patch covers 2x2 cells and moves one cell at a time: 7x7 = 49 patches
METHOD = (f"occlusion sensitivity: {GRID - PATCH_CELLS + 1}x{GRID - PATCH_CELLS + 1} overlapping mean-colour patches of "
          f"{PATCH_CELLS}/{GRID} of the side, one LiteRT invocation")


@dataclass(frozen=True)
class Explanation:
    method: str
    png: bytes
    ms: float


def _edges(size: int) -> np.ndarray:
    return np.linspace(0, size, GRID + 1).round().astype(int)


def occlusion_batch(tensor: np.ndarray) -> np.ndarray:
    """The tensor followed by one copy per patch position, that patch filled by the image's mean colour."""
    edges = _edges(tensor.shape[0])
    steps = GRID - PATCH_CELLS + 1
    fill = tensor.reshape(-1, 3).mean(0)
    batch = np.repeat(tensor[None], steps * steps + 1, axis=0)
    for row in range(steps):
        for col in range(steps):
            batch[1 + row * steps + col, edges[row]:edges[row + PATCH_CELLS], edges[col]:edges[col + PATCH_CELLS]] = fill
    return batch


def heat_grid(classifier: Classifier, tensor: np.ndarray) -> np.ndarray:
    """(GRID, GRID) mean drop in the probability of the chosen class over the patches covering each
    cell (>= 0). All zero when no patch moves the output (a saturated int8 answer)."""
    p_all = classifier.p_all(classifier.classify(occlusion_batch(tensor)))
    score = p_all if p_all[0] >= classifier.threshold else 1.0 - p_all
    steps = GRID - PATCH_CELLS + 1
    drops = np.clip(score[0] - score[1:], 0, None).reshape(steps, steps)
    heat, cover = np.zeros((GRID, GRID)), np.zeros((GRID, GRID))
    for dr in range(PATCH_CELLS):
        for dc in range(PATCH_CELLS):
            heat[dr:dr + steps, dc:dc + steps] += drops
            cover[dr:dr + steps, dc:dc + steps] += 1
    return heat / cover


def render(heat: np.ndarray, out_size: tuple[int, int]) -> bytes:
    """An RGBA PNG of `out_size` (width, height): jet colours, alpha growing with the heat, so it
    can be laid over the original image as it is."""
    width, height = out_size
    peak = float(heat.max())
    normalised = (heat / peak if peak > 0 else heat).astype(np.float32)
    smooth = np.clip(cv2.resize(normalised, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)
    grey = (smooth * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_JET)
    alpha = (np.sqrt(smooth) * 200).astype(np.uint8)
    ok, buffer = cv2.imencode(".png", np.dstack([bgr, alpha]))
    if not ok:
        raise ValueError("could not encode the heat map")
    return buffer.tobytes()


def explain(classifier: Classifier, tensor: np.ndarray, out_size: tuple[int, int]) -> Explanation:
    """Heat map of one preprocessed image (size x size x 3) as a PNG of `out_size` (width, height)."""
    if tensor.ndim != 3 or tensor.shape[:2] != (classifier.input_size, classifier.input_size):
        raise ValueError(f"want one {classifier.input_size}x{classifier.input_size}x3 tensor, got {tensor.shape}")
    width, height = (int(v) for v in out_size)
    if width < 1 or height < 1:
        raise ValueError(f"output size {out_size} is not positive")
    start = time.perf_counter()
    png = render(heat_grid(classifier, np.ascontiguousarray(tensor, np.float32)), (width, height))
    return Explanation(METHOD, png, (time.perf_counter() - start) * 1000)


def nucleus_mask(tensor: np.ndarray) -> np.ndarray:
    """Stain-based nucleus mask: the Romanowsky-stained nuclei are the most saturated objects of a
    field; HSV saturation above Otsu's threshold (at least 0.3), opened by a 3x3 square."""
    saturation = (cv2.cvtColor(np.ascontiguousarray(tensor, np.float32), cv2.COLOR_RGB2HSV)[..., 1] * 255).astype(np.uint8)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (saturation > max(otsu, 0.3 * 255)).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)


def nucleus_share(heat: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(share of the heat on nucleus pixels, share of the image the nuclei cover, the highest share a
    heat map of this grid can reach: heat in proportion to each cell's nucleus content)."""
    size = mask.shape[0]
    full = cv2.resize(heat.astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST)
    total = float(full.sum())
    edges = _edges(size)
    cells = np.array([[mask[edges[r]:edges[r + 1], edges[c]:edges[c + 1]].mean() for c in range(GRID)]
                      for r in range(GRID)])
    ceiling = float((cells ** 2).sum() / cells.sum()) if cells.sum() > 0 else float("nan")
    return (float(full[mask].sum()) / total if total > 0 else float("nan")), float(mask.mean()), ceiling
