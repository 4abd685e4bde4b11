"""Images the model must not diagnose, built here and kept out of training and of every threshold.

* `failed_captures`: what a camera or a pipeline gets wrong, as encoded image bytes at the data
  set's own size (224x224): blank and solid frames, noise, gradients, and held-out smears spoiled by
  defocus (a pillbox point-spread function of several radii), over/under exposure and heavy JPEG.
* `photographs`: the photographs that ship with scikit-learn and scikit-image (offline).
* `bccd_fields` and `bccd_white_cells`: smear fields of another lab (BCCD, normal blood, another
  stain and camera) and crops centred on their annotated white cells: near-distribution.

Every item is bytes, so it goes through the one serving path (`model.preprocess.preprocess`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

SIZE = 224  # ALL_Aria2021's capture size
DEFOCUS_RADII = (5, 8, 12)  # pillbox radius in pixels of the 224 px capture (milder: see the sweep)
OVEREXPOSURE_GAINS = (2.5, 4.0)
UNDEREXPOSURE_GAINS = (0.15, 0.3)
JPEG_QUALITIES = (3, 6)

# Expected gate reason of each synthetic failure type (any of the set is right).
EXPECTED_REASONS = {
    "blank_white": {"overexposed"},
    "blank_black": {"underexposed"},
    "solid_colour": {"not_a_blood_smear", "overexposed", "underexposed"},
    "uniform_noise": {"not_a_blood_smear"},
    "gaussian_noise": {"not_a_blood_smear"},
    "gradient": {"not_a_blood_smear", "out_of_focus"},
    "defocus": {"out_of_focus", "unfamiliar_image"},
    "overexposed": {"overexposed"},
    "underexposed": {"underexposed"},
    "heavy_jpeg": {"heavily_compressed"},
}
SOLID_COLOURS = {"grey": (128, 128, 128), "red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
                 "smear_background": (225, 200, 215), "stain_purple": (110, 60, 150)}


def encode(rgb: np.ndarray, fmt: str = ".png", quality: int = 95) -> bytes:
    """RGB uint8 array -> encoded bytes (PNG, or JPEG at `quality`)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else []
    ok, buffer = cv2.imencode(fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"could not encode {fmt}")
    return buffer.tobytes()


def decode(data: bytes) -> np.ndarray:
    """Encoded bytes -> RGB uint8 at full resolution."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def defocus(rgb: np.ndarray, radius: int) -> np.ndarray:
    """Out-of-focus blur: convolution with a pillbox (disc) point-spread function."""
    kernel = np.zeros((2 * radius + 1, 2 * radius + 1), np.float32)
    cv2.circle(kernel, (radius, radius), radius, 1.0, -1)
    return cv2.filter2D(rgb, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)


def exposure(rgb: np.ndarray, gain: float) -> np.ndarray:
    """Exposure scaled by `gain` in linear light (sRGB decoded, scaled, re-encoded, clipped)."""
    linear = (rgb.astype(np.float32) / 255.0) ** 2.2 * gain
    return (np.clip(linear, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


def failed_captures(smears: list[bytes], seed: int = 0) -> dict[str, list[bytes]]:
    """Named sets of failed captures; the spoiled ones are built from the given (held-out) smears."""
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE, 3)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    sets: dict[str, list[bytes]] = {
        "blank_white": [encode(np.full(shape, 255, np.uint8)), encode(np.full(shape, 250, np.uint8), ".jpg")],
        "blank_black": [encode(np.zeros(shape, np.uint8)), encode(np.full(shape, 6, np.uint8), ".jpg")],
        "solid_colour": [encode(np.full(shape, c, np.uint8)) for c in SOLID_COLOURS.values()],
        "uniform_noise": [encode(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(4)],
        "gaussian_noise": [encode(np.clip(rng.normal(m, 40, shape), 0, 255).astype(np.uint8), ".jpg", 90)
                           for m in (90, 128, 170, 200)],
        "gradient": [encode(np.repeat(np.broadcast_to(ramp[None, :, None], (SIZE, SIZE, 1)), 3, 2).astype(np.uint8)),
                     encode(np.repeat(np.broadcast_to(ramp[:, None, None], (SIZE, SIZE, 1)), 3, 2).astype(np.uint8)),
                     encode(np.stack([np.broadcast_to(ramp[None, :], (SIZE, SIZE)),
                                      np.broadcast_to(ramp[:, None], (SIZE, SIZE)),
                                      np.full((SIZE, SIZE), 180.0)], -1).astype(np.uint8)),
                     encode(np.stack([np.full((SIZE, SIZE), 230.0), np.broadcast_to(ramp[::-1][None, :], (SIZE, SIZE)),
                                      np.broadcast_to(ramp[:, None], (SIZE, SIZE))], -1).astype(np.uint8))],
    }
    rgbs = [decode(b) for b in smears]
    for radius in DEFOCUS_RADII:
        sets[f"defocus_r{radius}"] = [encode(defocus(im, radius), ".jpg", 95) for im in rgbs]
    for gain in OVEREXPOSURE_GAINS:
        sets[f"overexposed_x{gain:g}"] = [encode(exposure(im, gain), ".jpg", 95) for im in rgbs]
    for gain in UNDEREXPOSURE_GAINS:
        sets[f"underexposed_x{gain:g}"] = [encode(exposure(im, gain), ".jpg", 95) for im in rgbs]
    for quality in JPEG_QUALITIES:
        sets[f"heavy_jpeg_q{quality}"] = [encode(im, ".jpg", quality) for im in rgbs]
    return sets


def failure_type(set_name: str) -> str:
    """`defocus_r5` -> `defocus`: the key of `EXPECTED_REASONS`."""
    return next(t for t in sorted(EXPECTED_REASONS, key=len, reverse=True) if set_name.startswith(t))


def photographs() -> dict[str, bytes]:
    """Photographs shipped inside scikit-learn and scikit-image (no download), as PNG bytes."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    images = dict(zip(("sklearn_china", "sklearn_flower"), load_sample_images().images, strict=True))
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "coins", "moon", "text", "page", "retina", "colorwheel", "logo", "brick", "grass", "gravel", "clock",
                 "checkerboard", "microaneurysms", "cell"):
        images[f"skimage_{name}"] = getattr(skdata, name)()
    out = {}
    for name, im in images.items():
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, 2)
        out[name] = encode(np.ascontiguousarray(im[..., :3]).astype(np.uint8))
    return out


def _white_cell_boxes(annotation: Path) -> list[tuple[int, int, int, int]]:
    root = ET.parse(annotation).getroot()
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name") == "WBC":
            b = obj.find("bndbox")
            boxes.append(tuple(int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def bccd(root: Path, limit: int | None = None) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """BCCD smear fields (JPEG bytes as shipped) and square crops centred on each annotated white cell,
    twice the box's longer side (ALL_Aria2021's captures are centred on one white cell)."""
    fields, crops = {}, {}
    for path in sorted((root / "JPEGImages").glob("*.jpg"))[:limit]:
        data = path.read_bytes()
        fields[path.stem] = data
        annotation = root / "Annotations" / f"{path.stem}.xml"
        if not annotation.exists():
            continue
        rgb = decode(data)
        h, w = rgb.shape[:2]
        for k, (x0, y0, x1, y1) in enumerate(_white_cell_boxes(annotation)):
            half = max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            crop = rgb[max(cy - half, 0):min(cy + half, h), max(cx - half, 0):min(cx + half, w)]
            if min(crop.shape[:2]) >= 32:
                crops[f"{path.stem}_wbc{k}"] = encode(crop, ".jpg", 95)
    return fields, crops
