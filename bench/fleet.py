"""Fleet scaling: N agents, each held to a Pi-like CPU slice by its own cgroup, share one request
stream (MQTT 5 shared subscription) behind one Mosquitto; the broker and the load generator run
outside the quotas. Throughput for each N, the ratio to one agent, and every id answered once.

    python bench/fleet.py [--agents 1 2 3 4] [--quota 0.4] [--images 600] [--out bench/RESULTS.md]

Needs root and cgroup v1's cpu controller (`/sys/fs/cgroup/cpu`). Not a test: numbers vary with
the machine's load; tests/test_fleet.py runs a short form and checks loss and scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.config import parse  # noqa: E402
from agent.replay import replay  # noqa: E402
from agent.session import MqttSession  # noqa: E402
from agent.topics import Topics  # noqa: E402
from bench.report import update_section  # noqa: E402
from tests.helpers import Broker, Client, write_config  # noqa: E402

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
ZONE = "allds-location/Devices/allds-zone"
POOL = f"{ZONE}/allds-fleet"
PERIOD_US = 100_000


def cgroup(name: str, cpus: float) -> Path:
    """A cgroup v1 cpu group limited to `cpus` CPUs."""
    group = CGROUP_CPU / name
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(int(cpus * PERIOD_US)))
    return group


def start_agent(n: int, port: int, work: Path, group: Path) -> subprocess.Popen:
    """One pool member inside `group` (it joins the cgroup before it executes Python)."""
    config = write_config(work / f"agent{n}.yaml", port, hias={"device": f"fleet-{n}", "name": f"allds-fleet-{n}"},
                          model={"threads": 1},
                          inference={"request_topic": f"{POOL}/Inference", "shared_group": "fleet",
                                     "decode_workers": 1, "reply_topics": [f"{POOL}/Diagnosis/#"]})
    log = (work / f"agent{n}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(config)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))


def wait_online(port: int, count: int, timeout: float = 120) -> None:
    watcher = Client(port).subscribe(f"{ZONE}/+/Status")
    online: set[str] = set()
    while len(online) < count:
        online.add(watcher.expect(f"{ZONE}/+/Status", timeout, lambda m: m.payload == b"ONLINE").topic)
    watcher.close()


def run(port: int, paths: list[Path], concurrency: int) -> dict:
    config = parse({"broker": {"port": port}})
    session = MqttSession(config.broker, f"fleet-load-{time.time_ns()}", session_expiry_s=60)
    try:
        report = replay(session, Topics(base=POOL, request=f"{POOL}/Inference"), paths, concurrency, timeout=300,
                        response_topic=f"{POOL}/Diagnosis/load", progress=False)
    finally:
        session.stop()
    ends = [i.sent + i.latency_ms / 1000 for i in report.items if i.latency_ms is not None]
    span = max(ends) - min(i.sent for i in report.items) if ends else float("nan")
    devices = {}
    for item in report.items:
        if item.reply:
            devices[item.reply.get("device")] = devices.get(item.reply.get("device"), 0) + 1
    return {"images": len(paths), "answered": len(paths) - len(report.missing), "missing": len(report.missing),
            "duplicates": report.duplicates, "errors": sum(report.errors.values()), "throughput": len(paths) / span,
            "p50_ms": report.latency_ms.get("p50"), "per_agent": devices}


def measure_fleet(sizes: list[int], quota: float, images: int, data: Path) -> list[dict]:
    """Throughput of a pool of each size, agents in their own quota'd cgroups."""
    paths_all = [data / p for p in (REPO / "data/aria2021/grouped/test.txt").read_text().split()]
    work = Path(tempfile.mkdtemp(prefix="allds-fleet-"))
    os.chmod(work, 0o755)
    rows = []
    for size in sizes:
        broker = Broker(work / f"broker{size}").start()
        groups = [cgroup(f"allds-fleet-{n}", quota) for n in range(size)]
        procs = []
        try:
            procs = [start_agent(n, broker.port, work, groups[n]) for n in range(size)]
            wait_online(broker.port, size)
            run(broker.port, paths_all[:40], 16)  # warm-up
            cpu_before = {p.pid: sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs}
            wall = time.monotonic()
            row = run(broker.port, [paths_all[i % len(paths_all)] for i in range(images)], 64)
            wall = time.monotonic() - wall
            row["agents"] = size
            row["cpu_per_agent"] = [round((sum(psutil.Process(p.pid).cpu_times()[:2]) - cpu_before[p.pid]) / wall, 2)
                                    for p in procs]
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
            broker.stop()
            for group in groups:
                group.rmdir()
    one = rows[0]["throughput"]
    for row in rows:
        row["scaling"] = row["throughput"] / one
    return rows


def render(rows: list[dict], quota: float, images: int) -> str:
    lines = ["## Fleet: agents with a Pi-sized CPU slice behind one broker", "",
             f"Each agent in its own cgroup v1 `cpu` group with a quota of {quota:g} CPU (a Pi-like slice; "
             "`model.threads` 1, `decode_workers` 1), one pool (`$share/`) behind one Mosquitto; broker and load "
             f"generator outside the quotas. Command: `python bench/fleet.py --quota {quota:g} --images {images} "
             "--out bench/RESULTS.md`.", "",
             "| agents | images/s | x one agent | ideal | p50 ms (64 in flight) | CPU per agent | answered | lost | "
             "answered twice |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['agents']} | {r['throughput']:.0f} | {r['scaling']:.2f} | {r['agents']} | {r['p50_ms']:.1f} | "
                     f"{', '.join(f'{c:.2f}' for c in r['cpu_per_agent'])} | {r['answered']} | {r['missing']} | "
                     f"{r['duplicates']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--quota", type=float, default=0.4, help="CPUs per agent")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--data", default=os.environ.get("ALLDS_DATA", str(REPO.parent / "shared/data/ALL_Aria2021")))
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--out", type=Path, help="update the fleet section of this Markdown file")
    args = parser.parse_args()
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists() or os.geteuid() != 0:
        print("fleet: needs root and cgroup v1's cpu controller at /sys/fs/cgroup/cpu", file=sys.stderr)
        sys.exit(2)
    rows = measure_fleet(args.agents, args.quota, args.images, Path(args.data))
    table = render(rows, args.quota, args.images)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.out:
        update_section(args.out, "fleet", "## Fleet scaling (Pi-sized agents)\n\n" + table)


if __name__ == "__main__":
    main()
