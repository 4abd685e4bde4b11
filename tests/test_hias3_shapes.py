"""The HIAS 3 rules of tests/hias3_shapes.py on the payloads the hias3 dialect is to publish and accept,
and on the mistakes that would stop HIAS 3's IoT agent (docs/hias.md, "HIAS 3 dialect and the Diagnosis UI")."""

from __future__ import annotations

import copy
import email
import json

import pytest

from tests import hias3_shapes as h3

BASE = "allds-location/Agents/allds-zone/allds-device"


def dumps(payload: object) -> bytes:
    return json.dumps(payload).encode()


def test_topics_hias3_handles_ignores_and_chokes_on():
    assert h3.dispatch(f"{BASE}/Classification") == "Classification"
    assert h3.dispatch(f"{BASE}/Status") == "Status" and h3.dispatch(f"{BASE}/Life") == "Life"
    assert h3.dispatch(f"{BASE}/Classification/extra/levels") == "Classification"  # only level 4 counts
    assert h3.dispatch("allds-location/AiAgents/allds-zone/allds-device/Commands") == "Commands"
    for ignored in ("Diagnosis", "Inference", "Model", "ModelState", "Models", "States", "AiModel", "Integrity"):
        assert h3.dispatch(f"{BASE}/{ignored}") is None, ignored
    assert h3.dispatch(f"{BASE}/Diagnosis/operator/42") is None
    with pytest.raises(IndexError):  # a zone-wide topic one level short of a device's
        h3.dispatch("allds-location/Agents/allds-zone/Models")
    with pytest.raises(UnboundLocalError):
        h3.dispatch("allds-location/allds/allds-zone/allds-device/Models")
    with pytest.raises(AttributeError):
        h3.dispatch(f"{BASE}/Actuators")
    assert h3.dispatch("allds-location/Agents/allds-zone/Fleet/Models") is None
    assert h3.entity(f"{BASE}/Life") == ("Agent", "allds-device")
    assert h3.entity("allds-location/AiAgents/allds-zone/allds-device/Life") == ("AiAgent", "allds-device")
    assert h3.entity("allds-location/Devices/allds-zone/allds-device/Life") == ("Device", "allds-device")


def test_classification_diagnosis_and_state_payloads():
    models = copy.deepcopy(h3.HIASCDI_MODELS)
    done = h3.parse_classification(dumps(h3.CLASSIFICATION_DIAGNOSIS), models)
    assert done["record"] | {"AiAgent": None} == {"AiAgent": None, "Type": "Diagnosis", "Value": "Positive",
                                                  "Message": h3.CLASSIFICATION_DIAGNOSIS["Message"]}
    assert done["models"][0]["context"]["properties"]["value"]["Diagnosis"] == {"value": "Positive"}
    done = h3.parse_classification(dumps(h3.CLASSIFICATION_STATE), models)
    assert (done["record"]["Type"], done["record"]["Value"]) == ("State", "active")
    assert done["models"][0]["context"]["state"] == {"value": "active"}
    undeclared = h3.parse_classification(dumps(h3.CLASSIFICATION_STATE | {"State": "sleeping"}), models)
    assert undeclared["record"]["Value"] == "sleeping" and undeclared["models"][0]["context"]["state"] == {"value": "active"}


def test_classification_mistakes():
    models = copy.deepcopy(h3.HIASCDI_MODELS)
    other = h3.parse_classification(dumps(h3.CLASSIFICATION_DIAGNOSIS | {"Model": "Cellnet_Standardised"}), models)
    assert other["models"] == []  # HIAS would write back an empty model list for the agent
    for missing in ("Model", "Message", "Value"):
        with pytest.raises(KeyError, match=missing):
            h3.parse_classification(dumps({k: v for k, v in h3.CLASSIFICATION_DIAGNOSIS.items() if k != missing}),
                                    copy.deepcopy(h3.HIASCDI_MODELS))
    with pytest.raises(KeyError, match="State"):  # neither Value nor State
        h3.parse_classification(dumps({"Model": "cellnet", "Message": "m"}), models)
    with pytest.raises(ValueError):
        h3.parse_classification(b"Positive", models)
    assert h3.parse_classification(dumps(h3.CLASSIFICATION_DIAGNOSIS), None) is None


