"""`python -m agent --config config/agent.yaml` (console script `allds-agent`): the daemon."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

from agent.config import ConfigError, load
from agent.diagnosis_ui import DiagnosisServer
from agent.metrics import Metrics
from agent.models import ModelStore
from agent.protocol import now_iso
from agent.service import ClassificationService
from agent.session import MqttSession, Will
from agent.telemetry import LifeReporter
from agent.topics import Topics
from model.classifier import ModelError

log = logging.getLogger("allds.agent")
DRAIN_TIMEOUT_S = 2.5  # with the last OFFLINE and the DISCONNECT, SIGTERM is honoured within 5 s
EXIT_CONFIG = 2  # systemd: RestartPreventExitStatus=2
LIFE_ON_CONNECT_GAP_S = 60.0  # a reconnect sends Life unless one went out this recently


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, when it is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")  # and bidi


class OneLineFormatter(logging.Formatter):
    """Writes control characters of a record's message escaped (`\\n`, `\\x1b`): request ids and names come
    from requesters, and a newline in one would start a forged line of the agent's log. Tracebacks keep theirs."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _CONTROL_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], super().formatMessage(record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="allds-agent", description="AllDS HIAS classification agent")
    parser.add_argument("--config", default="config/agent.yaml", help="YAML config (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        password = config.password()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=config.logging.level, handlers=[handler])
    try:
        store = ModelStore(config)
        classifier = store.start()
    except (OSError, ModelError) as exc:
        print(f"model error: {config.model.name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    topics = Topics.from_config(config)
    session = MqttSession(config.broker, config.client_id, password,
                          will=Will(topics.status, "OFFLINE", (("reason", "connection lost"),)),
                          receive_maximum=config.inference.max_inflight,
                          max_packet_bytes=max(config.inference.max_payload_bytes,
                                               config.model.max_bundle_bytes if config.model.trusted_keys else 0),
                          outbox_size=config.telemetry.outbox_size)
    metrics = None
    if config.metrics.port:
        metrics = Metrics(lambda: {"inflight": service.open_requests, "connected": session.connected.is_set(),
                                   "reconnects": max(0, session.connections - 1),
                                   "telemetry_dropped": session.dropped_telemetry, "model": service.model})
        try:
            metrics.serve(config.metrics.port, config.metrics.bind)
        except OSError as exc:
            print(f"config error: metrics.port: cannot listen on {config.metrics.bind}:{config.metrics.port} "
                  f"({exc.strerror})", file=sys.stderr)
            return EXIT_CONFIG
    service = ClassificationService(config, session, classifier, store, topics, metrics)
    http = None
    if config.http.port:
        try:
            http = DiagnosisServer(config.http, service)
        except OSError as exc:
            print(f"config error: http.port: cannot listen on {config.http.bind}:{config.http.port} ({exc.strerror})",
                  file=sys.stderr)
            return EXIT_CONFIG
    started = time.monotonic()

    def agent_fields() -> dict:
        c = service.counters
        return {"uptime_s": round(time.monotonic() - started, 1), "model": service.classifier.name,
                "model_version": service.classifier.version, "model_sha256": service.classifier.sha256,
                "requests": c.requests, "diagnoses": c.diagnoses, "errors": c.errors, "commands": c.commands,
                "open_requests": service.open_requests, "dropped_telemetry": session.dropped_telemetry,
                "stale_acks": session.stale_acks}

    life = LifeReporter(config.telemetry, lambda body: session.publish(topics.life, body, droppable=True),
                        agent_fields, numeric_temperature=config.hias.dialect == "hias3")
    service.on_life_command = life.trigger

    def announce(resumed: bool) -> None:
        session.publish(topics.status, "ONLINE", retain=True)
        life.trigger(min_gap_s=LIFE_ON_CONNECT_GAP_S)

    session.on_connected(announce)
    service.start()
    life.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("starting: model %s %s (%s), base topic %s, broker %s:%s", classifier.name, classifier.version,
             classifier.path.name, topics.base, config.broker.host, config.broker.port)
    session.start()
    if http:
        http.start()
    sd_notify("READY=1")  # serving runs; the connection comes and goes and is the watchdog's business
    beat = watchdog_interval()
    reported: set[str] = set()
    while not stop.wait(min(beat or 1.0, 1.0)) and not session.failed.is_set():
        problems = service.problems(config.watchdog.stall_s) + \
            session.problems(config.watchdog.stall_s, config.watchdog.max_disconnected_s)
        for problem in set(problems) - reported:
            log.error("unhealthy, watchdog pings stop: %s", problem)
        reported = set(problems)
        if beat and not problems:
            sd_notify("WATCHDOG=1")
    if session.failed.is_set():
        log.error("%s", session.failure)
        sd_notify("STOPPING=1")
        service.drain(0)
        life.stop()
        session.stop()
        return EXIT_CONFIG
    if http:
        http.stop()
    log.info("stopping: finishing %d open requests", service.open_requests)
    sd_notify("STOPPING=1")
    connected = session.connected.is_set()
    drained = service.drain(DRAIN_TIMEOUT_S if connected else 0)
    life.stop()
    session.wait_acked(1.0 if connected else 0)
    session.stop(last=(topics.status, "OFFLINE", [("reason", "shutdown"), ("ts", now_iso())]), timeout=1.0)
    log.info("stopped%s", "" if drained else " (some requests left unacknowledged; the broker redelivers them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
