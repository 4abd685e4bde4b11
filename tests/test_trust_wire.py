"""Answers a haematologist can trust, through a real broker and a real agent: every failed capture
is Indeterminate with its reason (never Positive/Negative), held-out images are decided with a
calibrated confidence, explanations come back as a PNG of the image's size, and the served model's
floors hold on what it answers over the wire."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from model import ood
from model.classifier import DEFAULT_ARTIFACT, read_card
from tests.helpers import BASE, REPO
from tests.test_trust import MAX_HELD_OUT_REFUSAL

INFERENCE, DIAGNOSIS, SENSORS = f"{BASE}/Inference", f"{BASE}/Diagnosis", f"{BASE}/Sensors"
HELD_OUT_LIST = read_card(DEFAULT_ARTIFACT.parent)["data"]["splits"]["test"]["file"]  # the served model's test split


@pytest.fixture
def agent(broker, client, start_agent):
    started = start_agent(broker.port)
    client.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    return started


def held_out(data_root, n: int) -> list[bytes]:
    listing = (REPO / HELD_OUT_LIST).read_text().split()
    return [(data_root / p).read_bytes() for p in listing[::len(listing) // n][:n]]


def test_every_failed_capture_is_indeterminate_with_its_reason(client, agent, data_root):
    sets = ood.failed_captures(held_out(data_root, 2))
    sent = 0
    for set_name, payloads in sets.items():
        for n, payload in enumerate(payloads):
            client.publish(INFERENCE, payload, correlation=f"{set_name}-{n}".encode())
            sent += 1
    answers = {}
    while len(answers) < sent:
        reply = client.expect_json(DIAGNOSIS, 30)
        answers[reply["id"]] = reply
    for request_id, reply in answers.items():
        expected = ood.EXPECTED_REASONS[ood.failure_type(request_id.rsplit("-", 1)[0])]
        assert reply["diagnosis"] == "Indeterminate" and reply["reason"] in expected, (request_id, reply)
        assert reply["confidence"] is None
    print(f"\n{sent} failed captures over the wire: all Indeterminate, reasons "
          f"{sorted({r['reason'] for r in answers.values()})}")


def test_indeterminate_answer_and_its_sensors_record(client, agent):
    blank = ood.encode(np.full((224, 224, 3), 255, np.uint8))
    client.publish(INFERENCE, blank, correlation=b"blank")
    reply = client.expect_json(DIAGNOSIS, id="blank")
    record = json.loads(client.expect(SENSORS).payload)
    assert reply["diagnosis"] == "Indeterminate" and reply["reason"] == "overexposed"
    assert record["Value"] == "Indeterminate" and record["id"] == "blank" and "overexposed" in record["Message"]
    assert len((record["Sensor"] + record["Type"] + record["Value"] + record["Message"]).encode()) <= 72


def test_held_out_images_are_decided_with_calibrated_confidence(client, agent, data_root):
    decided = 0
    for n, payload in enumerate(held_out(data_root, 12)):
        client.publish(INFERENCE, payload, correlation=f"held-{n}".encode())
        reply = client.expect_json(DIAGNOSIS, id=f"held-{n}")
        if reply["diagnosis"] != "Indeterminate":
            decided += 1
            assert reply["diagnosis"] in ("Positive", "Negative") and reply["confidence"] >= 0.5, reply
    assert decided >= 8  # measured 9 of these 12: 2 of them benign, half of which the band refuses


def test_explanation_is_a_png_of_the_image_size(client, agent, data_root):
    image = (data_root / "Pre/WBC-Malignant-Pre-010.jpg").read_bytes()
    client.publish(INFERENCE, image, correlation=b"explain-v5", user=[("explain", "1")])
    reply = client.expect_json(DIAGNOSIS, id="explain-v5")
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(reply["explanation"]["png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert heat is not None and heat.shape[:2] == (224, 224) and reply["explanation"]["ms"] > 0
    assert reply["explanation"]["method"]
    envelope = {"id": "explain-env", "image": base64.b64encode(image).decode(), "explain": True}
    client.publish(INFERENCE, json.dumps(envelope))
    assert "png" in client.expect_json(DIAGNOSIS, id="explain-env")["explanation"]
    client.publish(INFERENCE, image, correlation=b"no-explain")
    assert "explanation" not in client.expect_json(DIAGNOSIS, id="no-explain")
    # An image the gate refused is not read by the network: no heat map of it (a 46 kB request drew an 876 kB
    # answer and ten times the work of one without).
    blank = cv2.imencode(".png", np.full((1200, 1600, 3), 255, np.uint8))[1].tobytes()
    client.publish(INFERENCE, blank, correlation=b"explain-refused", user=[("explain", "1")])
    refused = client.expect_json(DIAGNOSIS, id="explain-refused")
    assert refused["diagnosis"] == "Indeterminate" and refused["reason"] == "overexposed", refused
    assert "explanation" not in refused


def test_served_model_floors_on_what_it_answers_over_the_wire(client, agent, data_root, tmp_path):
    """The whole held-out split replayed through the broker: refusal and the floors on decided images."""
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "agent.replay", HELD_OUT_LIST, "--data", str(data_root),
                             "--config", str(agent.config), "--quiet", "--json", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    refused = sum(report["indeterminate"].values())
    m = report["metrics"]
    print(f"\nheld-out over the wire: {report['images']} images, {refused} indeterminate "
          f"({refused / report['images']:.2%}: {report['indeterminate']}), on decided: sensitivity {m['sensitivity']:.3f} "
          f"specificity {m['specificity']:.3f}")
    assert report["answered"] == report["images"] and not report["errors"]
    assert refused / report["images"] <= MAX_HELD_OUT_REFUSAL  # measured 55 of 506 in-process (tests/test_trust.py)
    assert m["sensitivity"] >= 0.985 and m["specificity"] >= 0.97
