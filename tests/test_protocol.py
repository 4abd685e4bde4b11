"""The wire parsers are total: whatever bytes arrive, they return a request/command or raise the
project's own error, never anything else; HIAS records stay within bcrypt's 72 bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import protocol
from model.classifier import Diagnosis
from model.gate import QUALITY_RULES
from model.policy import REASONS

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=4096),
                 JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["id", "name", "image", "x"]), JSON_VALUES)
                 .map(lambda d: json.dumps(d).encode()),
                 st.integers(1, 3000).map(lambda n: b"{" + b'"a":[' * n)))
def test_parse_request_is_total(payload):
    try:
        request = protocol.parse_request(payload, None, 10_000)
    except protocol.RequestError as exc:
        assert exc.code in {"bad_json", "bad_request", "bad_base64", "empty_payload", "payload_too_large"}
        return
    assert isinstance(request.id, str) and isinstance(request.image, bytes) and request.image


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=2048),
                 JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["Type", "Value", "From", "Message"]), JSON_VALUES)
                 .map(lambda d: json.dumps(d).encode())))
def test_parse_command_is_total(payload):
    try:
        command = protocol.parse_command(payload)
    except ValueError:
        return
    assert isinstance(command.type, str) and (command.value is None or isinstance(command.value, str))


@pytest.mark.parametrize("text, ok", [
    ('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', True),  # brackets inside a string do not nest
    ('{"a": "\\\\", "b": ' + "[" * 40 + "]" * 40 + "}", False),  # an escaped backslash ends before the quote
    ('{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', True),  # an escaped quote stays in the string
    ("[" * 32 + "]" * 32, True),
    ("[" * 33 + "]" * 33, False),
])
def test_json_nesting_bound_reads_strings_right(text, ok):
    if ok:
        protocol.parse_json(text.encode(), "test")
    else:
        with pytest.raises(ValueError, match="nested deeper"):
            protocol.parse_json(text.encode(), "test")


@pytest.mark.parametrize("label, reason", [("Positive", None), ("Negative", None),
                                           *(("Indeterminate", r) for r in REASONS)])
def test_sensors_record_hashed_part_fits_bcrypt(label, reason):
    diagnosis = Diagnosis(label, reason, 0.9, 0.9 if label == "Positive" else 0.1, {"Benign": 0.1, "ALL": 0.9})
    record = json.loads(protocol.sensors_record(diagnosis, "r-1"))
    hashed = (record["Sensor"] + record["Type"] + record["Value"] + record["Message"]).encode()
    assert len(hashed) <= 72, (label, len(hashed))
    assert record["Value"] == label and record["id"] == "r-1"
    assert reason is None or record["Message"] == f"Refused: {reason}"  # every reason whole


def test_every_gate_reason_is_a_listed_reason():
    assert {r for r, _, _ in QUALITY_RULES} - {"blank"} <= set(REASONS)


def test_reply_routes_never_reach_an_own_channel_even_below_it():
    from agent.config import parse
    from agent.topics import Topics

    base = "allds-location/Devices/allds-zone/allds-device"
    topics = Topics.from_config(parse({"inference": {"reply_topics": ["{base}/#", "replies/#"]}}))
    assert topics.reply_allowed(f"{base}/Diagnosis/me/1") and topics.reply_allowed("replies/x")
    for bad in ("Status", "Status/x", "Life", "Sensors/a/b", "Commands", "Inference", "ModelState", "Model",
                "Classification/x"):
        assert not topics.reply_allowed(f"{base}/{bad}"), bad
    for bad in ("$SYS/x", "replies/+", "replies/#", "", "elsewhere/x"):
        assert not Topics.from_config(parse({})).reply_allowed(bad), bad


def test_correlation_data_too_long_to_be_an_id_is_refused_not_dropped():
    """Correlation Data over 256 bytes was dropped: the answer came back with neither it nor an id the
    requester knew. It is a bad request now, and the error echoes the Correlation Data."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"c" * (protocol.MAX_ID_CHARS + 1)
    with pytest.raises(protocol.RequestError) as info:
        protocol.parse_request(b"\xff\xd8 an image", props, 1024)
    assert info.value.code == "bad_request" and "Correlation Data" in info.value.message
    assert protocol.reply_route(props)[1] == props.CorrelationData  # echoed on the error
    props.CorrelationData = b"c" * protocol.MAX_ID_CHARS
    assert protocol.parse_request(b"\xff\xd8 an image", props, 1024).id == "c" * protocol.MAX_ID_CHARS
