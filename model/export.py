"""Export a trained Keras model as float32 and full-integer int8 `.tflite`, and write its model card.

The `.tflite` files have two outputs, `probabilities` and `features` (the global average of the last
spatial feature map, which the input gate's out-of-distribution score reads), so serving stays one
LiteRT invocation per batch.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from model.classifier import CARD_NAME, file_sha256
from model.networks import STANDARDISE

# Kept float32 in the int8 file of a standardised model: the standardisation's LiteRT ops (the rest of cellnet
# has none of them) and the output softmax.
FLOAT_OPS = ["SUB", "MUL", "RSQRT", "ADD", "AVERAGE_POOL_2D", "SOFTMAX"]


def flops(model: keras.Model) -> int:
    """Multiply-accumulates of the convolutions and dense layers, times two, for one image."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            macs += h * w * kh * kw * layer.input.shape[-1] * c_out
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return 2 * macs


def with_features(model: keras.Model) -> tuple[keras.Model, list[int]]:
    """The same network with a second output, `features`: the channel means of the output of every
    pooling stage and of the last spatial feature map, concatenated; and the widths of those pieces.
    `cellnet`: 32 + 64 + 112 + 160 + 224 = 592 values (the last being its own global average pooling);
    `allds2020`, whose head flattens 75,000 values: the 30 channel means of its pooling layer.
    Early stages see what the last one misses (washed-out or blurred captures). Sequential models are
    re-traced layer by layer to give them a graph; functional ones are tapped in their own graph.
    """
    if isinstance(model, keras.Sequential):  # no graph of its own: re-trace it layer by layer
        inputs = keras.Input(model.input_shape[1:], name="image")
        outputs, x = [], inputs
        for layer in model.layers:
            x = layer(x)
            outputs.append((layer, x))
    else:  # a functional graph (cellnet's standardised input branches): read its own tensors
        inputs, x = model.inputs, model.outputs[0]
        outputs = [(layer, layer.output) for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    taps, last = [], None
    for layer, out in outputs:
        if len(out.shape) == 4 and out.shape[1] > 1:
            last = out
            if isinstance(layer, keras.layers.MaxPooling2D):
                taps.append(out)
    if last is None:
        raise ValueError(f"{model.name} has no spatial feature map")
    if not taps or taps[-1] is not last:
        taps.append(last)
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"feature_pool_{i}")(t) for i, t in enumerate(taps)]
    features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="feature_concat")(pooled)
    features = keras.layers.Identity(name="features")(features)
    return (keras.Model(inputs, {"probabilities": x, "features": features}, name=model.name),
            [int(t.shape[-1]) for t in taps])


def to_tflite(model: keras.Model, representative: np.ndarray | None = None) -> bytes:
    """Float32 LiteRT flatbuffer, or int8 (float I/O) when a representative set is given.

    The int8 file is full-integer, except that a per-image standardisation (`cellnet_standardised`)
    stays float32: a low-contrast image spans a few int8 steps of the centred input, which the
    standardisation would amplify into the network's input (in a model trained 8 epochs, P(ALL) moved by
    up to 0.93 against the float32 file; 0.06 with the standardisation in float). Such a model's output
    softmax stays float32 too: in int8 P(ALL) takes 256 levels and a confident answer saturates, so
    hiding part of the image cannot move it (49 of 102 occlusion maps came out blank; none in float).
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is None:
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in representative)
    if not any(layer.name.startswith(STANDARDISE) for layer in model.layers):
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return converter.convert()
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=FLOAT_OPS)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([x[None]] for x in representative[:8]), debug_options=options)
    return debugger.get_nondebug_quantized_model()


def export(model: keras.Model, out_dir: Path, representative: np.ndarray) -> tuple[dict[str, Path], list[int]]:
    """Write `<name>.keras`, `<name>_float32.tflite` and `<name>_int8.tflite` into out_dir; returns
    their paths and the widths of the feature output's pieces."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"keras": out_dir / f"{model.name}.keras",
             "float32": out_dir / f"{model.name}_float32.tflite",
             "int8": out_dir / f"{model.name}_int8.tflite"}
    # Re-saved uncompiled: the optimizer's state would triple the file for no use at inference.
    model.save(paths["keras"])
    keras.models.load_model(paths["keras"], compile=False).save(paths["keras"])
    served, segments = with_features(model)
    paths["float32"].write_bytes(to_tflite(served))
    paths["int8"].write_bytes(to_tflite(served, representative))
    return paths, segments


def library_versions() -> dict[str, str]:
    """Versions that produced an artifact."""
    import cv2
    import sklearn

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__}


def write_card(out_dir: Path, card: dict, artifacts: dict[str, Path]) -> Path:
    """Write `model_card.json` with each artifact's file name and SHA-256."""
    card = dict(card, artifacts={k: {"file": p.name, "sha256": file_sha256(p)} for k, p in artifacts.items()})
    path = out_dir / CARD_NAME
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


def reexport(out_dir: Path, root: Path, seed: int = 42) -> dict[str, Path]:
    """Rewrite the `.tflite` files of an artifact folder from its `.keras` file and update the card.

    The int8 model is quantised with the representative set `model.train.train` uses (200 images of the
    training split the card names, drawn with the same seed), so its probabilities are those of the
    original export.
    """
    from model import data

    card_path = out_dir / CARD_NAME
    card = json.loads(card_path.read_text())
    dataset, samples = data.load_dataset(root)
    train = data.card_splits(card, dataset, samples, seed)["train"]
    images = data.load_images(root, train, int(card["input_size"]))
    rng = np.random.default_rng(seed)
    representative = images[rng.choice(len(images), min(200, len(images)), replace=False)]
    paths = {kind: out_dir / entry["file"] for kind, entry in card["artifacts"].items()}
    model = keras.models.load_model(paths["keras"], compile=False)
    served, segments = with_features(model)
    paths["float32"].write_bytes(to_tflite(served))
    paths["int8"].write_bytes(to_tflite(served, representative))
    card["feature_segments"] = segments
    card["artifacts"] = {k: {"file": p.name, "sha256": file_sha256(p)} for k, p in paths.items()}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return paths
