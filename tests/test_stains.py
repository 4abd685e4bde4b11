"""The stain protocol's variants do what docs/stain_protocol.md says, reproducibly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from model import protocol, stains
from model.augment import ColourAugmentation
from model.preprocess import preprocess_file


@pytest.fixture(scope="module")
def images(data_root):
    return np.stack([preprocess_file(data_root / p, 64) for p in
                     ("Benign/WBC-Benign-010.jpg", "Early/WBC-Malignant-Early-100.jpg", "Pre/WBC-Malignant-Pre-347.jpg")])


def _hue(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 0]


def test_variants_are_reproducible_and_in_range(images):
    for variant in stains.VARIANTS:
        a, b = stains.apply_variant(images, variant, 3), stains.apply_variant(images, variant, 3)
        np.testing.assert_array_equal(a, b)
        assert a.shape == images.shape and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    for variant in stains.RANDOM_VARIANTS:
        assert not np.allclose(stains.apply_variant(images, variant, 3), stains.apply_variant(images, variant, 4))
    grey = stains.apply_variant(images, "grayscale")
    assert np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 1], grey[..., 2])


def test_hue_far_turns_by_90_to_270_degrees(images):
    saturated = cv2.cvtColor(images[0], cv2.COLOR_RGB2HSV)[..., 1] > 0.3
    for seed in range(5):
        turned = stains.apply_variant(images[:1], "hue_far", seed)[0]
        shift = np.median(((_hue(turned) - _hue(images[0])) % 360)[saturated])
        assert 88 <= shift <= 272, shift


def test_bccd_transfer_takes_the_bccd_lab_statistics(images):
    bccd = stains.read_bccd_statistics()
    assert bccd.shape == (364, 6)
    out = stains.apply_variant(images, "bccd_transfer", 0, bccd)
    picks = np.random.default_rng(0).integers(0, len(bccd), len(images))
    for im, k in zip(out, picks, strict=True):
        np.testing.assert_allclose(stains.lab_statistics(im)[:3], bccd[k, :3], atol=3.0)  # clipping moves it a little


def test_unknown_variant_is_a_clear_error(images):
    with pytest.raises(ValueError, match="unknown stain variant"):
        stains.apply_variant(images, "sepia")


def test_coverage_marks_what_training_saw():
    shipped = protocol.coverage(ColourAugmentation().__dict__)  # cellnet: ±90°, saturation 0.25-4, grey 30 %
    assert shipped == {"colour": "seen", "grayscale": "seen", "hue_full": "partly", "hue_far": "unseen",
                       "saturation": "seen", "bccd_transfer": "unseen"}
    full = protocol.coverage(ColourAugmentation(hue_deg=180, saturation=(0.3, 1.7)).__dict__)
    assert full["hue_far"] == "seen" and full["bccd_transfer"] == "unseen"
    assert protocol.coverage(None)["hue_full"] == "unseen"
