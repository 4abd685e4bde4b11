"""One writer per socket, shown over TLS: for a minute, eight threads publish and four acknowledge
inbound messages through one session; the broker sees no protocol error and the session never
reconnects."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from agent.config import parse
from agent.session import MqttSession
from tests.helpers import REPO, Broker, Client, free_port

STRESS_S = float(os.environ.get("ALLDS_TLS_STRESS_S", "60"))


def test_many_threads_publish_and_ack_over_tls_for_a_minute(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "certs/make-certs.sh"), "--out", str(certs)], check=True, capture_output=True)
    plain, tls = free_port(), free_port()
    listeners = (f"listener {plain} 127.0.0.1\nallow_anonymous true\n"
                 f"listener {tls} 127.0.0.1\nallow_anonymous true\ncafile {certs / 'ca.crt'}\n"
                 f"certfile {certs / 'broker.crt'}\nkeyfile {certs / 'broker.key'}\ntls_version tlsv1.2\n")
    broker = Broker(tmp_path / "broker", port=plain, listeners=listeners).start(wait_for=tls)
    config = parse({"broker": {"port": tls, "tls": {"enabled": True, "ca_certs": str(certs / "ca.crt")}}})
    session = MqttSession(config.broker, "tls-stress", receive_maximum=64)
    inbound, acked, published, refused = [], [0], [0], []
    work = threading.Semaphore(0)
    lock = threading.Lock()

    def on_message(message) -> None:  # network thread: hand over, as the service does
        with lock:
            inbound.append(message)
        work.release()

    def acker() -> None:
        while not stop.is_set():
            if work.acquire(timeout=0.1):
                with lock:
                    message = inbound.pop()
                session.ack(message)
                with lock:
                    acked[0] += 1

    def publisher(n: int) -> None:
        payload = os.urandom(2000 + 500 * n)
        while not stop.is_set():
            session.publish(f"stress/out/{n}", payload, on_acked=lambda refusal: refusal and refused.append(refusal))
            with lock:
                published[0] += 1
            time.sleep(0.0005)

    session.subscribe("stress/in", on_message)
    session.start()
    stop = threading.Event()
    try:
        assert session.connected.wait(10)
        sender = Client(plain)
        threads = [threading.Thread(target=publisher, args=(n,)) for n in range(8)]
        threads += [threading.Thread(target=acker) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + STRESS_S
        sent = 0
        while time.monotonic() < deadline:
            for _ in range(20):
                sender.client.publish("stress/in", os.urandom(1000), qos=1)
                sent += 1
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(10)
        backlog = session.unacked()  # publishes queued faster than acknowledged on an idle host: let them drain
        assert session.wait_acked(180), f"{session.unacked()} of {backlog} publishes still unacknowledged after 180 s"
        sender.close()
        log = broker.log()
        print(f"\n{STRESS_S:.0f} s over TLS: {published[0]} publishes from 8 threads, {acked[0]} of {sent} inbound "
              f"acknowledged from 4 threads, connections {session.generation}")
        assert session.generation == 1 and session.connected.is_set(), "the session reconnected"
        assert "OpenSSL Error" not in log and "Protocol error" not in log, log[-3000:]
        assert not refused and acked[0] > 0.9 * sent
    finally:
        stop.set()
        session.stop()
        broker.stop()