def test_life_must_carry_six_numbers():
    assert h3.parse_life(dumps(h3.LIFE))["location"] == [h3.LIFE["Latitude"], h3.LIFE["Longitude"]]
    assert h3.parse_life(dumps(h3.LIFE | {"CPU": "12.5", "Agent": {"model": "cellnet"}}))["cpuUsage"] == 12.5
    with pytest.raises(TypeError):  # a Pi without a temperature reading must not send null
        h3.parse_life(dumps(h3.LIFE | {"Temperature": None}))
    with pytest.raises(KeyError):
        h3.parse_life(dumps({k: v for k, v in h3.LIFE.items() if k != "Temperature"}))


def test_sensors_records_need_an_entity_attribute_named_by_type():
    record = {"Type": "GeniSysAI", "Sensor": "ALL Classifier", "Value": "Positive", "Message": "detected"}
    assert h3.parse_sensors(dumps(record), {"networkStatus": {}, "models": {}}) is None
    assert h3.parse_sensors(dumps(record), {"GeniSysAI": {}}) == record
    with pytest.raises(KeyError):
        h3.parse_sensors(dumps({k: v for k, v in record.items() if k != "Sensor"}), {"GeniSysAI": {}})


def test_commands_from_hias_reach_devices_in_the_short_shape():
    topic, forwarded = h3.parse_command(dumps(h3.COMMAND_FROM_HIAS), copy.deepcopy(h3.HIASCDI_DEVICE))
    assert topic == "allds-location/Devices/allds-zone/allds-device/Commands"
    assert forwarded == h3.COMMAND_TO_DEVICE
    assert h3.parse_command(dumps(h3.COMMAND_TO_DEVICE)) is None  # the forwarded shape is not forwarded again
    assert h3.parse_command(dumps(h3.COMMAND_FROM_HIAS | {"Use": "Agent"})) is None  # only devices are addressed
    assert h3.parse_command(dumps(h3.COMMAND_FROM_HIAS | {"Value": "unknown"}), h3.HIASCDI_DEVICE) is None
    assert h3.parse_command(dumps(h3.COMMAND_FROM_HIAS | {"Property": "colour"}), h3.HIASCDI_DEVICE) is None
    for missing in ("To", "Zone", "Message"):
        with pytest.raises(KeyError, match=missing):
            h3.parse_command(dumps({k: v for k, v in h3.COMMAND_FROM_HIAS.items() if k != missing}))


def test_diagnosis_ui_request_and_the_results_it_scores():
    headers, body = h3.diagnosis_ui_request(b"\xff\xd8jpeg bytes\xff\xd9", "Im006_1.jpg", "nurse", "s3cret")
    assert headers["Authorization"] == "Basic bnVyc2U6czNjcmV0"
    form = email.message_from_bytes(f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
    (part,) = form.get_payload()
    assert part.get_param("name", header="content-disposition") == "file" and part.get_filename() == "Im006_1.jpg"
    assert part.get_payload(decode=True) == b"\xff\xd8jpeg bytes\xff\xd9"
    answer = {"Response": "OK", "Message": "Acute Lymphoblastic Leukemia detected!", "Diagnosis": "Positive"}
    assert h3.diagnosis_ui_result(dumps(answer), "Data/all/Im006_1.jpg") == "True Positive"
    assert h3.diagnosis_ui_result(dumps(answer), "Data/all/Im035_0.jpg") == "False Positive"
    assert h3.diagnosis_ui_result(dumps(answer | {"Diagnosis": "Negative"}), "Data/all/Im035_0.jpg") == "True Negative"
    assert h3.diagnosis_ui_result(dumps(answer | {"Diagnosis": "Negative"}), "Data/all/Im006_1.jpg") == "False Negative"
    assert h3.diagnosis_ui_result(dumps(answer | {"Diagnosis": "Indeterminate"}), "Data/all/Im006_1.jpg") == ""
    assert h3.diagnosis_ui_result(dumps(answer), "Data/all/WBC-Malignant-Pro-801.jpg") == ""  # no label in the name
    assert h3.diagnosis_ui_result(dumps(answer | {"Response": "FAILED"}), "Data/all/Im006_1.jpg") is None
    for broken in (b"null", b"<html>502 Bad Gateway</html>"):
        with pytest.raises(TypeError):
            h3.diagnosis_ui_result(broken, "Data/all/Im006_1.jpg")
