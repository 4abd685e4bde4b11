"""One message must never silence, crash, flood or mislead the agent: each attack of the hardening
issue, reproduced against a real Mosquitto and a real agent process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time

import pytest

from tests.helpers import BASE, Broker, Client, free_port

STATUS, LIFE, INFERENCE = f"{BASE}/Status", f"{BASE}/Life", f"{BASE}/Inference"
DIAGNOSIS, SENSORS, COMMANDS, MODEL_STATE = f"{BASE}/Diagnosis", f"{BASE}/Sensors", f"{BASE}/Commands", f"{BASE}/ModelState"
DEEP_COMMAND = b'{"Type": "Life", "Value": ' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.fixture
def image(data_root) -> bytes:
    return (data_root / "Pre" / "WBC-Malignant-Pre-010.jpg").read_bytes()


def online(client: Client, timeout: float = 20) -> None:
    client.expect(STATUS, timeout, lambda m: m.payload == b"ONLINE")


def served(client: Client, image: bytes, request_id: str, timeout: float = 15) -> dict:
    client.publish(INFERENCE, image, correlation=request_id.encode())
    reply = client.expect_json(DIAGNOSIS, timeout, id=request_id)
    assert reply.get("diagnosis") in ("Positive", "Negative", "Indeterminate"), reply
    return reply


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def wait_log(agent, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in agent.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the agent log:\n{agent.log()[-3000:]}")
        time.sleep(0.05)


# ---- 1. poison command ---------------------------------------------------------------------
def test_deep_command_is_answered_and_survives_no_restart(broker, client, start_agent, image):
    agent = start_agent(broker.port)
    online(client)
    client.publish(COMMANDS, DEEP_COMMAND)
    reply = client.expect_json(DIAGNOSIS)
    assert reply["error"]["code"] == "bad_command" and "nest" in reply["error"]["message"], reply
    served(client, image, "after-deep")
    assert "Exception in thread" not in agent.log() and "Traceback" not in agent.log()
    assert agent.terminate() == 0
    agent.start()
    online(client)
    served(client, image, "after-restart")
    assert agent.log().count("malformed command") == 1  # acknowledged once: not redelivered


def test_retained_commands_are_not_executed(broker, client, start_agent, image):
    client.publish(COMMANDS, json.dumps({"Type": "Reload", "Value": "cellnet"}), retain=True)
    agent = start_agent(broker.port)
    online(client)
    reply = client.expect_json(DIAGNOSIS)
    assert reply["error"]["code"] == "bad_command" and "retained" in reply["error"]["message"]
    served(client, image, "after-retained")
    assert "model active:" not in agent.log()


def test_a_retained_request_is_refused_not_diagnosed_on_every_connect(broker, client, start_agent, image):
    """A request published retained comes again on every (re)connect: answered, it added a Positive record to
    HIAS's Sensors topic each time the agent restarted."""
    client.publish(INFERENCE, image, correlation=b"retained-request", retain=True)
    agent = start_agent(broker.port)
    for attempt in range(2):
        online(client)
        reply = client.expect_json(DIAGNOSIS, id="retained-request")
        assert reply["error"]["code"] == "retained_request" and "mosquitto_pub -r -n" in reply["error"]["message"], reply
        served(client, image, f"after-retained-{attempt}")
        assert agent.terminate() == 0
        agent.start()
    online(client)
    client.publish(INFERENCE, image, correlation=b"retained-live", retain=True)  # while the agent is connected
    reply = client.expect_json(DIAGNOSIS, id="retained-live")
    assert reply["error"]["code"] == "retained_request", reply  # MQTT 5: the agent subscribes Retain As Published
    assert "request id=retained-request" not in agent.log()  # never diagnosed, never a Sensors record


def test_a_request_cannot_write_lines_of_its_own_into_the_agent_log(broker, client, start_agent, image):
    """Ids and names come from the requester: a newline in them forged whole log lines ("... diagnosis=Positive",
    "ERROR allds.agent unhealthy") that an operator or a log shipper reads as the agent's."""
    agent = start_agent(broker.port)
    online(client)
    forged = "x\n2026-12-02 01:02:03,456 INFO allds.service request id=forged-line diagnosis=Positive\r\u2028\u202e"
    client.publish(INFERENCE, image, correlation=forged.encode())
    client.expect_json(DIAGNOSIS, id=forged)
    envelope = json.dumps({"id": "y\nERROR allds.agent unhealthy", "name": "z\x1b[2Jname",
                           "image": base64.b64encode(image).decode()})
    client.publish(INFERENCE, envelope)
    client.expect_json(DIAGNOSIS, id="y\nERROR allds.agent unhealthy")
    lines = agent.log().splitlines()
    assert not [line for line in lines if line.startswith(("2026-12-02 01:02:03", "ERROR allds.agent"))], lines[-6:]
    assert "\x1b" not in agent.log() and "\u2028" not in agent.log() and "\u202e" not in agent.log()  # bidi: reorders
    assert "x\\n2026-12-02 01:02:03,456" in agent.log()  # written, escaped


