"""The two architectures. Each is one flat function that reads like its table."""

from __future__ import annotations

import functools

import keras
from keras import layers, ops


def allds2020(n_classes: int = 2, input_size: int = 100) -> keras.Model:
    """Thanh et al. (2018) as the original AllDS2020 Keras code built it (174,812 parameters)."""
    return keras.Sequential(
        [
            keras.Input((input_size, input_size, 3)),
            layers.ZeroPadding2D(2),
            layers.Conv2D(30, 5, strides=1, padding="valid", activation="relu"),
            layers.ZeroPadding2D(2),
            layers.Conv2D(30, 5, strides=1, padding="valid", activation="relu"),
            layers.MaxPooling2D(2, strides=2),
            layers.Flatten(),
            layers.Dense(n_classes),
            layers.Softmax(),
        ],
        name="allds2020",
    )


STANDARDISE = "standardise"  # name prefix of the per-image standardisation's layers (kept float32 in int8 files)


def _conv_bn_relu(x, filters: int, strides: int = 1):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)  # 72 steps an epoch: track the weights closely
    return layers.ReLU()(x)


def cellnet(n_classes: int = 2, input_size: int = 128, dropout: float = 0.3, colour_input: str = "rgb") -> keras.Model:
    """AllDS CellNet: stride-2 stem, five Conv3x3-BN-ReLU stages with max-pooling, GAP, dropout.

    `colour_input="value"` feeds the network max(R, G, B) only (HSV value), which no hue turn or
    saturation change alters: stain-hue invariance by construction instead of by augmentation.
    `colour_input="standardised"` gives each image's channels mean 0 and sd 1, so a global change of
    a channel's level or contrast (another stain batch, lamp or camera) does not reach the network.
    """
    inputs = keras.Input((input_size, input_size, 3))
    x = inputs
    if colour_input == "value":
        x = ops.max(inputs, axis=-1, keepdims=True)
    elif colour_input == "standardised":  # image means by average pooling: XNNPACK runs it, int8 MEAN is slow
        centred = inputs - layers.AveragePooling2D(input_size, name=f"{STANDARDISE}_mean")(inputs)
        variance = layers.AveragePooling2D(input_size, name=f"{STANDARDISE}_variance")(centred * centred)
        x = centred * ops.rsqrt(variance + 1e-4)
    x = _conv_bn_relu(x, 24, strides=2)  # 64x64
    for filters in (32, 64, 112, 160):  # 64 -> 32 -> 16 -> 8 -> 4
        x = _conv_bn_relu(x, filters)
        x = _conv_bn_relu(x, filters)
        x = layers.MaxPooling2D(2)(x)
    x = _conv_bn_relu(x, 224)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(n_classes)(x)
    outputs = layers.Softmax()(x)
    return keras.Model(inputs, outputs, name="cellnet")


ARCHITECTURES = {"allds2020": allds2020, "cellnet": cellnet,
                 "cellnet_value": functools.partial(cellnet, colour_input="value"),
                 "cellnet_standardised": functools.partial(cellnet, colour_input="standardised")}
INPUT_SIZES = {"allds2020": 100, "cellnet": 128, "cellnet_value": 128, "cellnet_standardised": 128}
