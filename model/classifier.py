"""Inference runtime: `Classifier.load(path)` serves a `.tflite` artifact with LiteRT or a `.keras`
one with TensorFlow, reading classes, input size and decision threshold from the model card.

The LiteRT path never imports TensorFlow (the Pi runs without it).
"""

from __future__ import annotations

import hashlib
import json
import math
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


class ModelError(ValueError):
    """A model that must not serve: missing, altered, inconsistent with its card, or failing its probe."""


# What a card must hold for serving, and the type of each entry.
CARD_SCHEMA = {"name": str, "version": str, "classes": list, "input_size": int, "threshold": float, "artifacts": dict}


class Classifier:
    """A loaded artifact plus its model card."""

    def __init__(self, path: Path, card: dict, run: Callable[[np.ndarray], np.ndarray], sha256: str) -> None:
        self.path = path
        self.card = card
        self._run = run
        self.sha256 = sha256

    @classmethod
    def load(cls, path: str | Path, threads: int = 2) -> Classifier:
        """Load a `.tflite` (LiteRT + XNNPACK) or `.keras` artifact whose card sits beside it.

        The artifact's SHA-256 must equal the one its card lists, and one invocation on a probe
        image must give a probability per class; otherwise `ModelError`.
        """
        path = Path(path)
        card = read_card(path.parent)
        listed = {entry.get("file"): entry.get("sha256") for entry in card["artifacts"].values() if isinstance(entry, dict)}
        if path.name not in listed:
            raise ModelError(f"artifact {path.name} is not listed in its model card")
        if not path.is_file():
            raise ModelError(f"artifact {path.name} is missing")
        content = path.read_bytes()
        sha256 = hashlib.sha256(content).hexdigest()
        if sha256 != listed[path.name]:
            raise ModelError(f"artifact {path.name} has sha256 {sha256[:12]}…, its card says {str(listed[path.name])[:12]}…")
        try:
            if path.suffix == ".tflite":
                run = _litert_runner(content, threads)
            elif path.suffix == ".keras":
                run = _keras_runner(path)
            else:
                raise ModelError(f"unknown model file type {path.suffix!r} (want .tflite or .keras)")
            classifier = cls(path, card, run, sha256)
            classifier.probe()
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a foreign file means: do not serve it
            raise ModelError(f"artifact {path.name} failed to load: {type(exc).__name__}: {exc}") from None
        return classifier

    def probe(self) -> None:
        """One invocation on a fixed image: a probability per class, summing to one."""
        size = self.input_size
        ramp = np.linspace(0.0, 1.0, size * size * 3, dtype=np.float32).reshape(1, size, size, 3)
        out = self.classify(ramp)
        if out.shape != (1, len(self.classes)) or not np.all(np.isfinite(out)) or abs(float(out.sum()) - 1) > 0.05:
            raise ModelError(f"probe gave {out.shape} outputs summing to {float(out.sum()):.3f} for "
                             f"{len(self.classes)} classes")

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


def read_card(folder: Path) -> dict:
    """A model folder's card, checked for what serving reads from it."""
    card_path = Path(folder) / CARD_NAME
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model card of {Path(folder).name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card of {Path(folder).name} is unreadable: {type(exc).__name__}") from None
    return check_card(card)


def check_card(card: object) -> dict:
    """A parsed card, checked for what serving reads from it (`ModelError` otherwise)."""
    if not isinstance(card, dict):
        raise ModelError("model card must be a JSON object")
    for key, kind in CARD_SCHEMA.items():
        value = card.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ModelError(f"model card entry {key!r} must be a {kind.__name__}")
    if not (0 < card["threshold"] < 1 and math.isfinite(card["threshold"])) or not 8 <= card["input_size"] <= 1024:
        raise ModelError("model card threshold or input_size out of range")
    if "Benign" not in card["classes"]:
        raise ModelError("model card classes lack 'Benign'")
    return card


def artifact_path(model_dir: Path, name: str, variant: str) -> Path:
    """The artifact file of model `name` in `model_dir` for `variant` (int8, float32, keras)."""
    folder = Path(model_dir) / name
    if not folder.is_dir():
        available = sorted(p.name for p in Path(model_dir).iterdir() if (p / CARD_NAME).is_file()) \
            if Path(model_dir).is_dir() else []
        raise ModelError(f"unknown model {name!r} (available: {', '.join(available) or 'none'})")
    entry = read_card(folder)["artifacts"].get(variant)
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "/" in entry["file"]:
        raise ModelError(f"model {name!r} has no {variant} artifact")
    return folder / entry["file"]


def _litert_runner(model_content: bytes, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A LiteRT interpreter per batch size (resizing costs a re-allocation), created on first use.

    Artifacts keep float32 input and output; the int8 model quantises inside the graph.
    """
    if "tensorflow" in sys.modules:  # LiteRT's and TensorFlow's wrappers cannot share a process
        from tensorflow.lite.python.interpreter import Interpreter
    else:
        from ai_edge_litert.interpreter import Interpreter

    interpreters: dict[int, Interpreter] = {}

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
