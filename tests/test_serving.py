"""Serving path: micro-batches answer each request with its own result, a bad image in a batch
does not spoil the others, an agent pool answers each id exactly once, sockets use TCP_NODELAY."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import numpy as np

from agent.config import parse
from agent.session import MqttSession, publish_properties
from model.classifier import DEFAULT_ARTIFACT, Classifier
from model.preprocess import preprocess
from tests.helpers import BASE, REPO, Client

INFERENCE, DIAGNOSIS = f"{BASE}/Inference", f"{BASE}/Diagnosis"


def test_micro_batches_answer_each_request_with_its_own_result(broker, client, start_agent, data_root):
    agent = start_agent(broker.port, inference={"max_batch": 8, "batch_wait_ms": 20, "decode_workers": 2})
    client.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    paths = sorted((data_root / "Benign").glob("*.jpg"))[:20] + sorted((data_root / "Pro").glob("*.jpg"))[:20]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    payloads = {f"img-{i}": paths[i].read_bytes() for i in order}
    payloads["img-bad"] = b"\xff\xd8\xff not really a jpeg"
    for request_id, payload in payloads.items():  # published back to back so batches form
        client.client.publish(INFERENCE, payload, qos=1, properties=publish_properties(correlation=request_id.encode()))
    replies = {}
    while len(replies) < len(payloads):
        reply = client.expect_json(DIAGNOSIS, 30)
        replies[reply["id"]] = reply
    assert replies["img-bad"]["error"]["code"] == "not_an_image"
    clf = Classifier.load(DEFAULT_ARTIFACT)
    for request_id, payload in payloads.items():
        if request_id == "img-bad":
            continue
        alone = clf.classify(preprocess(payload, clf.input_size)[None])[0]
        served = replies[request_id]["probabilities"]
        assert abs(served["ALL"] - float(alone[1])) < 1e-3, request_id
    batches = [int(b) for b in re.findall(r"batch=(\d+)", agent.log())]
    assert len(batches) == 40 and max(batches) > 1, batches


def test_agent_pool_answers_each_id_exactly_once(broker, start_agent, data_root, tmp_path):
    pool_topic = "allds-location/Devices/allds-zone/allds-pool/Inference"
    agents = [start_agent(broker.port, name=f"pool{n}", hias={"device": f"allds-device-{n}", "name": f"allds-agent-{n}"},
                          inference={"request_topic": pool_topic, "shared_group": "allds",
                                     "reply_topics": ["{base}/Diagnosis/#", "replies/#"]}) for n in (1, 2)]
    watcher = Client(broker.port).subscribe("allds-location/Devices/allds-zone/+/Status")
    online = set()
    while len(online) < 2:
        message = watcher.expect("allds-location/Devices/allds-zone/+/Status", 20, lambda m: m.payload == b"ONLINE")
        online.add(message.topic)
    watcher.close()
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join((REPO / "data/aria2021/val.txt").read_text().split()[:200]) + "\n")
    config = agents[0].config  # its request_topic is the pool's
    result = subprocess.run([sys.executable, "-m", "agent.replay", str(listing), "--data", str(data_root),
                             "--config", str(config), "--response-topic", "replies/pool", "--quiet",
                             "--json", str(tmp_path / "pool.json")], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "pool.json").read_text())
    assert report["answered"] == 200 and report["duplicates"] == 0 and not report["missing"]
    devices = [r["reply"]["device"] for r in report["results"]]
    assert set(devices) == {"allds-agent-1", "allds-agent-2"}
    served = [len(re.findall(r"request id=", a.log())) for a in agents]
    assert sum(served) == 200 and min(served) > 0, served


def test_sessions_set_tcp_nodelay(broker):
    config = parse({"broker": {"port": broker.port}})
    session = MqttSession(config.broker, "nodelay-check", persistent=False)
    session.start()
    try:
        assert session.connected.wait(10)
        sock = session._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        session.stop()


def test_telemetry_outbox_is_bounded_and_flushed_in_order_on_connect(tmp_path):
    from tests.helpers import Broker

    broker = Broker(tmp_path / "late-broker")
    config = parse({"broker": {"port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}})
    session = MqttSession(config.broker, "outbox-check", persistent=False, outbox_size=3)
    for n in range(5):  # while disconnected: the oldest two are dropped
        session.publish("outbox/life", f"life-{n}", droppable=True)
    assert session.dropped_telemetry == 2
    broker.start()
    watcher = Client(broker.port).subscribe("outbox/#")
    session.start()
    try:
        got = [watcher.expect("outbox/life", 15).payload.decode() for _ in range(3)]
        assert got == ["life-2", "life-3", "life-4"]
    finally:
        session.stop()
        watcher.close()
        broker.stop()


def test_serving_process_never_imports_tensorflow(data_root):
    code = ("import sys, agent.__main__, agent.replay\n"
            "from model.classifier import DEFAULT_ARTIFACT, Classifier\n"
            "from model.preprocess import preprocess_file\n"
            f"c = Classifier.load(DEFAULT_ARTIFACT)\n"
            f"c.classify(preprocess_file({str(data_root / 'Benign/WBC-Benign-001.jpg')!r}, c.input_size)[None])\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
