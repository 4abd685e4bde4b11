"""The agent against a real Mosquitto: HIAS Status/Life/Sensors/Commands, both request forms,
every error code, config errors, and a replay of real images."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.classifier import DEFAULT_ARTIFACT
from tests.helpers import BASE, REPO, Client

STATUS, LIFE, INFERENCE = f"{BASE}/Status", f"{BASE}/Life", f"{BASE}/Inference"
DIAGNOSIS, SENSORS, COMMANDS = f"{BASE}/Diagnosis", f"{BASE}/Sensors", f"{BASE}/Commands"


@pytest.fixture
def image(data_root) -> bytes:
    return (data_root / "Pro" / "WBC-Malignant-Pro-089.jpg").read_bytes()


@pytest.fixture
def online(broker, client, start_agent):
    agent = start_agent(broker.port)
    assert client.expect(STATUS, 20, lambda m: m.payload == b"ONLINE")
    return agent


def test_status_is_retained_online_then_offline_on_sigterm(broker, client, online):
    late = Client(broker.port).subscribe(STATUS)  # a late subscriber sees the retained state
    message = late.expect(STATUS)
    assert message.payload == b"ONLINE" and message.retain and message.qos == 1
    late.close()
    assert online.terminate() == 0
    offline = client.expect(STATUS, 15, lambda m: m.payload == b"OFFLINE")
    assert dict(offline.properties.UserProperty)["reason"] == "shutdown"  # the agent's own, not its Last Will
    after = Client(broker.port).subscribe(STATUS)
    assert after.expect(STATUS).payload == b"OFFLINE"
    after.close()


def test_last_will_publishes_offline_after_kill_9(broker, client, online):
    online.kill()
    message = client.expect(STATUS, 20, lambda m: m.payload == b"OFFLINE")
    assert message.qos == 1 and dict(message.properties.UserProperty)["reason"] == "connection lost"


def test_life_has_numeric_hias_fields(client, online):
    life = json.loads(client.expect(LIFE, 15).payload)
    for key in ("CPU", "Memory", "Diskspace", "Latitude", "Longitude"):
        assert isinstance(life[key], (int, float)) and not isinstance(life[key], bool), key
    assert life["Temperature"] is None or isinstance(life["Temperature"], (int, float))
    assert life["Agent"]["model"] == DEFAULT_ARTIFACT.parent.name


def test_raw_bytes_with_v5_response_topic_and_correlation(client, online, image):
    reply_topic = f"{DIAGNOSIS}/requester-1/r"  # private replies live under the Diagnosis topic
    client.publish(INFERENCE, image, response_topic=reply_topic, correlation=b"req-1",
                   user=[("name", "WBC-Malignant-Pro-089.jpg")])
    message = client.expect(reply_topic)
    reply = json.loads(message.payload)
    assert message.properties.CorrelationData == b"req-1"
    assert reply["id"] == "req-1" and reply["name"] == "WBC-Malignant-Pro-089.jpg"
    assert reply["diagnosis"] in ("Positive", "Negative")
    assert set(reply["probabilities"]) == {"Benign", "ALL"}
    assert abs(sum(reply["probabilities"].values()) - 1) < 0.01  # rounded to 6 digits (an int8 softmax: 1/256 steps)
    assert 0 <= reply["confidence"] <= 1
    assert set(reply["model"]) == {"name", "version", "sha256"} and len(reply["model"]["sha256"]) == 64
    assert set(reply["timing_ms"]) == {"decode", "inference", "total"}
    assert reply["device"] == "allds-agent" and reply["ts"].endswith("Z")
    import hashlib

    assert reply["sha256"] == hashlib.sha256(image).hexdigest()
    sensors = json.loads(client.expect(SENSORS).payload)
    assert sensors["Type"] == "GeniSysAI" and sensors["Sensor"] == "ALL Classifier"
    assert sensors["Value"] == reply["diagnosis"]
    assert sensors["Message"] == ("Acute Lymphoblastic Leukemia detected!" if reply["diagnosis"] == "Positive"
                                  else "No Acute Lymphoblastic Leukemia detected")
    assert sensors["id"] == "req-1"


def test_json_envelope_on_mqtt_311(broker, online, image):
    old = Client(broker.port, v5=False).subscribe(f"{BASE}/#")
    envelope = {"id": "env-1", "name": "cell.jpg", "image": base64.b64encode(image).decode()}
    old.publish(INFERENCE, json.dumps(envelope))
    reply = old.expect_json(DIAGNOSIS, id="env-1")
    assert reply["name"] == "cell.jpg" and reply["diagnosis"] in ("Positive", "Negative")
    old.close()


@pytest.mark.parametrize("payload, code, request_id", [
    (b"\x00garbage bytes, not an image", "not_an_image", "bad-1"),
    (b"", "empty_payload", "bad-1"),
    (b'{"id": "bad-b64", "image": "!!!not base64!!!"}', "bad_base64", "bad-b64"),
    (b'{"id": "bad-json", "image": ', "bad_json", "bad-1"),
    (b'{"image": 5}', "bad_request", "bad-1"),
    (b'{"id": "not-utf8", "image": "\xff\xfe"}', "bad_json", "bad-1"),
])
def test_error_codes_then_keeps_serving(client, online, image, payload, code, request_id):
    client.publish(INFERENCE, payload, correlation=b"bad-1")
    reply = client.expect_json(DIAGNOSIS, id=request_id)
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    assert reply["payload_sha256"] == hashlib.sha256(payload).hexdigest()  # what a client checks it against
    client.publish(INFERENCE, image, correlation=b"good-after")
    assert client.expect_json(DIAGNOSIS, id="good-after")["diagnosis"] in ("Positive", "Negative")


def test_truncated_jpeg_and_oversized_payload(broker, client, start_agent, image):
    start_agent(broker.port, inference={"max_payload_bytes": 100_000})
    client.expect(STATUS, 20, lambda m: m.payload == b"ONLINE")
    client.publish(INFERENCE, image[: len(image) // 2], correlation=b"trunc")
    assert client.expect_json(DIAGNOSIS, id="trunc")["error"]["code"] == "not_an_image"
    client.publish(INFERENCE, b"\xff" * 100_001, correlation=b"big")
    assert client.expect_json(DIAGNOSIS, id="big")["error"]["code"] == "payload_too_large"
    client.publish(INFERENCE, image, correlation=b"fine")
    assert "diagnosis" in client.expect_json(DIAGNOSIS, id="fine")


def test_commands_life_reload_and_errors(client, online, image):
    client.expect(LIFE, 15)  # the one sent at connect
    client.publish(COMMANDS, json.dumps({"From": "hias", "Type": "Life", "Value": "", "Message": ""}))
    assert json.loads(client.expect(LIFE, 10).payload)["CPU"] >= 0
    client.publish(COMMANDS, json.dumps({"From": "hias", "Type": "Reload", "Value": None, "Message": ""}))
    deadline = time.monotonic() + 15
    while "model active:" not in online.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "model active:" in online.log()
    for bad in (b"not json", json.dumps({"Type": "Explode"}).encode(), json.dumps({"Type": 5}).encode(),
                json.dumps(["Life"]).encode()):
        client.publish(COMMANDS, bad)
        assert client.expect_json(DIAGNOSIS)["error"]["code"] == "bad_command"
    client.publish(INFERENCE, image, correlation=b"after-commands")
    assert "diagnosis" in client.expect_json(DIAGNOSIS, id="after-commands")


def _run_agent(config_text: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "bad.yaml"
    path.write_text(config_text)
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("text, names", [
    ("broker: {port: nope}", "broker.port"),
    ("broker: {host: 10.1.2.3}", "broker.tls.enabled"),
    ("hias: {topic_root: Device}", "hias.topic_root"),
    ("inference: {max_batch: 0}", "inference.max_batch"),
    ("logging: {colour: true}", "logging.colour"),
    ("broker: [", "not valid YAML"),
    ("broker: {port: 70000}", "broker.port"),
    ("broker: {keepalive: 100000}", "broker.keepalive"),
    ("hias: {device: '#'}", "hias.device"),
    ("hias: {name: 'a/b'}", "hias.name"),
    ("broker: {client_id: '+'}", "broker.client_id"),
    ("inference: {request_topic: '#'}", "inference.request_topic"),
    ("inference: {shared_group: 'a/b'}", "inference.shared_group"),
    ("inference: {reply_topics: ['$SYS/#']}", "inference.reply_topics"),
    ("broker: {session_expiry_s: 0}", "broker.session_expiry_s"),
    ("broker: {host: 10.1.2.3, allow_insecure: true, username: u, password_env: HOME}", "broker.username"),
    ("model: {path: x.tflite}", "model.path"),
    ("model: {name: ../etc}", "model.name"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, text, names):
    result = _run_agent(text, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in result.stderr


def test_unreadable_password_file_is_one_line():
    """The agent's user cannot read the secret (root's, 0600): one line, exit 2."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        public = Path(folder)
        public.chmod(0o755)  # pytest's own tmp_path is private to root
        secret = public / "secret"
        secret.write_text("pw")
        secret.chmod(0o600)
        path = public / "agent.yaml"
        path.write_text(f"broker: {{username: u, password_file: {secret}}}\n")
        path.chmod(0o644)
        result = _run_as_nobody(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broker.password_file" in lines[0] and "Traceback" not in result.stderr


def _run_as_nobody(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "agent",
                           "--config", str(path)], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_replay_of_real_images(broker, client, online, data_root, tmp_path):
    listing = tmp_path / "list.txt"
    test_list = (REPO / "data/aria2021/grouped/test.txt").read_text().splitlines()
    listing.write_text("\n".join(test_list[::4][:120]) + "\n")
    config = online.config
    result = subprocess.run([sys.executable, "-m", "agent.replay", str(listing), "--data", str(data_root),
                             "--config", str(config), "--json", str(tmp_path / "r.json"),
                             "--report-dir", str(tmp_path / "report")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 120 and report["answered"] == 120 and not report["missing"]
    assert "Acute Lymphoblastic Leukemia correctly detected (True Positive)" in result.stdout
    assert "sensitivity" in result.stdout and "latency ms: p50" in result.stdout
    m = report["metrics"]
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] + sum(report["indeterminate"].values()) == 120


def test_replay_keeps_only_answers_about_the_image_it_sent(broker, data_root, tmp_path):
    """Another requester may publish onto a replay's reply topic (it only has to learn the topic) an answer
    under a replayed id: every answer names the SHA-256 of the image it is about, and replay keeps only
    those about the image it sent. Here a forger answers each request first with a Positive about other
    bytes, then the genuine-looking Negative about the sent ones; no agent runs. An error names the SHA-256 of
    the payload it refuses: a forged error about other bytes is dropped too (it displaced the diagnosis)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from tests.helpers import write_config

    forger = Client(broker.port)

    def answer(client, userdata, message):
        reply_to, correlation = message.properties.ResponseTopic, message.properties.CorrelationData
        request_id = correlation.decode()
        for body in ({"id": request_id, "error": {"code": "not_an_image", "message": "forged"},
                      "payload_sha256": hashlib.sha256(b"other bytes").hexdigest()},
                     {"id": request_id, "sha256": "0" * 64, "diagnosis": "Positive", "reason": None},
                     {"id": request_id, "sha256": hashlib.sha256(message.payload).hexdigest(), "diagnosis": "Negative",
                      "reason": None}):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
            client.publish(reply_to, json.dumps(body), qos=1, properties=props)

    forger.client.on_message = answer
    forger.subscribe(INFERENCE)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"Benign/WBC-Benign-{n:03d}.jpg" for n in range(1, 6)) + "\n")
    result = subprocess.run([sys.executable, "-m", "agent.replay", str(listing), "--data", str(data_root),
                             "--config", str(write_config(tmp_path / "replay.yaml", broker.port)),
                             "--json", str(tmp_path / "r.json"), "--timeout", "20"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    forger.close()
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["reply"]["diagnosis"] for r in report["results"]] == ["Negative"] * 5, result.stdout
    assert report["foreign_answers"] == 10 and "10 answers about other images ignored" in result.stdout, result.stdout


@pytest.mark.parametrize("name", ["cellnet", "cellnet_standardised_subtype"])  # allds2020: tests/test_delivery.py
def test_each_selectable_model_serves_over_the_wire(broker, client, start_agent, image, name):
    """`model.name` picks any shipped model besides the default (which mixes float32 and int8 ops)."""
    start_agent(broker.port, model={"name": name})
    assert client.expect(STATUS, 30, lambda m: m.payload == b"ONLINE")
    assert json.loads(client.expect(LIFE, 15).payload)["Agent"]["model"] == name
    client.publish(INFERENCE, json.dumps({"id": name, "image": base64.b64encode(image).decode()}))
    reply = client.expect_json(DIAGNOSIS, 30, id=name)
    assert reply["model"]["name"] == name and reply["diagnosis"] == "Positive", reply
