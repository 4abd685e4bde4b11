"""The agent's throughput on each broker of docs/brokers.md, in one run: Mosquitto (baseline), ejabberd and amqtt.

    python bench/brokers.py [--n 200] [--repeats 5] [--concurrency 32]

For each broker: one agent (MQTT 5, or 3.1.1 on amqtt), the held-out Aria images replayed `repeats`
times with `concurrency` requests in flight, the brokers taking turns (round robin, so the machine's
load weighs on all alike); median throughput, median of the per-run p50 latencies,
the batch sizes the agent formed (from its log), and the ratio to Mosquitto. ejabberd sends a client
one unacknowledged message at a time whatever its Receive Maximum, so the agent cannot batch there.
Not a test: numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.config import parse  # noqa: E402
from agent.replay import replay  # noqa: E402
from agent.session import MqttSession  # noqa: E402
from agent.topics import Topics  # noqa: E402
from tests.brokers import PASSWORD, USER, Amqtt, Ejabberd, package_version  # noqa: E402
from tests.helpers import BASE, Agent, Broker, Client, write_config  # noqa: E402

PASSWORD_ENV = "ALLDS_BENCH_BROKER_PASSWORD"


def one_run(port: int, protocol: str, paths: list[Path], concurrency: int) -> dict:
    config = parse({"broker": {"port": port, "protocol": protocol, "username": USER, "password_env": PASSWORD_ENV}})
    session = MqttSession(config.broker, f"bench-{time.time_ns()}", PASSWORD, session_expiry_s=60)
    try:
        report = replay(session, Topics.from_config(config), paths, concurrency, timeout=300, response_topic=None,
                        progress=False)
    finally:
        session.stop()
    assert not report.missing, f"{len(report.missing)} unanswered"
    ends = [i.sent + i.latency_ms / 1000 for i in report.items]
    return {"throughput": len(paths) / (max(ends) - min(i.sent for i in report.items)), "p50": report.latency_ms["p50"],
            "duplicates": report.duplicates}


class Setup:
    """One broker and one agent on it, ONLINE."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind, self.protocol = kind, "3.1.1" if kind == "amqtt" else "5"
        self.broker = {"mosquitto": Broker, "ejabberd": Ejabberd, "amqtt": Amqtt}[kind](work / kind).start()
        watcher = Client(self.broker.port, v5=self.protocol == "5", username=USER, password=PASSWORD)
        watcher.subscribe(f"{BASE}/Status")
        config = write_config(work / f"{kind}.yaml", self.broker.port,
                              broker={"protocol": self.protocol, "username": USER, "password_env": PASSWORD_ENV},
                              hias={"name": f"allds-agent-{kind}"})
        self.agent = Agent(config, work / f"{kind}-agent.log", {PASSWORD_ENV: PASSWORD}).start()
        watcher.expect(f"{BASE}/Status", 60, lambda m: m.payload == b"ONLINE")
        watcher.close()
        self.runs: list[dict] = []

    def run(self, paths: list[Path], concurrency: int) -> None:
        self.runs.append(one_run(self.broker.port, self.protocol, paths, concurrency))

    def row(self) -> dict:
        batches = [int(b) for b in re.findall(r" batch=(\d+) ", self.agent.log())]
        return {"throughput": statistics.median(r["throughput"] for r in self.runs),
                "runs": [round(r["throughput"]) for r in self.runs], "p50": statistics.median(r["p50"] for r in self.runs),
                "batch_median": statistics.median(batches), "batch_max": max(batches),
                "duplicates": sum(r["duplicates"] for r in self.runs)}

    def stop(self) -> None:
        self.agent.terminate()
        self.broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("ALLDS_DATA", str(REPO.parent / "shared/data/ALL_Aria2021")))
    parser.add_argument("--n", type=int, default=200, help="images per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    held_out = [Path(args.data) / p for p in (REPO / "data/aria2021/grouped/test.txt").read_text().split()]
    paths = [held_out[i % len(held_out)] for i in range(args.n)]
    work = Path(tempfile.mkdtemp(prefix="allds-bench-brokers-"))
    os.chmod(work, 0o777)  # mosquitto started as root drops to user mosquitto
    versions = {"mosquitto": package_version("mosquitto"), "ejabberd": package_version("ejabberd"),
                "amqtt": f"{metadata.version('amqtt')} (PyPI)"}
    setups = [Setup(kind, work) for kind in ("mosquitto", "ejabberd", "amqtt")]
    try:
        for setup in setups:
            one_run(setup.broker.port, setup.protocol, paths[:16], 4)  # warm-up
        for _ in range(args.repeats):  # round robin: the machine's load weighs on every broker alike
            for setup in setups:
                setup.run(paths, args.concurrency)
        rows = {setup.kind: setup.row() for setup in setups}
    finally:
        for setup in setups:
            setup.stop()
    base = rows["mosquitto"]["runs"]
    print(f"{args.n} images x {args.repeats} runs, {args.concurrency} in flight, one agent, on this machine "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end)\n")
    print("| broker | images/s (median) | runs, in turn with the others | ratio to Mosquitto (median of per-round ratios) "
          "| p50 latency ms | agent batch median / max | duplicates |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in rows.items():
        ratio = statistics.median(x / b for x, b in zip(r["runs"], base, strict=True))
        print(f"| {kind} {versions[kind]} | {r['throughput']:.0f} | {r['runs']} | {ratio:.2f} | "
              f"{r['p50']:.0f} | {r['batch_median']:.0f} / {r['batch_max']} | {r['duplicates']} |")


if __name__ == "__main__":
    main()