# ---- 2. packet size --------------------------------------------------------------------------
def test_150_mb_publish_never_reaches_the_agent(broker, client, start_agent, image):
    agent = start_agent(broker.port)
    online(client)
    client.publish(INFERENCE, b"\xff\xd8" + bytes(150 * 1024 * 1024), correlation=b"huge")
    served(client, image, "after-huge")
    peak = peak_rss_mb(agent.proc.pid)
    print(f"\nagent peak RSS after a 150 MB publish: {peak:.0f} MB")
    assert peak < 200
    assert agent.proc.poll() is None


# ---- 3. reconnect storms -----------------------------------------------------------------------
def test_two_agents_with_one_client_id_do_not_storm(broker, start_agent):
    """Two Pis cloned from one SD card (one hias.name): the shipped backoff keeps them from flooding the broker."""
    shipped = {"reconnect_min_s": 0.5, "reconnect_max_s": 30.0}
    watcher = Client(broker.port).subscribe(f"{BASE}/#")
    first = start_agent(broker.port, name="twin1", broker=shipped)
    online(watcher)
    second = start_agent(broker.port, name="twin2", broker=shipped)
    time.sleep(10)
    count = watcher.messages.qsize()
    print(f"\n{count} messages on the broker in 10 s of twins")
    assert count <= 36
    assert any("another client may use client id allds-agent" in a.log() for a in (first, second))
    for agent in (first, second):
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    watcher.close()


# ---- 4. and 5. reply routes --------------------------------------------------------------------
@pytest.mark.parametrize("channel", ["Status", "Life", "Sensors", "Commands", "Inference", "ModelState"])
def test_response_topic_on_an_own_channel_is_refused(broker, client, start_agent, image, channel):
    start_agent(broker.port)
    online(client)
    client.expect(LIFE, 10)
    client.publish(INFERENCE, image, response_topic=f"{BASE}/{channel}", correlation=b"steer")
    reply = client.expect_json(DIAGNOSIS, id="steer")
    assert reply["error"]["code"] == "bad_response_topic" and reply["device"] == "allds-agent"
    time.sleep(0.5)
    while not client.messages.empty():  # nothing foreign on the device's own channels
        message = client.messages.get()
        if message.topic in (STATUS, LIFE, SENSORS, MODEL_STATE):
            assert b'"diagnosis"' not in message.payload and b'"error"' not in message.payload, message.topic
    served(client, image, "after-steer")


def test_response_topic_outside_the_allowed_prefix_is_refused_but_inside_is_served(broker, client, start_agent, image):
    start_agent(broker.port)
    online(client)
    client.subscribe("elsewhere/#")
    client.publish(INFERENCE, image, response_topic="elsewhere/x", correlation=b"out")
    assert client.expect_json(DIAGNOSIS, id="out")["error"]["code"] == "bad_response_topic"
    client.publish(INFERENCE, image, response_topic=f"{DIAGNOSIS}/me/r1", correlation=b"in")
    message = client.expect(f"{DIAGNOSIS}/me/r1")
    assert json.loads(message.payload)["id"] == "in" and message.properties.CorrelationData == b"in"


def test_reply_rejected_by_the_broker_is_answered_on_the_default_topic(tmp_path, start_agent, image):
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {BASE}/#\ntopic read replies/#\n")  # replies/# is not writable
    broker = Broker(tmp_path / "broker", extra=f"acl_file {acl}").start()
    try:
        client = Client(broker.port).subscribe(f"{BASE}/#")
        agent = start_agent(broker.port, inference={"reply_topics": ["{base}/Diagnosis/#", "replies/#"]})
        online(client)
        client.publish(INFERENCE, image, response_topic="replies/r1", correlation=b"rejected")
        reply = client.expect_json(DIAGNOSIS, id="rejected")
        assert reply["error"]["code"] == "reply_rejected", reply
        served(client, image, "after-rejected")
        assert agent.proc.poll() is None
        client.close()
    finally:
        broker.stop()


