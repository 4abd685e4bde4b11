"""What a broker does with each MQTT feature the agent relies on, found with plain paho clients.

`probe(port)` returns one short finding per feature (the rows of docs/brokers.md); tests/test_brokers.py
asserts them for each broker. `python -m tests.broker_probe --start mosquitto|ejabberd|amqtt` starts
that broker on loopback as the tests do and prints them; `--port N [--user U --password P]` probes a
broker already listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import socket
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

WAIT_S = 2.0  # how long "nothing arrived" is watched for
_ids = itertools.count()


class Probe:
    """A paho client that records CONNACK, SUBACKs, DISCONNECT and messages."""

    def __init__(self, port: int, v5: bool, client_id: str | None = None, user: str | None = None,
                 password: str | None = None, persistent: bool = False, connect: Properties | None = None,
                 manual_ack: bool = False, will: tuple[str, bytes] | None = None, connack_timeout: float = 10) -> None:
        self.client_id = client_id or f"probe-{next(_ids)}-{time.monotonic_ns() % 10**6}"
        self.v5 = v5
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  clean_session=None if v5 else not persistent, manual_ack=manual_ack)
        if user:
            self.client.username_pw_set(user, password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connack: tuple | None = None
        self.disconnect: mqtt.ReasonCode | None = None
        self.disconnect_packet = False  # paho reports a dropped connection as 0x80 too; only a packet is the broker's word
        self.subacks: dict[int, list] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: setattr(self, "connack", (rc, flags, props))
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.__setitem__(mid, codes)
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        kwargs = {"clean_start": not persistent, "properties": connect} if v5 else {}
        self.client.connect("127.0.0.1", port, 30, **kwargs)
        self.client.loop_start()
        _until(lambda: self.connack or self.disconnect, connack_timeout)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnect, self.disconnect_packet = reason_code, flags.is_disconnect_packet_from_server

    @property
    def accepted(self) -> bool:
        return bool(self.connack) and not self.connack[0].is_failure

    def subscribe(self, topic: str) -> list | None:
        """SUBACK reason codes, or None when the broker answered otherwise (e.g. DISCONNECT)."""
        _, mid = self.client.subscribe(topic, qos=1)
        return _until(lambda: self.subacks.get(mid) or self.disconnect, WAIT_S) and self.subacks.get(mid)

    def publish(self, topic: str, payload: bytes, retain: bool = False, properties: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain, properties=properties).wait_for_publish(10)

    def received(self, wait: float = WAIT_S, until=lambda got: False) -> list[mqtt.MQTTMessage]:
        """Everything that arrives within `wait` seconds, or until `until(messages so far)` holds."""
        got, deadline = [], time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and not until(got):
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return got

    def drop(self) -> None:
        """Close the socket without DISCONNECT (as a crash would)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _until(get, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := get():
            return value
        time.sleep(0.01)
    return None


def _connect_props(**values) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _reason(probe: Probe) -> str:
    code = probe.disconnect
    if probe.disconnect_packet:
        return f"DISCONNECT 0x{code.value:02X} {code}"
    return "connection closed (no DISCONNECT)" if code is not None else "no answer"


def mqtt5(port: int, **auth) -> str:
    """An MQTT 5 CONNECT with the credentials; if unanswered, a bare one (no credentials, no properties)."""
    p = Probe(port, True, connack_timeout=5, **auth)
    p.close()
    if p.accepted:
        return "yes"
    if p.connack:
        return f"no: CONNACK 0x{p.connack[0].value:02X} {p.connack[0]}"
    if p.disconnect_packet or not any(auth.values()):
        return f"no: {_reason(p)}"
    bare = Probe(port, True, connack_timeout=5)
    bare.close()
    answer = f"CONNACK 0x{bare.connack[0].value:02X} {bare.connack[0]}" if bare.connack else _reason(bare)
    return f"no: an MQTT 5 CONNECT with credentials gets no answer in 5 s, a bare one gets {answer}"


def persistent_session(port: int, v5: bool, **auth) -> str:
    """Subscribe with a persistent session, leave, have a message published, come back."""
    topic, client_id = f"probe/session/{time.monotonic_ns()}", f"probe-session-{time.monotonic_ns() % 10**6}"
    props = _connect_props(SessionExpiryInterval=3600) if v5 else None
    p = Probe(port, v5, client_id, persistent=True, connect=props, **auth)
    p.subscribe(topic)
    p.close()
    sender = Probe(port, v5, **auth)
    sender.publish(topic, b"queued")
    sender.close()
    back = Probe(port, v5, client_id, persistent=True, connect=props, **auth)
    try:
        present = back.connack[1].session_present
        delivered = any(m.payload == b"queued" for m in back.received(until=len))
        granted = getattr(back.connack[2], "SessionExpiryInterval", None) if v5 else None
        shortened = f"; Session Expiry cut to {granted} s (asked 3600)" if granted is not None and granted < 3600 else ""
        if present and delivered:
            return f"yes{shortened}"
        return f"no: session present {present}, queued message {'delivered' if delivered else 'lost'}{shortened}"
    finally:
        back.close()


def receive_maximum(port: int, **auth) -> str:
    """Six QoS 1 messages toward a client that allows 2 unacknowledged: how many arrive before it acks?"""
    topic = f"probe/rm/{time.monotonic_ns()}"
    p = Probe(port, True, connect=_connect_props(ReceiveMaximum=2), manual_ack=True, **auth)
    p.subscribe(topic)
    sender = Probe(port, True, **auth)
    for i in range(6):
        sender.publish(topic, b"%d" % i)
    try:
        first = p.received()
        for message in first:
            p.client.ack(message.mid, message.qos)
        rest = p.received()
        verdict = "honoured" if len(first) == 2 else "stricter than asked" if len(first) < 2 else "ignored"
        return f"{verdict}: {len(first)} of 6 in flight before acks (allowed 2), {len(rest)} after"
    finally:
        sender.close()
        p.close()


def maximum_packet_size(port: int, **auth) -> str:
    """A client that accepts packets up to 2 kB; an 8 kB message then a small one are published to it."""
    topic = f"probe/mps/{time.monotonic_ns()}"
    p = Probe(port, True, connect=_connect_props(MaximumPacketSize=2048), **auth)
    p.subscribe(topic)
    sender = Probe(port, True, **auth)
    sender.publish(topic, b"x" * 8192)
    sender.publish(topic, b"small")
    try:
        sizes = [len(m.payload) for m in p.received(until=lambda got: any(m.payload == b"small" for m in got))]
        if sizes == [5]:
            return "honoured: the 8 kB message was not sent to a client that allows 2 kB"
        if 8192 in sizes:
            return "ignored: the 8 kB message was sent to a client that allows 2 kB"
        return f"unclear: received sizes {sizes}, {_reason(p)}"
    finally:
        sender.close()
        p.close()


def shared_subscriptions(port: int, v5: bool, **auth) -> str:
    """Two members of `$share/g/...`; four messages: each should reach exactly one member."""
    topic = f"probe/share/{time.monotonic_ns()}"
    members = [Probe(port, v5, **auth) for _ in range(2)]
    try:
        codes = [m.subscribe(f"$share/g/{topic}") for m in members]
        if codes[0] is None:
            return f"refused: {_reason(members[0])}"
        if codes[0][0].is_failure:
            return f"refused: SUBACK 0x{codes[0][0].value:02X} {codes[0][0]}"
        sender = Probe(port, v5, **auth)
        for i in range(4):
            sender.publish(topic, b"%d" % i)
        sender.close()
        counts = [len(m.received()) for m in members]
        if sum(counts) == 4:
            return f"yes: 4 messages split {counts[0]}+{counts[1]}"
        return f"no: SUBACK granted, but 4 messages reached the members {counts[0]}+{counts[1]} times"
    finally:
        for m in members:
            m.close()


def retained_and_will(port: int, v5: bool, **auth) -> str:
    """A retained Last Will from a client whose connection drops, seen by a later subscriber."""
    topic = f"probe/will/{time.monotonic_ns()}"
    p = Probe(port, v5, will=(topic, b"OFFLINE"), **auth)
    p.drop()
    time.sleep(0.5)
    late = Probe(port, v5, **auth)
    try:
        late.subscribe(topic)
        got = late.received(until=len)
        if got and got[0].payload == b"OFFLINE" and got[0].retain:
            return "yes"
        return f"no: a late subscriber got {[(m.payload, m.retain) for m in got]}"
    finally:
        late.close()


def response_topic(port: int, **auth) -> str:
    """Response Topic and Correlation Data of a PUBLISH reach the subscriber unchanged."""
    topic = f"probe/rt/{time.monotonic_ns()}"
    p = Probe(port, True, **auth)
    p.subscribe(topic)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = "probe/reply", b"\x00corr"
    sender = Probe(port, True, **auth)
    sender.publish(topic, b"req", properties=props)
    try:
        got = p.received(until=len)
        if got and getattr(got[0].properties, "ResponseTopic", None) == "probe/reply" and \
                getattr(got[0].properties, "CorrelationData", None) == b"\x00corr":
            return "yes"
        return "no: properties lost"
    finally:
        sender.close()
        p.close()


def takeover(port: int, v5: bool, **auth) -> str:
    """What the first of two clients with one client id is told when the second connects."""
    client_id = f"probe-twin-{time.monotonic_ns() % 10**6}"
    first = Probe(port, v5, client_id, **auth)
    second = Probe(port, v5, client_id, **auth)
    try:
        _until(lambda: first.disconnect is not None, WAIT_S)
        if first.disconnect is None:
            return "the first client stays connected"
        return f"first client gets {_reason(first)}"
    finally:
        second.close()
        first.close()


def probe(port: int, user: str | None = None, password: str | None = None) -> dict[str, str]:
    """One finding per feature; MQTT 5 features are probed only when the broker accepts MQTT 5."""
    auth = {"user": user, "password": password}
    found = {"MQTT 5": mqtt5(port, **auth)}
    v5 = found["MQTT 5"] == "yes"
    found["persistent session kept"] = persistent_session(port, v5, **auth)
    found["Receive Maximum"] = receive_maximum(port, **auth) if v5 else "n/a (MQTT 5 property)"
    found["Maximum Packet Size"] = maximum_packet_size(port, **auth) if v5 else "n/a (MQTT 5 property)"
    found["shared subscriptions"] = shared_subscriptions(port, v5, **auth)
    found["retained Last Will"] = retained_and_will(port, v5, **auth)
    found["Response Topic / Correlation Data"] = response_topic(port, **auth) if v5 else "n/a (MQTT 5 properties)"
    found["client id taken over"] = takeover(port, v5, **auth)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description="Probe an MQTT broker for the features the agent uses")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="a broker already listening on 127.0.0.1")
    where.add_argument("--start", choices=["mosquitto", "ejabberd", "amqtt"],
                       help="start this broker on loopback as the tests do, probe it, stop it")
    parser.add_argument("--user")
    parser.add_argument("--password")
    args = parser.parse_args()
    broker = None
    if args.start:
        from tests.brokers import PASSWORD, USER, Amqtt, Ejabberd
        from tests.helpers import Broker

        work = Path(tempfile.mkdtemp(prefix=f"allds-probe-{args.start}-"))
        os.chmod(work, 0o777)  # mosquitto started as root drops to user mosquitto
        broker = {"mosquitto": Broker, "ejabberd": Ejabberd, "amqtt": Amqtt}[args.start](work / "broker").start()
        args.port, args.user, args.password = broker.port, USER, PASSWORD
    try:
        for feature, finding in probe(args.port, args.user, args.password).items():
            print(f"{feature}: {finding}")
    finally:
        if broker:
            broker.stop()


if __name__ == "__main__":
    main()
