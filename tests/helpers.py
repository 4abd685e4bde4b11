"""Test helpers: a real Mosquitto started on 127.0.0.1 and an ephemeral port, agents as real
processes, and a plain paho client that records what it sees."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
BASE = "allds-location/Devices/allds-zone/allds-device"


def _wait_for(get, timeout: float, what: str):
    """Poll `get()` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on the port; fail at once, with its stderr, if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}: {err}")
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {port}")


class Broker:
    """A Mosquitto process with a generated config, started and stopped by PID."""

    def __init__(self, workdir: Path, extra: str = "", persistence: bool = False, port: int | None = None,
                 listeners: str | None = None, tcp_nodelay: bool = True) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o777)  # mosquitto started as root drops to user mosquitto
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        lines = ["user root", f"set_tcp_nodelay {str(tcp_nodelay).lower()}", f"log_dest file {self.dir / 'mosquitto.log'}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
        lines += [listeners if listeners is not None else f"listener {self.port} 127.0.0.1\nallow_anonymous true"]
        self.conf.write_text("\n".join(lines + [extra]) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, wait_for: int | None = None) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        try:
            wait_port(wait_for or self.port, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{exc}\nbroker log:\n{self.log()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # mosquitto saves its persistence file on SIGTERM
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


def write_config(path: Path, port: int, **sections) -> Path:
    """An agent YAML with the broker port and any section overrides."""
    config = {"broker": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
              "telemetry": {"life_interval_s": 60}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


class Agent:
    """`python -m agent` as a real process."""

    def __init__(self, config: Path, log_path: Path, env: dict | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Agent:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(self.config)], cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Client:
    """A plain paho client that records every message it receives."""

    def __init__(self, port: int, v5: bool = True, client_id: str = "", username: str | None = None,
                 password: str | None = None, **tls) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(**tls)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.refused = None
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "refused", rc if rc.is_failure else False)
        self.subacks: dict[int, list] = {}
        self.pubacks: dict[int, object] = {}
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.__setitem__(mid, codes)
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while self.refused is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def subscribe(self, topic: str, timeout: float = 10.0) -> Client:
        """Subscribe at QoS 1 and wait for the SUBACK (raises if the broker refused it)."""
        result, mid = self.client.subscribe(topic, qos=1)
        codes = _wait_for(lambda: self.subacks.get(mid), timeout, f"no SUBACK for {topic}")
        if any(code.is_failure for code in codes):
            raise AssertionError(f"subscription to {topic} refused: {codes}")
        return self

    def publish(self, topic: str, payload, response_topic: str | None = None, correlation: bytes | None = None,
                user: list[tuple[str, str]] | None = None, retain: bool = False):
        """Publish at QoS 1 and wait for the PUBACK; returns its reason code."""
        props = None
        if response_topic or correlation or user:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if user:
                props.UserProperty = user
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        return _wait_for(lambda: self.pubacks.get(info.mid), 30, f"no PUBACK for a publish on {topic}")

    def expect(self, topic: str, timeout: float = 15.0, where=lambda m: True) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if mqtt.topic_matches_sub(topic, message.topic) and where(message):
                return message
        raise AssertionError(f"nothing on {topic} within {timeout} s")

    def expect_json(self, topic: str, timeout: float = 15.0, **match) -> dict:
        def fits(message):
            try:
                doc = json.loads(message.payload)
            except ValueError:
                return False
            return all(doc.get(k) == v for k, v in match.items())

        return json.loads(self.expect(topic, timeout, fits).payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
