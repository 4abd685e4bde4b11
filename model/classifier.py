"""Inference runtime: `Classifier.load(path)` serves a `.tflite` artifact with LiteRT or a `.keras`
one with TensorFlow, reading classes, input size and decision threshold from the model card.

The LiteRT path never imports TensorFlow (the Pi runs without it).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CARD_NAME = "model_card.json"


@dataclass(frozen=True)
class Diagnosis:
    """The served answer for one image."""

    positive: bool
    confidence: float
    p_all: float
    probabilities: dict[str, float]

    @property
    def label(self) -> str:
        return "Positive" if self.positive else "Negative"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Classifier:
    """A loaded artifact plus its model card."""

    def __init__(self, path: Path, card: dict, run: Callable[[np.ndarray], np.ndarray]) -> None:
        self.path = path
        self.card = card
        self._run = run
        self.sha256 = file_sha256(path)

    @classmethod
    def load(cls, path: str | Path, threads: int = 2) -> Classifier:
        """Load a `.tflite` (LiteRT + XNNPACK) or `.keras` artifact; its card sits beside it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model artifact {path} does not exist")
        card_path = path.parent / CARD_NAME
        if not card_path.is_file():
            raise FileNotFoundError(f"model card {card_path} does not exist")
        card = json.loads(card_path.read_text())
        if path.suffix == ".tflite":
            run = _litert_runner(path, threads)
        elif path.suffix == ".keras":
            run = _keras_runner(path)
        else:
            raise ValueError(f"unknown model file type {path.suffix!r} (want .tflite or .keras)")
        return cls(path, card, run)

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def classes(self) -> list[str]:
        return self.card["classes"]

    @property
    def input_size(self) -> int:
        return int(self.card["input_size"])

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of preprocessed images (N, size, size, 3)."""
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def p_all(self, probabilities: np.ndarray) -> np.ndarray:
        """P(ALL) per row: one minus the probability of the benign class."""
        return 1.0 - probabilities[:, self.classes.index("Benign")]

    def diagnose(self, probabilities: np.ndarray) -> list[Diagnosis]:
        """Apply the model card's operating point to each row of probabilities."""
        results = []
        for row, p in zip(probabilities, self.p_all(probabilities), strict=True):
            positive = bool(p >= self.threshold)
            results.append(Diagnosis(positive, float(p if positive else 1.0 - p), float(p),
                                     {c: round(float(v), 6) for c, v in zip(self.classes, row, strict=True)}))
        return results


def _litert_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A LiteRT interpreter per batch size (resizing costs a re-allocation), created on first use.

    Artifacts keep float32 input and output; the int8 model quantises inside the graph.
    """
    if "tensorflow" in sys.modules:  # LiteRT's and TensorFlow's wrappers cannot share a process
        from tensorflow.lite.python.interpreter import Interpreter
    else:
        from ai_edge_litert.interpreter import Interpreter

    interpreters: dict[int, Interpreter] = {}
    model_content = path.read_bytes()

    def interpreter_for(n: int) -> Interpreter:
        if n not in interpreters:
            interp = Interpreter(model_content=model_content, num_threads=threads)
            index = interp.get_input_details()[0]["index"]
            interp.resize_tensor_input(index, [n, *interp.get_input_details()[0]["shape"][1:]])
            interp.allocate_tensors()
            interpreters[n] = interp
        return interpreters[n]

    def run(batch: np.ndarray) -> np.ndarray:
        interp = interpreter_for(len(batch))
        interp.set_tensor(interp.get_input_details()[0]["index"], batch)
        interp.invoke()
        return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()

    return run


def _keras_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled call of the Keras model (no `model.predict` per-call overhead)."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(path, compile=False)
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda batch: call(tf.constant(batch)).numpy()


DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "cellnet" / "cellnet_int8.tflite"
