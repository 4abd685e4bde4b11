"""Inference runtime: `Classifier.load(path)` serves a `.tflite` artifact with LiteRT or a `.keras`
one with TensorFlow, reading classes, input size and the decision policy from the model card.

`Classifier.assess(batch)` is the served answer: one network invocation for the whole batch, then
the input gate (image quality and an out-of-distribution score on the network's own features), the
calibrated probability and the indeterminate band around the operating threshold. `classify` gives
the raw probabilities (evaluation). The LiteRT path never imports TensorFlow (the Pi runs without it).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from model.policy import DecisionPolicy

CARD_NAME = "model_card.json"
LABELS = ("Positive", "Negative", "Indeterminate")

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class Diagnosis:
    """The served answer for one image.

    `label` is Positive, Negative or Indeterminate; `reason` says why an answer is Indeterminate
    (None otherwise); `confidence` is the calibrated probability of the stated answer (>= 0.5 for a
    decision, None when Indeterminate); `p_all` and `probabilities` are the network's raw outputs;
    `ood_score` is the out-of-distribution score of the network's features (None without a gate).
    """

    label: str
    reason: str | None
    confidence: float | None
    p_all: float
    probabilities: dict[str, float]
    ood_score: float | None = None

    @property
    def positive(self) -> bool:
        return self.label == "Positive"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ModelError(ValueError):
    """A model that must not serve: missing, altered, inconsistent with its card, or failing its probe."""


# What a card must hold for serving, and the type of each entry.
CARD_SCHEMA = {"name": str, "version": str, "classes": list, "input_size": int, "threshold": float, "artifacts": dict}


class Classifier:
    """A loaded artifact plus its model card and decision policy."""

    def __init__(self, path: Path, card: dict, run: Runner, sha256: str, require_policy: bool = True) -> None:
        self.path = path
        self.card = card
        self._run = run
        self.sha256 = sha256
        self.kind = artifact_kind(card, path)
        self.policy = DecisionPolicy.from_card(card, self.kind, path.parent) if require_policy \
            else DecisionPolicy(calibrated=False)
        if require_policy and not self.policy.calibrated:
            raise ModelError(f"model card {path.parent / CARD_NAME} has no decision policy for the {self.kind} "
                             f"artifact: run `python -m model calibrate --artifact {path.parent}`")

    @classmethod
    def load(cls, path: str | Path, threads: int = 2, require_policy: bool = True) -> Classifier:
        """Load a `.tflite` (LiteRT + XNNPACK) or `.keras` artifact whose card sits beside it.

        The artifact's SHA-256 must equal the one its card lists, the card's decision policy (gate,
        calibration, band) must be there with its gate file, and one invocation on a probe image must
        give a probability per class; otherwise `ModelError`. `require_policy=False` skips the policy
        (raw outputs only: used while fitting it).
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
                run = _litert_runner(content, threads, len(card["classes"]))
            elif path.suffix == ".keras":
                run = _keras_runner(path)
            else:
                raise ModelError(f"unknown model file type {path.suffix!r} (want .tflite or .keras)")
            classifier = cls(path, card, run, sha256, require_policy)
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

    @cached_property
    def output_step(self) -> float | None:
        """The most one int8 rounding step can move a class probability (`output_step`); None for float."""
        return output_step(self.path.read_bytes(), len(self.classes)) if self.path.suffix == ".tflite" else None

    @property
    def threshold(self) -> float:
        """The operating threshold on P(ALL) of this artifact (fitted on its own validation outputs)."""
        return self.policy.threshold if self.policy.calibrated else float(self.card["threshold"])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One invocation: (class probabilities, features) for a batch of preprocessed images."""
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of preprocessed images (N, size, size, 3)."""
        return self.run(batch)[0]

    def p_all(self, probabilities: np.ndarray) -> np.ndarray:
        """P(ALL) per row: one minus the probability of the benign class."""
        return 1.0 - probabilities[:, self.classes.index("Benign")]

    def assess(self, batch: np.ndarray, jpeg_quality: Sequence[int | None] | None = None) -> list[Diagnosis]:
        """The served answers for a batch of preprocessed images: one invocation, then gate,
        calibration and the indeterminate band (see `model.policy.DecisionPolicy`).

        `jpeg_quality` (optional, per image, from `model.preprocess.jpeg_quality` of the payload)
        lets the gate refuse heavily compressed JPEGs, which the tensor alone does not show.
        The first call limits NumPy's BLAS to one thread for the process (see `model.gate`).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        probabilities, features = self._run(batch)
        return self.decide(batch, probabilities, features, jpeg_quality)

    def decide(self, batch: np.ndarray, probabilities: np.ndarray, features: np.ndarray | None,
               jpeg_quality: Sequence[int | None] | None = None) -> list[Diagnosis]:
        """`assess` on outputs already computed for `batch` (evaluation reuses one invocation)."""
        p_all = self.p_all(probabilities)
        benign_on_top = probabilities.argmax(1) == self.classes.index("Benign")
        decisions = self.policy.decide(batch, p_all, features, jpeg_quality, benign_on_top)
        return [Diagnosis(d.label, d.reason, d.confidence, float(p), _rounded(self.classes, row), d.ood_score)
                for d, p, row in zip(decisions, p_all, probabilities, strict=True)]


def _rounded(classes: list[str], row: np.ndarray) -> dict[str, float]:
    return {c: round(float(v), 6) for c, v in zip(classes, row, strict=True)}


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


def artifact_kind(card: dict, path: Path) -> str:
    """Which of the card's artifacts (`int8`, `float32`, `keras`) this file is, by name or suffix."""
    for kind, entry in card.get("artifacts", {}).items():
        if entry.get("file") == path.name:
            return kind
    return "keras" if path.suffix == ".keras" else "float32" if "float32" in path.name else "int8"