# ---- 6. and 7. model authority -------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path):
    """A model directory with the shipped models and three bad ones."""
    from model.classifier import DEFAULT_ARTIFACT

    root = tmp_path / "models"
    shipped = DEFAULT_ARTIFACT.parent.parent
    for name in ("cellnet", "allds2020"):
        shutil.copytree(shipped / name, root / name)
    card = json.loads((shipped / "cellnet/model_card.json").read_text())
    int8 = card["artifacts"]["int8"]["file"]
    noise = os.urandom(4096)  # random bytes whose card lists their true sha256: only loading can refuse them
    (root / "random").mkdir()
    (root / "random/model_card.json").write_text(json.dumps(
        {**card, "artifacts": {**card["artifacts"], "int8": {"file": int8, "sha256": hashlib.sha256(noise).hexdigest()}}}))
    (root / "random" / int8).write_bytes(noise)
    card["artifacts"]["int8"]["sha256"] = "0" * 64
    (root / "wrongsha").mkdir()
    (root / "wrongsha/model_card.json").write_text(json.dumps(card))
    shutil.copy(shipped / "cellnet" / int8, root / "wrongsha" / int8)
    return root


def test_reload_takes_names_only_and_never_swaps_in_a_bad_model(broker, client, start_agent, image, model_dir):
    agent = start_agent(broker.port, model={"dir": str(model_dir), "name": "cellnet"})
    online(client)
    state = client.expect_json(MODEL_STATE, 10)
    assert state["state"] == "active" and state["name"] == "cellnet" and len(state["sha256"]) == 64
    serving_sha = state["sha256"]
    for value, words in (("/etc/passwd", "not a model name"), ("../cellnet", "not a model name"),
                         ("nosuchmodel", "unknown model"), ("random", "failed"), ("wrongsha", "sha256")):
        client.publish(COMMANDS, json.dumps({"From": "operator", "Type": "Reload", "Value": value}))
        if value in ("random", "wrongsha"):  # published before the command's error reply
            failed = client.expect_json(MODEL_STATE, 30, state="failed")
            assert failed["name"] == value and failed["reason"] and failed["serving"]["sha256"] == serving_sha
        reply = client.expect_json(DIAGNOSIS, 30)
        assert reply["error"]["code"] == "bad_command" and words in reply["error"]["message"], (value, reply)
        assert "/etc" not in reply["error"]["message"] and str(model_dir) not in reply["error"]["message"]
        answer = served(client, image, f"after-{value.strip('./')}")
        assert answer["model"]["sha256"] == serving_sha, value
    client.publish(COMMANDS, json.dumps({"From": "operator", "Type": "Reload", "Value": "allds2020"}))
    active = client.expect_json(MODEL_STATE, 30, state="active", name="allds2020")
    assert served(client, image, "after-good-reload")["model"]["sha256"] == active["sha256"]
    retained = Client(broker.port).subscribe(MODEL_STATE)
    assert json.loads(retained.expect(MODEL_STATE).payload)["name"] == "allds2020"
    retained.close()
    assert "Traceback" not in agent.log()


# ---- 8. config ranges, envelope leniency -----------------------------------------------------------
def test_envelopes_that_are_safe_to_accept(broker, client, start_agent, image):
    import base64

    start_agent(broker.port)
    online(client)
    b64 = base64.b64encode(image).decode()
    wrapped = "\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    for request_id, payload in (
        ("bom", b"\xef\xbb\xbf" + json.dumps({"id": "bom", "image": b64}).encode()),
        ("wrapped", json.dumps({"id": "wrapped", "image": wrapped}).encode()),
        ("data-uri", json.dumps({"id": "data-uri", "image": "data:image/jpeg;base64," + b64}).encode()),
    ):
        client.publish(INFERENCE, payload)
        assert "diagnosis" in client.expect_json(DIAGNOSIS, id=request_id), request_id
    client.publish(INFERENCE, image + os.urandom(20_000), correlation=b"motion-photo")
    assert "diagnosis" in client.expect_json(DIAGNOSIS, id="motion-photo")
    for payload, code in ((b"[1, 2]", "bad_request"), (b'{"id": ' + b"[" * 3000 + b"]" * 3000 + b"}", "bad_json")):
        client.publish(INFERENCE, payload, correlation=b"bad-shape")
        reply = client.expect_json(DIAGNOSIS, id="bad-shape")
        assert reply["error"]["code"] == code and reply["device"] == "allds-agent", reply


