"""Throughput cost of the Prometheus endpoint: one agent with metrics off and one with metrics on and
scraped every second, side by side on one broker, measured in alternating rounds.

    python bench/metrics_cost.py [--rounds 5] [--images 1000] [--out bench/RESULTS.md]

Both agents run for the whole benchmark; each round saturates one of them (64 in flight, the held-out
224x224 images), then the other, in alternating order, so drifting load on a shared machine falls on both
alike. Reports the median throughput of each and their ratio (target: metrics on >= 0.95 x off).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench import BASE, measure, scrape, start_servers  # noqa: E402
from bench.report import update_section  # noqa: E402
from tests.helpers import Broker, free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--data", default=os.environ.get("ALLDS_DATA", str(REPO.parent / "shared/data/ALL_Aria2021")))
    parser.add_argument("--out", type=Path, help="also write the Markdown section into this file")
    args = parser.parse_args()
    paths = [Path(args.data) / p for p in (REPO / "data/aria2021/grouped/test.txt").read_text().split()]
    work = Path(tempfile.mkdtemp(prefix="allds-metrics-cost-"))
    os.chmod(work, 0o755)
    throughput: dict[str, list[float]] = {"off": [], "on": []}
    servers, brokers, done = {}, {}, threading.Event()
    try:
        for kind in ("off", "on"):
            (work / kind).mkdir()
            brokers[kind] = Broker(work / f"broker-{kind}", tcp_nodelay=True).start()
            port = free_port() if kind == "on" else None
            servers[kind], _ = start_servers("agent", 1, brokers[kind].port, work / kind, port)
            if port:
                threading.Thread(target=scrape, args=(port, done), daemon=True).start()
            measure(brokers[kind].port, f"{BASE}/Inference", paths[:64], 64, True)  # warm-up
        for r in range(args.rounds):
            for kind in (("off", "on") if r % 2 == 0 else ("on", "off")):
                result = measure(brokers[kind].port, f"{BASE}/Inference",
                                 [paths[i % len(paths)] for i in range(args.images)], 64, True)
                throughput[kind].append(result["throughput"])
                print(f"round {r + 1} metrics {kind}: {result['throughput']:.0f} images/s", flush=True)
    finally:
        done.set()
        for kind, procs in servers.items():
            for p in procs:
                p.terminate()
                p.wait(30)
            brokers[kind].stop()
    off, on = (statistics.median(throughput[k]) for k in ("off", "on"))
    section = "\n".join([
        "## Metrics endpoint cost", "",
        f"Command: `python bench/metrics_cost.py --rounds {args.rounds} --images {args.images} --out bench/RESULTS.md`. "
        "One agent with metrics off and one with `metrics.port` set and `/metrics` read every second, each on its "
        "own broker; rounds alternate which one is saturated first (64 in flight, 224x224 held-out images).", "",
        "| agent | images/s per round | median | vs metrics off |", "|---|---|---|---|",
        f"| metrics off | {', '.join(f'{t:.0f}' for t in throughput['off'])} | {off:.0f} | 1.00x |",
        f"| metrics on, scraped every second | {', '.join(f'{t:.0f}' for t in throughput['on'])} | {on:.0f} | "
        f"{on / off:.3f}x |", ""])
    print(section)
    if args.out:
        update_section(args.out, "metrics-cost", section)


if __name__ == "__main__":
    main()
