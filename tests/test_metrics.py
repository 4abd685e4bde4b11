"""Prometheus metrics: off by default; when on, the counters move with real requests over a real broker."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from model.classifier import DEFAULT_ARTIFACT
from tests.helpers import BASE, REPO, free_port

INFERENCE, DIAGNOSIS = f"{BASE}/Inference", f"{BASE}/Diagnosis"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_off_by_default(broker, client, start_agent):
    agent = start_agent(broker.port)
    client.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    listening = [c for c in psutil.Process(agent.proc.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening == []


def test_metrics_count_requests_and_report_the_model(broker, client, start_agent, data_root):
    port = free_port()
    start_agent(broker.port, metrics={"port": port})
    client.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    before = scrape(port)
    assert before[("allds_mqtt_connected", ())] == 1 and before[("allds_inflight", ())] == 0
    images = [data_root / "Benign/WBC-Benign-001.jpg", data_root / "Pro/WBC-Malignant-Pro-001.jpg"]
    for n, path in enumerate(images):
        client.publish(INFERENCE, path.read_bytes(), correlation=f"m-{n}".encode())
        client.expect_json(DIAGNOSIS, id=f"m-{n}")
    client.publish(INFERENCE, b"not an image", correlation=b"m-bad")
    client.expect_json(DIAGNOSIS, id="m-bad")
    time.sleep(0.2)
    after = scrape(port)
    diagnoses = sum(v for (name, labels), v in after.items() if name == "allds_requests_total"
                    and dict(labels)["result"] in ("Positive", "Negative", "Indeterminate"))
    assert diagnoses == 2
    assert after[("allds_requests_total", (("result", "not_an_image"),))] == 1
    assert after[("allds_request_seconds_count", ())] == 3
    assert after[("allds_decode_seconds_count", ())] == 2
    assert after[("allds_batch_size_count", ())] >= 1 and after[("allds_inference_seconds_count", ())] >= 1
    assert after[("allds_mqtt_reconnects_total", ())] == 0
    model = [dict(labels) for (name, labels), v in after.items() if name == "allds_model_info" and v == 1]
    assert len(model) == 1 and model[0]["name"] == DEFAULT_ARTIFACT.parent.name and len(model[0]["sha256"]) == 64
    dashboard = json.loads((REPO / "deploy/grafana/allds-agents.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"allds_[a-z_]+", target["expr"])}
    exported = {name for name, _ in after}
    assert used and used <= exported, used - exported  # the dashboard reads only what the agent exports