# ---- 9. HIAS records ---------------------------------------------------------------------------
def test_sensors_and_life_carry_ids_and_times(broker, client, start_agent, image):
    start_agent(broker.port)
    online(client)
    life = json.loads(client.expect(LIFE, 10).payload)
    assert life["ts"].endswith("Z")
    reply = served(client, image, "record-1")
    record = json.loads(client.expect(SENSORS).payload)
    assert record["Value"] == reply["diagnosis"] and record["id"] == "record-1" and record["ts"].endswith("Z")
    hashed = (record["Sensor"] + record["Type"] + record["Value"] + record["Message"]).encode()
    assert len(hashed) <= 72


# ---- 8. session generations ---------------------------------------------------------------------
def test_session_lost_is_a_warning(tmp_path, start_agent, image):
    broker = Broker(tmp_path / "broker").start()  # no persistence: a restart forgets every session
    try:
        agent = start_agent(broker.port)
        client = Client(broker.port).subscribe(f"{BASE}/#")
        online(client)
        client.close()
        broker.stop()
        broker.start()
        wait_log(agent, "WARNING allds.session broker did not keep the session")
        client = Client(broker.port).subscribe(f"{BASE}/#")
        served(client, image, "after-session-lost")
        client.close()
    finally:
        broker.stop()


