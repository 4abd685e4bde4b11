"""End-to-end serving benchmark against a real local Mosquitto, on real images from ALLDS_DATA.

    python bench/bench.py [--out bench/RESULTS.md]

Measures, in one run and side by side: the original-style baseline (Keras `model.predict` per
request, full decode, default sockets), our agent with the default config, the same with its
Prometheus endpoint on and scraped every second, and pools of 2 and 3 agents; for 224x224 Aria
images and 2592x1944 JPEGs (real images upscaled with OpenCV). For each:
latency p50/p95 with one request in flight, throughput at saturation, peak RSS of the serving
process(es), and start-up time to ONLINE. Not a test: numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.config import parse  # noqa: E402
from agent.replay import replay  # noqa: E402
from agent.session import MqttSession  # noqa: E402
from agent.topics import Topics  # noqa: E402
from bench.report import update_section  # noqa: E402
from model.classifier import DEFAULT_ARTIFACT  # noqa: E402
from tests.helpers import Broker, Client, free_port, write_config  # noqa: E402

BASE = "allds-location/Devices/allds-zone/allds-device"
POOL_TOPIC = "allds-location/Devices/allds-zone/allds-pool/Inference"


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


def wait_online(port: int, status_topics: list[str], timeout: float = 120) -> None:
    watcher = Client(port)
    for topic in status_topics:
        watcher.subscribe(topic)
    seen: set[str] = set()
    while len(seen) < len(status_topics):
        message = watcher.expect("#", timeout, lambda m: m.payload == b"ONLINE")
        seen.add(message.topic)
    watcher.close()


def start_servers(kind: str, n: int, port: int, work: Path,
                  metrics_port: int | None = None) -> tuple[list[subprocess.Popen], float]:
    """Start the serving process(es); return them and the seconds until all were ONLINE."""
    procs, statuses = [], []
    start = time.perf_counter()
    for i in range(n):
        log = (work / f"{kind}{i}.log").open("w")
        if kind == "baseline":
            keras_path = DEFAULT_ARTIFACT.parent / f"{DEFAULT_ARTIFACT.parent.name}.keras"
            size = 128 if "cellnet" in keras_path.name else 100
            cmd = [sys.executable, str(REPO / "bench/baseline_agent.py"), str(port), str(keras_path),
                   f"{BASE}/Inference", f"{BASE}/Status", f"{BASE}/Diagnosis", str(size)]
            statuses.append(f"{BASE}/Status")
        else:
            device = f"bench-{i}" if n > 1 else "allds-device"
            sections = {"hias": {"device": device, "name": f"allds-agent-{i}"},
                        "inference": {"reply_topics": ["bench/#"]}}
            if n > 1:
                sections["inference"].update({"request_topic": POOL_TOPIC, "shared_group": "bench"})
            if metrics_port:
                sections["metrics"] = {"port": metrics_port}
            config = write_config(work / f"{kind}{i}.yaml", port, **sections)
            cmd = [sys.executable, "-m", "agent", "--config", str(config)]
            statuses.append(f"allds-location/Devices/allds-zone/{device}/Status")
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}))
    wait_online(port, statuses)
    return procs, time.perf_counter() - start


def measure(port: int, request_topic: str, paths: list[Path], concurrency: int, nodelay: bool) -> dict:
    """One replay; returns latency percentiles and throughput."""
    config = parse({"broker": {"port": port}})
    session = MqttSession(config.broker, f"bench-{time.time_ns()}", persistent=True, session_expiry_s=60,
                          tcp_nodelay=nodelay)
    topics = Topics(base=BASE, request=request_topic)
    try:
        report = replay(session, topics, paths, concurrency, timeout=300, response_topic="bench/replies",
                        progress=False)
    finally:
        session.stop()
    assert not report.missing, f"{len(report.missing)} unanswered"
    ends = [i.sent + i.latency_ms / 1000 for i in report.items]
    span = max(ends) - min(i.sent for i in report.items)
    return {"p50": report.latency_ms["p50"], "p95": report.latency_ms["p95"], "throughput": len(paths) / span,
            "duplicates": report.duplicates}


def cpu_seconds(servers: list[subprocess.Popen], broker: subprocess.Popen) -> dict[str, float]:
    """User + system CPU seconds so far of the serving processes, the broker and this load generator."""
    def used(pid: int) -> float:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system

    return {"servers": sum(used(p.pid) for p in servers), "broker": used(broker.pid), "load generator": used(os.getpid())}


def big_jpegs(sources: list[Path], work: Path) -> list[Path]:
    out = []
    for n, src in enumerate(sources):
        field = cv2.resize(cv2.imread(str(src)), (2592, 1944), interpolation=cv2.INTER_CUBIC)
        path = work / f"field_{n:02d}.jpg"
        cv2.imwrite(str(path), field, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--data", default=os.environ.get("ALLDS_DATA", str(REPO.parent / "shared/data/ALL_Aria2021")))
    parser.add_argument("--latency-n", type=int, default=200)
    parser.add_argument("--saturation-n", type=int, default=1000)
    args = parser.parse_args()
    data = Path(args.data)
    test_list = (REPO / "data/aria2021/grouped/test.txt").read_text().split()
    small = [data / p for p in test_list]
    work = Path(tempfile.mkdtemp(prefix="allds-bench-"))
    os.chmod(work, 0o755)
    large = big_jpegs(small[:20], work)
    sets = {"224x224": (small, args.latency_n, args.saturation_n),
            "2592x1944": (large, args.latency_n // 4, args.saturation_n // 5)}
    rows = []
    for name, kind, n, metrics in (("baseline (Keras predict, full decode, default sockets)", "baseline", 1, False),
                                   ("agent, default config", "agent", 1, False),
                                   ("agent, metrics on, scraped every second", "agent", 1, True),
                                   ("agent pool of 2", "agent", 2, False), ("agent pool of 3", "agent", 3, False)):
        nodelay = kind != "baseline"
        broker = Broker(work / f"broker-{kind}{n}{metrics}", tcp_nodelay=nodelay).start()
        scraping = threading.Event()
        try:
            metrics_port = free_port() if metrics else None
            procs, startup = start_servers(kind, n, broker.port, work, metrics_port)
            if metrics_port:
                threading.Thread(target=scrape, args=(metrics_port, scraping), daemon=True).start()
            topic = POOL_TOPIC if n > 1 else f"{BASE}/Inference"
            for set_name, (paths, latency_n, saturation_n) in sets.items():
                measure(broker.port, topic, paths[:16], 1, nodelay)  # warm-up
                lat = measure(broker.port, topic, [paths[i % len(paths)] for i in range(latency_n)], 1, nodelay)
                before = cpu_seconds(procs, broker.proc)
                sat = measure(broker.port, topic, [paths[i % len(paths)] for i in range(saturation_n)], 64, nodelay)
                cpu = {k: (v - before[k]) * 1000 / saturation_n for k, v in cpu_seconds(procs, broker.proc).items()}
                rss = max(peak_rss_mb(p.pid) for p in procs)
                rows.append({"server": name, "images": set_name, "p50": lat["p50"], "p95": lat["p95"],
                             "throughput": sat["throughput"], "rss": rss, "startup": startup,
                             "duplicates": sat["duplicates"], "cpu_ms": cpu})
                print(rows[-1], flush=True)
        finally:
            scraping.set()
            for p in procs:
                p.terminate()
                p.wait(30)
            broker.stop()
    table = render(rows)
    print(table)
    if args.out:
        update_section(args.out, "serving", table)


def scrape(port: int, done: threading.Event) -> None:
    """Read `/metrics` every second, as a Prometheus would."""
    while not done.wait(1.0):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def render(rows: list[dict]) -> str:
    base = {r["images"]: r for r in rows if r["server"].startswith("baseline")}
    one = {r["images"]: r for r in rows if r["server"] == "agent, default config"}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = [
        "## Serving", "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}. Model: `{DEFAULT_ARTIFACT.relative_to(REPO)}` (baseline: its `.keras`).",
        "Command: `python bench/bench.py --out bench/RESULTS.md`. Latency: one request in flight, end to end "
        "(publish to answer received). Throughput: 64 in flight. RSS: peak of the (largest) serving process.", "",
        "| server | images | p50 ms | p95 ms | images/s | RSS MB | start-up s | p50 vs baseline | images/s vs baseline "
        "| images/s vs one agent |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, o = base[r["images"]], one.get(r["images"], r)
        lines.append(f"| {r['server']} | {r['images']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['throughput']:.0f} | "
                     f"{r['rss']:.0f} | {r['startup']:.2f} | {b['p50'] / r['p50']:.1f}x faster | "
                     f"{r['throughput'] / b['throughput']:.1f}x | {r['throughput'] / o['throughput']:.2f}x |")
    lines += ["", "Where the CPU went at saturation (CPU ms per image: serving processes / broker / load generator; "
              "2 cores give at most 2,000 CPU ms per second):", "",
              "| server | images | servers | broker | load generator | total |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cpu_ms"]
        lines.append(f"| {r['server']} | {r['images']} | {c['servers']:.2f} | {c['broker']:.2f} | "
                     f"{c['load generator']:.2f} | {sum(c.values()):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
