"""The two halves of `deploy/pi-check.sh`: `predict` runs every shipped `.tflite` artifact on a list of
images (the same code on x86 and inside the emulated arm64 userland, LiteRT only), `compare` lines two
such runs up, `answers` lines up two agents' replay reports. Each comparison prints a table and exits 1
on a mismatch.

Decision rule for `compare`: an image's decision may differ between the two machines only when its two
P(ALL) differ by at most one output step (so both lie within a step of the card's threshold): the most
one int8 rounding step can move a probability (`model.classifier.output_step`: 1/256 behind an int8
softmax, half the logits' scale behind a float32 one); float32 artifacts 1/256. Any other differing
decision fails, and so does an artifact file that differs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

import model
from model.classifier import Classifier, read_card
from model.data import read_list
from model.preprocess import preprocess_file

ARTIFACTS = Path(model.__file__).resolve().parent / "artifacts"
FLOAT_STEP = 1 / 256  # the bound for float32 artifacts, whose outputs differ across CPUs by about 1e-4
BATCH = 32


def predict(root: Path, names: list[str], models: Path) -> dict:
    """P(ALL) of every `.tflite` artifact of every model card under `models` for each image `root/name`."""
    images = [root / name for name in names]
    result = {"machine": platform.machine(), "python": platform.python_version(),
              "litert": importlib.metadata.version("ai-edge-litert"),
              "tensorflow_importable": importlib.util.find_spec("tensorflow") is not None,
              "images": names, "artifacts": {}}
    tensors: dict[int, np.ndarray] = {}
    for card_path in sorted(models.glob("*/model_card.json")):
        card = read_card(card_path.parent)
        size = int(card["input_size"])
        if size not in tensors:
            tensors[size] = np.stack([preprocess_file(p, size) for p in tqdm(
                images, desc=f"decode {size}px", unit="img", leave=False, disable=not sys.stderr.isatty())])
        for kind, entry in sorted(card["artifacts"].items()):
            path = card_path.parent / entry["file"]
            if path.suffix != ".tflite":
                continue
            clf = Classifier.load(path)
            batches = range(0, len(images), BATCH)
            p_all = np.concatenate([clf.p_all(clf.classify(tensors[size][i:i + BATCH])) for i in tqdm(
                batches, desc=path.name, unit="batch", leave=False, disable=not sys.stderr.isatty())])
            result["artifacts"][f"{card['name']}/{path.name}"] = {
                "model": card["name"], "kind": kind, "threshold": clf.threshold, "sha256": clf.sha256,
                "step": clf.output_step, "p_all": [float(p) for p in p_all]}
    return result


def compare(x86: dict, arm: dict) -> tuple[list[dict], bool]:
    """Per artifact: decision agreement, max |ΔP|, differing decisions and whether each is tolerated."""
    if x86["images"] != arm["images"] or set(x86["artifacts"]) != set(arm["artifacts"]):
        raise ValueError(f"the two runs cover different images or artifacts: {sorted(x86['artifacts'])} on "
                         f"{len(x86['images'])} images, {sorted(arm['artifacts'])} on {len(arm['images'])}")
    rows, ok = [], True
    for name, a in sorted(x86["artifacts"].items()):
        b = arm["artifacts"][name]
        p, q = np.array(a["p_all"]), np.array(b["p_all"])
        threshold, step = a["threshold"], a["step"] or FLOAT_STEP
        differs = (p >= threshold) != (q >= threshold)
        tolerated = differs & (np.abs(p - q) <= step)  # opposite sides of the threshold, so both within a step
        row = {"artifact": name, "images": len(p), "agreement": float(np.mean(~differs)),
               "max_dp": float(np.max(np.abs(p - q))) if len(p) else 0.0, "step": step,
               "differing": int(differs.sum()), "tolerated": int(tolerated.sum()),
               "same_sha256": a["sha256"] == b["sha256"]}
        row["ok"] = row["same_sha256"] and row["differing"] == row["tolerated"]
        ok &= row["ok"]
        rows.append(row)
    return rows, ok


def answers(x86: dict, arm: dict, step: float = FLOAT_STEP) -> tuple[list[str], int]:
    """Lines for images whose answers differ; the number that agree. Agree = the same diagnosis, reason
    and model, and every class probability within `step`, one output step of the served int8 artifact
    (`served_step`): the emulated Cortex-A72's kernels may round one int8 value differently, and the
    calibrated confidence, a function of those probabilities, moves with it."""
    def by_path(report: dict) -> dict:
        return {r["path"]: r["reply"] for r in report["results"]}

    left, right = by_path(x86), by_path(arm)
    problems, agreeing = [], 0
    for name in sorted(set(left) | set(right)):
        a, b = left.get(name), right.get(name)
        if not a or not b or "diagnosis" not in a or "diagnosis" not in b:
            problems.append(f"{Path(name).name}: x86 {a and (a.get('diagnosis') or a.get('error'))}, "
                            f"arm64 {b and (b.get('diagnosis') or b.get('error'))}")
            continue
        same = (a["diagnosis"] == b["diagnosis"] and a.get("reason") == b.get("reason")
                and a["model"]["sha256"] == b["model"]["sha256"] and a["probabilities"].keys() == b["probabilities"].keys()
                and all(abs(a["probabilities"][k] - b["probabilities"][k]) <= step + 1e-6 for k in a["probabilities"]))
        if same:
            agreeing += 1
        else:
            keys = ("diagnosis", "reason", "confidence", "probabilities")
            problems.append(f"{Path(name).name}: x86 {[a.get(k) for k in keys]} arm64 {[b.get(k) for k in keys]}")
    return problems, agreeing


def served_step(report: dict, models: Path = ARTIFACTS) -> float:
    """One output step of the artifact that answered a replay report, found by its SHA-256 among the
    model cards under `models`; `FLOAT_STEP` for a float artifact, or when it cannot be told."""
    shas = {r["reply"]["model"]["sha256"] for r in report["results"] if r.get("reply") and "model" in r["reply"]}
    for card_path in sorted(models.glob("*/model_card.json")) if len(shas) == 1 else []:
        for entry in read_card(card_path.parent)["artifacts"].values():
            if entry.get("sha256") in shas and entry["file"].endswith(".tflite"):
                return Classifier.load(card_path.parent / entry["file"]).output_step or FLOAT_STEP
    return FLOAT_STEP


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pi_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="P(ALL) of every shipped .tflite on a list of images, as JSON")
    p.add_argument("list", type=Path, help="file list relative to --data, e.g. data/aria2021/test.txt")
    p.add_argument("--data", type=Path, required=True, help="image root")
    p.add_argument("--models", type=Path, default=ARTIFACTS, help="folder of model folders (default: the shipped ones)")
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="two `predict` outputs: decision agreement and max |ΔP| per artifact")
    c.add_argument("x86", type=Path)
    c.add_argument("arm64", type=Path)
    a = sub.add_parser("answers", help="two replay --json reports: the agents' answers must be equal")
    a.add_argument("x86", type=Path)
    a.add_argument("arm64", type=Path)
    args = parser.parse_args(argv)

    if args.command == "predict":
        args.out.write_text(json.dumps(predict(args.data, read_list(args.list), args.models)) + "\n")
        return 0
    x86, arm = json.loads(args.x86.read_text()), json.loads(args.arm64.read_text())
    if args.command == "compare":
        rows, ok = compare(x86, arm)
        print(f"(a) shipped .tflite on {rows[0]['images'] if rows else 0} images: {x86['machine']} "
              f"(Python {x86['python']}, LiteRT {x86['litert']}) vs {arm['machine']} (Python {arm['python']}, "
              f"LiteRT {arm['litert']}, TensorFlow importable: {arm['tensorflow_importable']})")
        print(f"{'artifact':34} {'agreement':>9} {'differing':>9} {'max |ΔP|':>9} {'steps':>6}  result")
        for r in rows:
            print(f"{r['artifact']:34} {r['agreement']:9.4f} {r['differing']:9d} {r['max_dp']:9.6f} "
                  f"{r['max_dp'] / r['step']:6.2f}  {'ok' if r['ok'] else 'MISMATCH'}"
                  + ("" if r["same_sha256"] else " (different file)")
                  + (f" ({r['tolerated']} within one step of the threshold)" if r["tolerated"] else ""))
        return 0 if ok and rows else 1
    problems, equal = answers(x86, arm, served_step(x86))
    keys = ("diagnosis", "reason", "confidence", "probabilities")
    arm_replies = {r["path"]: r["reply"] for r in arm["results"]}
    identical = sum(1 for r in x86["results"] if r["reply"] and arm_replies.get(r["path"])
                    and all(r["reply"].get(k) == arm_replies[r["path"]].get(k) for k in keys))
    print(f"(b) agent answers, x86 vs arm64 agent: {equal} of {equal + len(problems)} agree (diagnosis, reason, "
          f"model, probabilities within one output step), {identical} identical to the last digit")
    for line in problems:
        print("  " + line)
    return 0 if not problems and equal else 1


if __name__ == "__main__":
    sys.exit(main())