def test_stale_ack_from_an_earlier_connection_is_dropped(tmp_path, caplog):
    """A request received before the session was lost must not acknowledge one received after it."""
    import logging

    from agent.config import parse
    from agent.session import MqttSession

    broker = Broker(tmp_path / "broker").start()
    received = []
    session = MqttSession(parse({"broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}}).broker,
                          "stale-ack-test")
    session.subscribe("t/in", received.append)
    session.start()
    try:
        assert session.connected.wait(10)
        sender = Client(broker.port)
        sender.publish("t/in", b"first")
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        old = received[0]
        sender.close()
        broker.stop()
        broker.start()
        deadline = time.monotonic() + 10
        while session.connections < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert session.connected.wait(10) and session.generation > old.generation  # attempts while it was down count too
        with caplog.at_level(logging.WARNING, "allds.session"):
            session.ack(old)
        assert "stale acknowledgement" in caplog.text
        assert session.stale_acks == 1
    finally:
        session.stop()
        broker.stop()


# ---- 11. one writer per socket ------------------------------------------------------------------
def test_only_the_network_thread_writes_the_socket(broker):
    """publish() and ack() from other threads queue their packets; the network thread sends them."""
    from agent.config import parse
    from agent.session import MqttSession

    writers: set[str] = set()
    session = MqttSession(parse({"broker": {"port": broker.port}}).broker, "writer-test")
    real_open = session._on_socket_open

    def watch(client, userdata, sock) -> None:
        real_open(client, userdata, sock)
        send = sock.send

        class Watched:
            def __getattr__(self, name):
                return getattr(sock, name)

            def send(self, data, *args):
                writers.add(threading.current_thread().name)
                return send(data, *args)

        client._sock = Watched()

    session._client.on_socket_open = watch
    got = []
    session.subscribe("w/in", lambda m: threading.Thread(target=lambda: (got.append(m), session.ack(m))).start())
    session.start()
    try:
        assert session.connected.wait(10)
        threads = [threading.Thread(target=lambda: [session.publish("w/out", b"x") for _ in range(50)], name=f"pub{n}")
                   for n in range(4)]
        for t in threads:
            t.start()
        sender = Client(broker.port)
        for n in range(20):
            sender.publish("w/in", b"%d" % n)
        for t in threads:
            t.join()
        assert session.wait_acked(10)
        sender.close()
        assert writers == {"mqtt"}, writers
    finally:
        session.stop()


# ---- SIGTERM in every state, READY, watchdog ---------------------------------------------------
def test_sigterm_is_honoured_within_5_s_when_the_broker_never_answers(start_agent):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP, never sends a CONNACK
    try:
        agent = start_agent(silent.getsockname()[1])
        time.sleep(3)
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(10)
        assert time.monotonic() - started < 5
    finally:
        silent.close()


def test_sigterm_is_honoured_within_5_s_while_backing_off(start_agent):
    agent = start_agent(free_port(), broker={"reconnect_min_s": 2, "reconnect_max_s": 30})
    time.sleep(4)
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0
    assert time.monotonic() - started < 5


def test_ready_without_broker_and_watchdog_stops_when_disconnected_too_long(tmp_path, start_agent):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    start_agent(free_port(), env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"},
                watchdog={"max_disconnected_s": 3})
    assert sock.recv(256) == b"READY=1"  # the service runs although no broker answers
    beats = []
    sock.settimeout(0.5)
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        try:
            if sock.recv(256) == b"WATCHDOG=1":
                beats.append(time.monotonic())
        except TimeoutError:
            pass
    assert beats and beats[-1] < deadline - 2.5, "WATCHDOG=1 went on although the broker was unreachable"
    sock.close()


def test_a_hung_inference_stops_the_watchdog():
    """An `invoke()` that never returns is reported, so systemd's watchdog restarts the agent."""
    import numpy as np

    from agent.config import parse
    from agent.models import ModelStore
    from agent.service import ClassificationService, Job
    from agent.session import Inbound, MqttSession
    from agent.topics import Topics
    from model.classifier import DEFAULT_ARTIFACT, Classifier

    config = parse({})
    classifier = Classifier.load(DEFAULT_ARTIFACT)
    release = threading.Event()
    hung = threading.Event()

    def hang(batch):
        hung.set()
        release.wait(30)
        return np.full((len(batch), 2), 0.5, np.float32)

    classifier._run = hang  # what a wedged LiteRT delegate looks like from outside
    session = MqttSession(config.broker, "hung-test")  # never started: replies just queue
    service = ClassificationService(config, session, classifier, ModelStore(config), Topics.from_config(config))
    service.start()
    try:
        assert service.problems(stall_s=0.5) == []
        job = Job(Inbound("t", b"", None, 1, 1, False, 1), time.perf_counter())
        job.tensor = np.zeros((classifier.input_size, classifier.input_size, 3), np.float32)
        service._ready.put(job)
        assert hung.wait(5)
        time.sleep(0.8)
        assert any("one inference has run" in p for p in service.problems(stall_s=0.5))
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while service.problems(stall_s=0.5) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.problems(stall_s=0.5) == []


def test_fuzzed_messages_through_the_broker_are_each_answered(broker, client, start_agent, image):
    """300 mutated requests and 50 junk commands with random properties: every request gets exactly its
    answer (diagnosis or error), every command its error, and the agent serves on."""
    import random

    agent = start_agent(broker.port)
    online(client)
    rng = random.Random(14)
    envelope = json.dumps({"id": "x", "name": "n", "image": __import__("base64").b64encode(image).decode()}).encode()
    seeds = [image, envelope, b'{"id": "a", "image": "AAAA"}', b"[" * 50, b"\xef\xbb\xbf{}"]
    topics = [None, f"{DIAGNOSIS}/fuzz/r", STATUS, SENSORS, "elsewhere/x", f"{DIAGNOSIS}/+"]
    for n in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(0, 8)):
            at = rng.randrange(len(data))
            data[at:at + rng.randint(0, 20)] = rng.randbytes(rng.randint(0, 20))
        client.publish(INFERENCE, bytes(data), response_topic=rng.choice(topics), correlation=f"fz-{n}".encode(),
                       user=[("name", rng.choice(["a.jpg", "é" * 30, ""]))] if rng.random() < 0.5 else None)
    for _ in range(50):
        client.publish(COMMANDS, rng.randbytes(rng.randint(0, 300)))
    client.subscribe(f"{DIAGNOSIS}/#")
    seen: dict[str, int] = {}
    command_errors = 0
    deadline = time.monotonic() + 60
    while (len(seen) < 300 or command_errors < 50) and time.monotonic() < deadline:
        try:
            message = client.expect(f"{DIAGNOSIS}/#", 2)
        except AssertionError:
            continue
        doc = json.loads(message.payload)
        correlation = getattr(message.properties, "CorrelationData", b"").decode()
        if correlation.startswith("fz-"):  # an envelope's own "id" may differ: match on Correlation Data
            seen[correlation] = seen.get(correlation, 0) + 1
        elif doc.get("error", {}).get("code") == "bad_command":
            command_errors += 1
    assert len(seen) == 300 and set(seen.values()) == {1} and command_errors == 50, (len(seen), command_errors)
    assert agent.proc.poll() is None and "Traceback" not in agent.log()
    served(client, image, "after-fuzz")
