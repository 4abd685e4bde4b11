"""The comparison rules of deploy/pi-check.sh (the emulated run itself is an opt-in step: docs/pi.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from model.classifier import DEFAULT_ARTIFACT, Classifier, read_card
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("pi_check", REPO / "deploy/pi_check.py")
pi_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pi_check)

STEP = 1 / 256


def run(p_all: list[float], threshold: float = 0.5, sha256: str = "abc") -> dict:
    return {"machine": "m", "python": "3.11", "litert": "1.4.0", "tensorflow_importable": False,
            "images": [f"x/{n}.jpg" for n in range(len(p_all))],
            "artifacts": {"net/net_int8.tflite": {"model": "net", "kind": "int8", "threshold": threshold,
                                                  "sha256": sha256, "step": STEP, "p_all": p_all}}}


def test_identical_runs_agree():
    rows, ok = pi_check.compare(run([0.1, 0.9]), run([0.1, 0.9]))
    assert ok and rows[0]["agreement"] == 1.0 and rows[0]["max_dp"] == 0.0


def test_a_flip_within_one_step_of_the_threshold_is_tolerated():
    rows, ok = pi_check.compare(run([0.5 - STEP / 2, 0.9]), run([0.5 + STEP / 2, 0.9]))
    assert ok and rows[0]["differing"] == 1 and rows[0]["tolerated"] == 1 and rows[0]["agreement"] == 0.5


def test_a_flip_beyond_one_step_fails():
    _, ok = pi_check.compare(run([0.5 - STEP, 0.9]), run([0.5 + STEP / 2, 0.9]))
    assert not ok


def test_a_different_artifact_file_fails():
    _, ok = pi_check.compare(run([0.1]), run([0.1], sha256="def"))
    assert not ok


def test_runs_over_different_images_are_refused():
    with pytest.raises(ValueError, match="different images"):
        pi_check.compare(run([0.1, 0.2]), run([0.1]))


def reply(path: str, diagnosis: str, p_all: float) -> dict:
    return {"path": path, "reply": {"diagnosis": diagnosis, "confidence": p_all,
                                    "probabilities": {"Benign": 1 - p_all, "ALL": p_all}, "model": {"sha256": "abc"}}}


def test_answers_must_be_equal_and_present():
    x86 = {"results": [reply("a.jpg", "Positive", 0.9), reply("b.jpg", "Negative", 0.1)]}
    assert pi_check.answers(x86, x86) == ([], 2)
    changed = {"results": [reply("a.jpg", "Positive", 0.9), reply("b.jpg", "Negative", 0.11)]}
    problems, equal = pi_check.answers(x86, changed)
    assert equal == 1 and len(problems) == 1 and problems[0].startswith("b.jpg")
    missing = {"results": [reply("a.jpg", "Positive", 0.9), {"path": "b.jpg", "reply": None}]}
    assert pi_check.answers(x86, missing)[1] == 1


def test_predict_reads_the_output_quantisation_step_and_the_cli_compares(tmp_path, data_root):
    names = (REPO / "data/aria2021/grouped/test.txt").read_text().split()[:2]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, str(REPO / "deploy/pi_check.py"), "predict", str(tmp_path / "list.txt"),
                    "--data", str(data_root), "--out", str(out)], check=True, cwd=REPO, capture_output=True,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    result = json.loads(out.read_text())
    assert result["images"] == names
    served = result["artifacts"][f"{DEFAULT_ARTIFACT.parent.name}/{DEFAULT_ARTIFACT.name}"]
    assert 1 / 256 < served["step"] < 0.05 and len(served["p_all"]) == 2  # int8 logits, a float32 softmax
    assert result["artifacts"]["cellnet/cellnet_int8.tflite"]["step"] == STEP  # full-integer: an int8 softmax
    same = subprocess.run([sys.executable, str(REPO / "deploy/pi_check.py"), "compare", str(out), str(out)],
                          cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    assert same.returncode == 0 and "MISMATCH" not in same.stdout


def test_answers_may_differ_by_one_output_step_with_the_same_decision():
    """Seen on the emulated Cortex-A72: P(Benign) one int8 step (1/256) apart, P(ALL) and the diagnosis the
    same, so the calibrated confidence moved too. That is the arithmetic of another CPU, not another answer."""
    x86 = {"results": [reply("a.jpg", "Negative", 0.027344)]}
    arm = {"results": [reply("a.jpg", "Negative", 0.027344)]}
    arm["results"][0]["reply"]["probabilities"]["Benign"] += STEP
    arm["results"][0]["reply"]["confidence"] = 0.962146
    assert pi_check.answers(x86, arm) == ([], 1)
    arm["results"][0]["reply"]["probabilities"]["Benign"] += STEP  # two steps: a different answer
    assert pi_check.answers(x86, arm)[1] == 0
    flipped = {"results": [reply("a.jpg", "Positive", 0.027344)]}
    assert pi_check.answers(x86, flipped)[1] == 0


def test_the_answer_step_is_that_of_the_artifact_that_answered():
    """Found by the replies' SHA-256: the default's int8 file (int8 logits, float32 softmax) allows half its
    logits' scale; a full-integer file 1/256; a float32 file or an unknown one 1/256."""
    card = read_card(DEFAULT_ARTIFACT.parent)
    def report(sha256: str) -> dict:
        return {"results": [{"path": "a.jpg", "reply": {"model": {"name": "x", "sha256": sha256}}}]}
    default_step = pi_check.served_step(report(card["artifacts"]["int8"]["sha256"]))
    assert default_step == Classifier.load(DEFAULT_ARTIFACT).output_step and 1 / 256 < default_step < 0.05
    assert pi_check.served_step(report(card["artifacts"]["float32"]["sha256"])) == STEP
    assert pi_check.served_step(report(read_card(REPO / "model/artifacts/cellnet")["artifacts"]["int8"]["sha256"])) == STEP
    assert pi_check.served_step(report("0" * 64)) == STEP


def test_a_float32_file_gets_no_more_than_1_256_whatever_its_int8_sibling():
    x86, arm = run([0.5 - STEP / 2]), run([0.5 + STEP / 2])
    for r in (x86, arm):
        r["artifacts"]["net/net_float32.tflite"] = dict(r["artifacts"]["net/net_int8.tflite"], kind="float32", step=None)
        r["artifacts"]["net/net_int8.tflite"]["step"] = 0.03
    rows, ok = pi_check.compare(x86, arm)
    assert ok and {r["artifact"]: r["step"] for r in rows} == {"net/net_float32.tflite": STEP, "net/net_int8.tflite": 0.03}
    x86["artifacts"]["net/net_float32.tflite"]["p_all"] = [0.5 - 0.01]
    assert not pi_check.compare(x86, arm)[1]
