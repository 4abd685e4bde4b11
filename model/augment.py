"""Training-side augmentation: random per sample, reproducible per seed, applied on the fly.

The paper's set (grayscale, histogram equalisation, flips, Gaussian blur, translation, shear,
rotation) plus colour jitter so a network cannot lean on the stain alone. Built from Keras
preprocessing layers; each draws its own parameters for every image of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

from model.stains import lab_statistics, reinhard

VALUE_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class ColourAugmentation:
    """Colour jitter of a recipe, in the stain protocol's units (docs/stain_protocol.md).

    `hue_deg`: largest hue turn either way; `saturation`: range of the saturation factor;
    `grayscale`: share of images made grey; `optical_density`: largest relative change of each RGB
    channel's optical density (stain amount per wavelength), 0 = off; `lab_statistics`: share of
    images given random Lab statistics of the training set (`RandomLabStatistics`), 0 = off;
    `grayscale_first`: grey the original image, not one whose hue was turned (a turned purple can be
    a yellow that vanishes in grey).
    """

    hue_deg: float = 90.0
    saturation: tuple[float, float] = (0.25, 4.0)
    grayscale: float = 0.3
    optical_density: float = 0.0
    lab_statistics: float = 0.0
    grayscale_first: bool = False


class RandomLabStatistics:
    """RandStainNA (Shen et al. 2022): with probability `rate`, Reinhard-transfer an image to Lab
    statistics drawn from a normal distribution fitted to the training images' own statistics.

    Numpy and OpenCV (run inside `tf.numpy_function`); only training images define the distribution.
    """

    def __init__(self, train_images: np.ndarray, rate: float, seed: int) -> None:
        stats = np.array([lab_statistics(im) for im in train_images])
        self.mean, self.sd = stats.mean(0), stats.std(0)
        self.rate = rate
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        targets = self.rng.normal(self.mean, self.sd, (len(batch), 6))
        targets[:, 3:] = np.maximum(targets[:, 3:], 0.1 * self.mean[3:])
        apply = self.rng.random(len(batch)) < self.rate
        return np.stack([reinhard(im, t) if a else im for im, t, a in zip(batch, targets, apply, strict=True)]
                        ).astype(np.float32)


class RandomOpticalDensity(layers.Layer):
    """Per image and channel, scale the optical density -log(x) by a factor in [1 - s, 1 + s].

    Models more or less stain absorbed at each wavelength (Tellez et al. 2018 jitter the
    deconvolved stains the same way); white stays white.
    """

    def __init__(self, strength: float, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strength = strength
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images):
        scale = keras.random.uniform((ops.shape(images)[0], 1, 1, 3), 1.0 - self.strength, 1.0 + self.strength,
                                     seed=self.seed_generator)
        density = -ops.log(ops.clip(images, 1.0 / 255.0, 1.0))
        return ops.clip(ops.exp(-density * scale), 0.0, 1.0)


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


def build_augmenter(seed: int, colour: ColourAugmentation | None = ColourAugmentation()) -> keras.Sequential:
    """The augmentation pipeline for batches of float32 RGB images in [0, 1]; `colour=None`: the paper's set."""
    steps = [
        layers.RandomFlip("horizontal_and_vertical", seed=seed),
        layers.RandomRotation(0.5, fill_mode="reflect", seed=seed + 1),
        layers.RandomTranslation(0.05, 0.05, fill_mode="reflect", seed=seed + 2),
        layers.RandomShear(0.05, 0.05, fill_mode="reflect", seed=seed + 3),
        RandomApply(layers.RandomGaussianBlur(1.0, kernel_size=3, sigma=1.0, value_range=VALUE_RANGE,
                                              seed=seed + 4), rate=0.1, seed=seed + 5),
        RandomApply(layers.Equalization(value_range=VALUE_RANGE), rate=0.05, seed=seed + 6),
    ]
    grey = layers.RandomGrayscale(colour.grayscale if colour else 0.1, seed=seed + 8)
    if colour and colour.grayscale_first:
        steps.append(grey)
    if colour:
        # Hue and saturation only: brightness/contrast jitter on these mostly-white fields stalled
        # training at chance level in 4-epoch trials. Keras draws the saturation factor as f / (1 - f)
        # and turns the hue by up to factor * 180 degrees.
        low, high = colour.saturation
        steps += [
            layers.RandomSaturation((low / (1 + low), high / (1 + high)), value_range=VALUE_RANGE, seed=seed + 7),
            layers.RandomHue(colour.hue_deg / 180.0, value_range=VALUE_RANGE, seed=seed + 9),
        ]
        if colour.optical_density:
            steps.append(RandomOpticalDensity(colour.optical_density, seed=seed + 10))
    if not (colour and colour.grayscale_first):
        steps.append(grey)
    return keras.Sequential(steps, name="augment")
