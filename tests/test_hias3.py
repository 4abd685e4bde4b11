"""The hias3 dialect and HIAS's Diagnosis page, against a real broker and a real agent, with the
payloads checked by HIAS 3's own parsing rules (tests/hias3_shapes.py, written from its source)."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import pytest

from tests import hias3_shapes as hias3
from tests.helpers import Client, free_port

ZONE = "allds-location/Agents/allds-zone"
BASE = f"{ZONE}/allds-device"
HIAS3 = {"hias": {"topic_root": "Agents", "dialect": "hias3"}}


def test_hias3_topics_and_payloads_parse_as_hias3_parses_them(broker, start_agent, data_root):
    client = Client(broker.port).subscribe("allds-location/#")
    start_agent(broker.port, **HIAS3)
    first = {}
    while len(first) < 3:  # what comes at connect, in whatever order
        message = client.expect(f"{BASE}/#", 20)
        first.setdefault(message.topic.rsplit("/", 1)[1], message)
        first = {k: v for k, v in first.items() if k in ("Status", "Life", "Classification")}
    status, life, state = first["Status"], first["Life"], first["Classification"]
    assert hias3.dispatch(status.topic) == "Status" and hias3.parse_status(status.payload) == "ONLINE"
    assert hias3.entity(status.topic) == ("Agent", "allds-device")  # HIAS core makes AI agents type Agent
    assert hias3.dispatch(life.topic) == "Life" and hias3.parse_life(life.payload)["cpuUsage"] >= 0
    record = hias3.parse_classification(state.payload, copy.deepcopy(hias3.HIASCDI_MODELS))
    assert record["models"] and record["models"][0]["context"]["state"] == {"value": "active"}
    spoof = "patient-7.jpg: Negative" + " " * 200  # a name that would read as the answer, the real one cut off
    client.publish(f"{BASE}/Inference", (data_root / "Pro/WBC-Malignant-Pro-010.jpg").read_bytes(), correlation=b"h3",
                   user=[("name", spoof)])
    answer = client.expect_json(f"{BASE}/Diagnosis", 15, id="h3")
    sensors = client.expect(f"{BASE}/Sensors", 10)
    assert hias3.parse_sensors(sensors.payload, {"GeniSysAI": {}})["Value"] == answer["diagnosis"]
    classification = client.expect(f"{BASE}/Classification", 10)
    assert hias3.dispatch(classification.topic) == "Classification"
    stored = hias3.parse_classification(classification.payload, copy.deepcopy(hias3.HIASCDI_MODELS))
    assert stored["record"]["Type"] == "Diagnosis" and stored["record"]["Value"] == answer["diagnosis"]
    assert stored["record"]["Message"].startswith(f"{answer['diagnosis']}: patient-7.jpg"), stored["record"]  # label first
    assert stored["models"][0]["context"]["properties"]["value"]["Diagnosis"] == {"value": answer["diagnosis"]}
    # HIAS 3 forwards a rule's command to {location}/Devices/{zone}/{device}/Commands in its short shape
    topic, forwarded = hias3.parse_command(json.dumps({**hias3.COMMAND_FROM_HIAS, "Value": "allds2020"}).encode(),
                                           copy.deepcopy(hias3.HIASCDI_DEVICE))
    assert topic == "allds-location/Devices/allds-zone/allds-device/Commands"
    client.publish(topic, json.dumps(forwarded))
    active = client.expect_json(f"{BASE}/ModelState", 30, state="active", name="allds2020")
    assert active["serving"]["name"] == "allds2020"
    client.close()


def test_a_short_fleet_topic_is_one_hias3_cannot_take():
    with pytest.raises(IndexError):  # why model.fleet_topic needs five levels
        hias3.dispatch("allds-location/Agents/allds-zone/Models")
    assert hias3.dispatch("allds-location/Agents/allds-zone/Fleet/Models") is None


def post(port: int, headers: dict, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/Inference", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_hias_diagnosis_page_is_answered_in_its_shape(broker, client, start_agent, data_root):
    port = free_port()
    start_agent(broker.port, http={"port": port, "max_body_bytes": 200_000})
    client.expect("allds-location/Devices/allds-zone/allds-device/Status", 20, lambda m: m.payload == b"ONLINE")
    image = (data_root / "Pro/WBC-Malignant-Pro-010.jpg").read_bytes()
    headers, body = hias3.diagnosis_ui_request(image, "Im006_1.jpg", "hias-user", "secret")
    status, answer = post(port, headers, body)
    doc = json.loads(answer)
    print(f"\nPOST /Inference as HIAS sends it: {status} {doc}")
    assert status == 200 and doc["Response"] == "OK" and doc["Diagnosis"] in ("Positive", "Negative", "Indeterminate")
    assert hias3.diagnosis_ui_result(answer, "Data/allds/Im006_1.jpg") in ("True Positive", "False Negative", "")
    status, answer = post(port, {"Content-Type": "image/jpeg"}, image)  # the reference client's raw body
    assert status == 200 and json.loads(answer)["Response"] == "OK"
    status, answer = post(port, *hias3.diagnosis_ui_request(b"not an image", "x_0.jpg", "u", "p"))
    assert json.loads(answer)["Response"] == "FAILED" and "not_an_image" in json.loads(answer)["Message"]
    assert hias3.diagnosis_ui_result(answer, "x_0.jpg") is None  # the page waits; its script does not fail
    big_headers, big_body = hias3.diagnosis_ui_request(b"\xff" * 300_000, "big_1.jpg", "u", "p")
    status, answer = post(port, big_headers, big_body)
    assert status == 413 and json.loads(answer)["Response"] == "FAILED"


def test_diagnosis_page_refuses_addresses_it_does_not_know(broker, client, start_agent, data_root):
    port = free_port()
    start_agent(broker.port, http={"port": port, "allowed_clients": ["10.20.30.40/32"]})
    client.expect("allds-location/Devices/allds-zone/allds-device/Status", 20, lambda m: m.payload == b"ONLINE")
    status, answer = post(port, {"Content-Type": "image/jpeg"}, (data_root / "Benign/WBC-Benign-010.jpg").read_bytes())
    assert status == 403 and json.loads(answer)["Response"] == "FAILED"
