"""Run inside the installed Pi runtime venv (no TensorFlow): load every shipped `.tflite` with
ai-edge-litert and check int8 against float32 on each model's own test split; sign, verify, install and
canary-check a bundle of the served model. Prints one JSON line."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from model import bundle, data
from model.classifier import DEFAULT_ARTIFACT, Classifier

root = Path(sys.argv[1])
artifacts = Path("model/artifacts")
dataset, samples = data.load_dataset(root)
result = {"tensorflow_importable": importlib.util.find_spec("tensorflow") is not None,
          "litert": importlib.metadata.version("ai-edge-litert"), "models": {}}
for card in sorted(artifacts.glob("*/model_card.json")):
    info = json.loads(card.read_text())
    images = data.load_images(root, data.card_splits(info, dataset, samples)["test"], info["input_size"])
    decisions = {}
    for kind in ("float32", "int8"):
        clf = Classifier.load(card.parent / info["artifacts"][kind]["file"])
        p_all = np.concatenate([clf.p_all(clf.classify(images[i:i + 64])) for i in range(0, len(images), 64)])
        decisions[kind] = p_all >= clf.threshold
    result["models"][info["name"]] = float(np.mean(decisions["float32"] == decisions["int8"]))
with tempfile.TemporaryDirectory() as tmp:
    key, pub = bundle.keygen(Path(tmp) / "keys")
    made = bundle.build_bundle(DEFAULT_ARTIFACT.parent, bundle.load_private_key(key),
                               bundle.make_canary(DEFAULT_ARTIFACT.parent, root, 4))
    verified = bundle.verify_bundle(made, [pub], len(made))
    folder = verified.install(Path(tmp) / "models")
    classifier = Classifier.load(folder / verified.card["artifacts"]["int8"]["file"])
    result["bundle"] = {"folder": verified.folder_name, "canary_max_deviation": verified.check_canary(classifier),
                        "canary_tolerance": bundle.canary_tolerance(classifier)}
print(json.dumps(result))
