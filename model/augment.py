"""Training-side augmentation: random per sample, reproducible per seed, applied on the fly.

The paper's set (grayscale, histogram equalisation, flips, Gaussian blur, translation, shear,
rotation) plus colour jitter so a network cannot lean on the stain alone. Built from Keras
preprocessing layers; each draws its own parameters for every image of a batch.
"""

from __future__ import annotations

import keras
from keras import layers, ops

VALUE_RANGE = (0.0, 1.0)


class RandomApply(layers.Layer):
    """Apply `layer` to each image of a batch with probability `rate` (drawn per image)."""

    def __init__(self, layer: layers.Layer, rate: float, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layer = layer
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images):
        draw = keras.random.uniform((ops.shape(images)[0], 1, 1, 1), seed=self.seed_generator)
        return ops.where(draw < self.rate, self.layer(images), images)


def build_augmenter(seed: int, colour_jitter: bool = True) -> keras.Sequential:
    """The augmentation pipeline for batches of float32 RGB images in [0, 1]."""
    steps = [
        layers.RandomFlip("horizontal_and_vertical", seed=seed),
        layers.RandomRotation(0.5, fill_mode="reflect", seed=seed + 1),
        layers.RandomTranslation(0.05, 0.05, fill_mode="reflect", seed=seed + 2),
        layers.RandomShear(0.05, 0.05, fill_mode="reflect", seed=seed + 3),
        RandomApply(layers.RandomGaussianBlur(1.0, kernel_size=3, sigma=1.0, value_range=VALUE_RANGE,
                                              seed=seed + 4), rate=0.1, seed=seed + 5),
        RandomApply(layers.Equalization(value_range=VALUE_RANGE), rate=0.05, seed=seed + 6),
    ]
    if colour_jitter:
        # Hue and saturation only: brightness/contrast jitter on these mostly-white fields stalled
        # training at chance level in 4-epoch trials.
        steps += [
            layers.RandomSaturation((0.2, 0.8), value_range=VALUE_RANGE, seed=seed + 7),
            layers.RandomHue(0.5, value_range=VALUE_RANGE, seed=seed + 9),
        ]
    steps.append(layers.RandomGrayscale(0.3 if colour_jitter else 0.1, seed=seed + 8))
    return keras.Sequential(steps, name="augment")
