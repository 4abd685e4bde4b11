"""A burst of maximum-size requests at the shipped defaults stays under the unit's MemoryMax, even on
Debian's Mosquitto 2.0.11, which lets more than Receive Maximum requests through: what the agent
cannot hold is answered `busy`, nothing is left unanswered."""

from __future__ import annotations

import random

from agent.config import Inference
from bench.memory import MEMORY_MAX_MIB, max_jpeg, max_png, proc_status
from tests.helpers import BASE

INFERENCE, DIAGNOSIS = f"{BASE}/Inference", f"{BASE}/Diagnosis"
BURST = 48


def test_a_burst_of_maximum_size_images_stays_under_memory_max(broker, client, start_agent, data_root):
    limits = Inference()
    sources = sorted((data_root / "Pre").glob("*.jpg"))[:40]
    images = [max_png(sources[0], limits.max_pixels, limits.max_payload_bytes),
              max_jpeg(sources, limits.max_pixels, limits.max_payload_bytes, 0)]
    agent = start_agent(broker.port)  # the shipped defaults
    client.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
    order = [random.Random(0).choice(images) for _ in range(BURST)]
    for n, payload in enumerate(order):  # as fast as the broker takes them
        client.client.publish(INFERENCE, payload, qos=1, properties=_correlation(f"burst-{n}"))
    answers = {}
    while len(answers) < BURST:
        reply = client.expect_json(DIAGNOSIS, 120)
        answers[reply["id"]] = reply
    busy = sum(1 for r in answers.values() if r.get("error", {}).get("code") == "busy")
    served = sum(1 for r in answers.values() if "diagnosis" in r)
    peak = proc_status(agent.proc.pid, "VmHWM")
    print(f"\n{BURST} maximum-size images ({limits.max_pixels} px, {limits.max_payload_bytes} bytes) at once: "
          f"{served} served, {busy} busy, agent peak RSS {peak:.0f} MiB (MemoryMax {MEMORY_MAX_MIB} MiB)")
    assert served + busy == BURST and served > 0
    assert peak < 0.9 * MEMORY_MAX_MIB


def _correlation(value: str):
    from agent.session import publish_properties

    return publish_properties(correlation=value.encode())
