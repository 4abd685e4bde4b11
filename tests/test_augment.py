"""Augmentation draws new parameters for every image, and the same seed gives the same draws."""

from __future__ import annotations

import numpy as np

from model.augment import build_augmenter
from model.preprocess import preprocess_file


def test_random_per_sample_and_reproducible_per_seed(data_root):
    image = preprocess_file(data_root / "Benign/WBC-Benign-001.jpg", 64)
    batch = np.stack([image] * 6)
    first = np.asarray(build_augmenter(11)(batch, training=True))
    again = np.asarray(build_augmenter(11)(batch, training=True))
    other = np.asarray(build_augmenter(12)(batch, training=True))
    np.testing.assert_allclose(first, again)
    assert not np.allclose(first, other)
    differences = [np.abs(first[0] - first[i]).mean() for i in range(1, 6)]
    assert min(differences) > 1e-3  # no two copies of the same image came out alike
    assert first.min() >= 0 and first.max() <= 1 and first.shape == batch.shape
