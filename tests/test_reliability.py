"""Nothing lost: at-least-once through broker restarts and an agent SIGKILL; the agent waits for a
broker that is not there yet."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

from tests.helpers import BASE, REPO, Broker, Client


def _online(port: int, timeout: float = 30) -> None:
    watcher = Client(port).subscribe(f"{BASE}/Status")
    try:
        watcher.expect(f"{BASE}/Status", timeout, lambda m: m.payload == b"ONLINE")
    finally:
        watcher.close()


def test_300_requests_survive_two_broker_restarts_and_an_agent_sigkill(tmp_path, start_agent, data_root):
    broker = Broker(tmp_path / "broker", persistence=True).start()
    try:
        agent = start_agent(broker.port, name="agent1")
        _online(broker.port)
        listing = tmp_path / "list.txt"
        paths = (REPO / "data/aria2021/train.txt").read_text().split()[:300]
        listing.write_text("\n".join(paths) + "\n")
        replay = subprocess.Popen(
            [sys.executable, "-m", "agent.replay", str(listing), "--data", str(data_root), "--config",
             str(agent.config), "--rate", "25", "--concurrency", "16", "--timeout", "120", "--quiet",
             "--json", str(tmp_path / "report.json")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        events = []

        def restart_broker() -> None:
            broker.stop()
            time.sleep(1.0)
            events.append(("broker restarted", time.time()))
            broker.start()

        time.sleep(3)
        restart_broker()
        time.sleep(3)
        agent.proc.send_signal(signal.SIGSTOP)  # requests pile up in flight: delivered, never answered
        stopped_at = time.time()
        time.sleep(1.0)
        killed_at = time.time()
        agent.kill()  # SIGKILL mid-run: its open requests were never acknowledged
        events.append(("agent killed", killed_at))
        time.sleep(0.5)
        agent.start()
        time.sleep(3)
        restart_broker()
        out, err = replay.communicate(timeout=240)
        report = json.loads((tmp_path / "report.json").read_text())
        print(f"\nsent {report['images']} answered {report['answered']} duplicates {report['duplicates']} "
              f"lost {len(report['missing'])}")
        for what, when in events:
            if what == "broker restarted":
                connected = [_stamp(line) for line in agent.log().splitlines() if "connected to" in line]
                after = [t for t in connected if t >= when - 0.01]
                print(f"{what}: agent reconnected after {min(after) - when:.2f} s" if after else f"{what}: ?")
        assert replay.returncode == 0, err[-2000:]
        in_flight = [r for r in report["results"] if stopped_at <= r["sent_at"] <= killed_at]
        print(f"in flight at the SIGKILL: {len(in_flight)} requests sent while the agent was stopped")
        assert len(in_flight) >= 10
        assert report["images"] == 300 and report["answered"] == 300 and report["missing"] == []
        assert all("diagnosis" in r["reply"] for r in report["results"])
    finally:
        broker.stop()


def _stamp(line: str) -> float:
    match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    return time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(match.group(1)[20:]) / 1000


def test_agent_started_before_the_broker_retries_then_serves(tmp_path, start_agent, data_root):
    broker = Broker(tmp_path / "broker")
    agent = start_agent(broker.port, broker={"reconnect_min_s": 0.2, "reconnect_max_s": 1.0})
    time.sleep(3)
    assert agent.proc.poll() is None
    retries = re.findall(r"cannot connect to 127\.0\.0\.1:\d+: .*; retry (\d+) in ([\d.]+) s", agent.log())
    assert len(retries) >= 2, agent.log()
    assert all(float(delay) <= 1.0 for _, delay in retries)
    broker.start()
    try:
        client = Client(broker.port).subscribe(f"{BASE}/#")
        client.expect(f"{BASE}/Status", 20, lambda m: m.payload == b"ONLINE")
        client.publish(f"{BASE}/Inference", (data_root / "Benign/WBC-Benign-002.jpg").read_bytes(),
                       correlation=b"late")
        assert "diagnosis" in client.expect_json(f"{BASE}/Diagnosis", id="late")
        client.close()
    finally:
        broker.stop()


def test_shutdown_with_requests_in_flight_loses_none(tmp_path, start_agent, data_root):
    broker = Broker(tmp_path / "broker", persistence=True).start()
    try:
        agent = start_agent(broker.port)
        _online(broker.port)
        client = Client(broker.port).subscribe(f"{BASE}/Diagnosis")
        images = sorted((data_root / "Early").glob("*.jpg"))[:60]
        agent.proc.send_signal(signal.SIGSTOP)  # all 60 are in flight when SIGTERM arrives
        for p in images:
            client.publish(f"{BASE}/Inference", p.read_bytes(), correlation=p.name.encode())
        assert client.messages.empty()
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.send_signal(signal.SIGCONT)
        assert agent.proc.wait(10) == 0
        agent.start()
        seen = set()
        deadline = time.monotonic() + 60
        while len(seen) < len(images) and time.monotonic() < deadline:
            try:
                seen.add(client.expect_json(f"{BASE}/Diagnosis", 2)["id"])
            except AssertionError:
                pass
        assert seen == {p.name for p in images}
        client.close()
    finally:
        broker.stop()