def _interpreter_class() -> type:
    """LiteRT's interpreter, or TensorFlow's where TensorFlow is loaded (the two cannot share a process)."""
    if "tensorflow" in sys.modules:
        from tensorflow.lite.python.interpreter import Interpreter
    else:
        from ai_edge_litert.interpreter import Interpreter
    return Interpreter


def output_step(model_content: bytes, n_classes: int) -> float | None:
    """The most one rounding step of the int8 arithmetic can move a class probability, or None for a
    float model: an int8 softmax's output scale (1/256), or, for a float32 softmax on int8 logits, half
    the logits' scale (two logits one step off move their difference two steps; dP <= d(difference) / 4).
    Another CPU's int8 kernels may round one step differently (seen under arm64 emulation)."""
    interp = _interpreter_class()(model_content=model_content)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    producer = {out: op for op in interp._get_ops_details() for out in op["outputs"]}  # noqa: SLF001 - the graph
    index = next(o["index"] for o in interp.get_output_details() if int(o["shape"][-1]) == n_classes)
    through_softmax = False
    while (op := producer.get(index)) is not None:
        inputs = [i for i in op["inputs"] if i >= 0]
        if op["op_name"] == "DEQUANTIZE" and tensors[inputs[0]]["dtype"] == np.int8:
            scale = float(tensors[inputs[0]]["quantization"][0])
            return scale / 2 if through_softmax else scale
        if op["op_name"] == "SOFTMAX":
            through_softmax = True
        index = inputs[0]
    return None


def _litert_runner(model_content: bytes, threads: int, n_classes: int) -> Runner:
    """A LiteRT interpreter per batch size (resizing costs a re-allocation), created on first use.

    Artifacts keep float32 input and output; the int8 model quantises inside the graph. Exported
    artifacts have two outputs, told apart by width: probabilities (one per class) and features.
    """
    Interpreter = _interpreter_class()  # noqa: N806 - a class
    interpreters: dict[int, Interpreter] = {}
    outputs = Interpreter(model_content=model_content).get_output_details()
    widths = [int(o["shape"][-1]) for o in outputs]
    if widths.count(n_classes) != 1 or len(outputs) > 2:
        raise ModelError(f"outputs of widths {widths} do not match {n_classes} classes (+ features)")
    prob_slot = widths.index(n_classes)
    feature_slot = 1 - prob_slot if len(outputs) == 2 else None

    def interpreter_for(n: int) -> Interpreter:
        if n not in interpreters:
            interp = Interpreter(model_content=model_content, num_threads=threads)
            index = interp.get_input_details()[0]["index"]
            interp.resize_tensor_input(index, [n, *interp.get_input_details()[0]["shape"][1:]])
            interp.allocate_tensors()
            interpreters[n] = interp
        return interpreters[n]

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        interp = interpreter_for(len(batch))
        interp.set_tensor(interp.get_input_details()[0]["index"], batch)
        interp.invoke()
        details = interp.get_output_details()
        features = None if feature_slot is None else interp.get_tensor(details[feature_slot]["index"]).copy()
        return interp.get_tensor(details[prob_slot]["index"]).copy(), features

    return run


def _keras_runner(path: Path) -> Runner:
    """A compiled call of the Keras model with its feature output (no `model.predict` overhead)."""
    import keras
    import tensorflow as tf

    from model.export import with_features

    model, _ = with_features(keras.models.load_model(path, compile=False))
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = call(tf.constant(batch))
        return out["probabilities"].numpy(), out["features"].numpy()

    return run


DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "cellnet_standardised" / "cellnet_standardised_int8.tflite"
