"""Export a trained Keras model as float32 and full-integer int8 `.tflite`, and write its model card."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from model.classifier import CARD_NAME, file_sha256


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


def to_tflite(model: keras.Model, representative: np.ndarray | None = None) -> bytes:
    """Float32 LiteRT flatbuffer, or full-integer int8 (float I/O) when a representative set is given."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def export(model: keras.Model, out_dir: Path, representative: np.ndarray) -> dict[str, Path]:
    """Write `<name>.keras`, `<name>_float32.tflite` and `<name>_int8.tflite` into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"keras": out_dir / f"{model.name}.keras",
             "float32": out_dir / f"{model.name}_float32.tflite",
             "int8": out_dir / f"{model.name}_int8.tflite"}
    # Re-saved uncompiled: the optimizer's state would triple the file for no use at inference.
    model.save(paths["keras"])
    keras.models.load_model(paths["keras"], compile=False).save(paths["keras"])
    paths["float32"].write_bytes(to_tflite(model))
    paths["int8"].write_bytes(to_tflite(model, representative))
    return paths


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
