"""Hostile payloads over the wire: each gets a clear answer, memory stays bounded, serving goes on."""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np

from bench.memory import proc_status
from tests.helpers import BASE
from tests.test_preprocess import encode, jpeg_declaring, png_declaring

INFERENCE, DIAGNOSIS, COMMANDS = f"{BASE}/Inference", f"{BASE}/Diagnosis", f"{BASE}/Commands"
RSS_BOUND_MB = 350  # LiteRT agent (~100 MB) + up to 10 payloads of 10 MiB in flight + decode buffers
OVER_LIMIT = 10 * 1024 * 1024 + 1024  # over max_payload_bytes, within the packet headroom: reaches the agent


def test_hostile_payload_suite(broker, client, start_agent, data_root):
    agent = start_agent(broker.port)  # the shipped limits: max_inflight 8, max_payload_bytes 10 MiB
    client.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    jpeg = (data_root / "Benign/WBC-Benign-003.jpg").read_bytes()
    cell = cv2.imread(str(data_root / "Benign/WBC-Benign-003.jpg"))
    refused = {
        "png-bomb": (png_declaring(60000, 60000), "image_too_large"),
        "jpeg-bomb": (jpeg_declaring(jpeg, 60000, 60000), "image_too_large"),
        "one-pixel": (encode(np.zeros((1, 1, 3), np.uint8)), "image_too_small"),
        "sliver": (encode(np.zeros((48, 3000, 3), np.uint8)), "bad_aspect_ratio"),
        "huge-envelope": (b'{"id": "x", "image": "' + b"A" * OVER_LIMIT + b'"}', "payload_too_large"),
        "not-utf8-json": (b'{"id": "\xff\xfe", "image": ""}', "bad_json"),
    }
    for name, (payload, code) in refused.items():
        client.publish(INFERENCE, payload, correlation=name.encode())
        reply = client.expect_json(DIAGNOSIS, id=name)
        assert reply["error"]["code"] == code, (name, reply)
    served = {
        "gray": encode(cv2.cvtColor(cell, cv2.COLOR_BGR2GRAY)),
        "rgba": encode(cv2.cvtColor(cell, cv2.COLOR_BGR2BGRA)),
        "16-bit": encode(cell.astype(np.uint16) * 257),
    }
    for name, payload in served.items():
        client.publish(INFERENCE, payload, correlation=name.encode())
        assert "diagnosis" in client.expect_json(DIAGNOSIS, id=name), name  # grey ones are refused, not failed
    client.publish(INFERENCE, jpeg, correlation=b"big-name", user=[("name", "n" * 60_000)])  # MQTT allows 65,535
    assert client.expect_json(DIAGNOSIS, id="big-name")["error"]["code"] == "bad_request"
    for n in range(10):  # a flood of oversized payloads (larger ones never leave the broker: Maximum Packet Size)
        client.publish(INFERENCE, b"\xff\xd8" + bytes(OVER_LIMIT), correlation=f"flood-{n}".encode())
    for n in range(10):
        assert client.expect_json(DIAGNOSIS, 30, id=f"flood-{n}")["error"]["code"] == "payload_too_large"
    for command in ({"Type": ["Life"]}, {"Type": "Reload", "Value": 42}, {"Type": "Reload", "Value": "/no/such.tflite"}):
        client.publish(COMMANDS, json.dumps(command))
        assert client.expect_json(DIAGNOSIS)["error"]["code"] == "bad_command"
    envelope = {"id": "finally", "name": "ok.jpg", "image": base64.b64encode(jpeg).decode()}
    client.publish(INFERENCE, json.dumps(envelope))
    assert client.expect_json(DIAGNOSIS, id="finally")["diagnosis"] in ("Positive", "Negative")
    peak = proc_status(agent.proc.pid, "VmHWM")
    print(f"\nagent peak RSS {peak:.0f} MB (bound {RSS_BOUND_MB} MB)")
    assert peak < RSS_BOUND_MB
    assert agent.proc.poll() is None
