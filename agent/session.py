"""The one MQTT session: paho client, Last Will, TLS, TCP_NODELAY, reconnects with backoff,
manual acknowledgement and PUBACK tracking. The rest of the program never touches paho.

One thread (`mqtt`) owns the socket: it connects, reads and writes. `publish()` and `ack()` from
other threads only queue their packet and wake it (paho's own threaded mode does the same; we keep
our own loop for the reconnect policy), so TLS records are never interleaved by two writers.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import tenacity
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import Broker

log = logging.getLogger("allds.session")

CONNACK_TIMEOUT_S = 10.0
STABLE_CONNECTION_S = 30.0  # a connection that lasted this long resets the reconnect backoff
SHORT_CONNECTIONS_SUSPECT = 3
SHARED_CLOSES_CONCLUSIVE = 2  # connections ended in a row while a $share/ SUBSCRIBE awaited its SUBACK
PACKET_HEADROOM = 64 * 1024  # topic, properties and envelope around the largest accepted payload
SESSION_TAKEN_OVER = 0x8E
SHARED_NOT_SUPPORTED = 0x9E  # in a SUBACK, or (ejabberd) a DISCONNECT in answer to the SUBSCRIBE
UNSUPPORTED_PROTOCOL = 0x84  # CONNACK; paho reports the MQTT 3.1.1 return code 1 as this too
NO_MQTT5_PROBE_S = 5.0
SUBACK_FAILURES = {
    0x80: "the broker refused the subscription to {topic}",
    0x87: "not authorized to subscribe to {topic} (check the broker ACL)",
    0x8F: "the broker calls the topic filter {topic} invalid",
    0x9E: "the broker does not support shared subscriptions ($share/), needed for {topic}: "
          "remove inference.shared_group or use a broker that has them",
    0xA2: "the broker does not support wildcard subscriptions, needed for {topic}",
}
WRONG_PROTOCOL = {  # broker.protocol -> what to say when the broker does not speak it
    "5": 'the broker does not speak MQTT 5 ({why}): set broker.protocol: "3.1.1" (no pools, Response Topic or '
         'packet-size limit on MQTT 3.1.1)',
    "3.1.1": 'the broker does not speak MQTT 3.1.1 ({why}): set broker.protocol: "5"',
}


class ConnectFailed(Exception):
    """One connection attempt failed (refused, TLS, no CONNACK); retried with backoff."""


class ConnectionLost(Exception):
    """A connection ended soon after it was made; the next attempt waits (backoff)."""


class SessionFailed(Exception):
    """The broker ended the session for a reason no retry can fix; the agent exits (code 2)."""


@dataclass(frozen=True)
class Will:
    """The Last Will: topic and payload, published QoS 1 retained by the broker."""

    topic: str
    payload: str
    user: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Inbound:
    """A received message, tagged with the connection it came on (acks are valid only there)."""

    topic: str
    payload: bytes
    properties: Properties | None
    qos: int
    mid: int
    retain: bool
    generation: int


def publish_properties(response_topic: str | None = None, correlation: bytes | None = None,
                       user: list[tuple[str, str]] | None = None) -> Properties | None:
    """MQTT 5 PUBLISH properties, or None when there are none."""
    if not (response_topic or correlation or user):
        return None
    props = Properties(PacketTypes.PUBLISH)
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    if user:
        props.UserProperty = user
    return props


# What `on_acked` receives: None when the broker accepted the message, else its refusal.
Acked = Callable[[str | None], None]


class MqttSession:
    """An MQTT connection kept alive on its own thread.

    `persistent=True` makes a fixed-id session that survives disconnects (queued QoS 1 messages
    are delivered on return) and acknowledges inbound messages only when `ack` is called.
    Publishes made while disconnected are queued: QoS 1 messages by paho (sent in order on
    reconnect), `droppable` ones (telemetry) in a bounded outbox that drops its oldest first.
    A session taken over by another client with our id, a refused subscription, or a broker that
    does not speak the configured protocol version ends the session for good: `failure` says why.
    """

    def __init__(self, broker: Broker, client_id: str, password: str | None = None, *,
                 persistent: bool = True, will: Will | None = None, receive_maximum: int | None = None,
                 max_packet_bytes: int | None = None, outbox_size: int = 100, session_expiry_s: int | None = None,
                 tcp_nodelay: bool = True) -> None:
        self.broker = broker
        self.client_id = client_id
        self.persistent = persistent
        self.v5 = broker.protocol == "5"
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else not persistent,
            manual_ack=persistent,
        )
        if broker.username:
            self._client.username_pw_set(broker.username, password)
        if will:
            will_props = Properties(PacketTypes.WILLMESSAGE) if self.v5 and will.user else None
            if will_props:
                will_props.UserProperty = list(will.user)
            self._client.will_set(will.topic, will.payload, qos=1, retain=True, properties=will_props)
        if broker.tls.enabled:
            self._client.tls_set_context(self._tls_context())
        if tcp_nodelay:  # off only to measure what Nagle's algorithm costs (bench/)
            self._client.on_socket_open = self._on_socket_open
        # With a write callback registered, paho never writes from the publishing thread: the packet
        # is queued and paho's socket pair wakes our loop, which writes it.
        self._client.on_socket_register_write = lambda client, userdata, sock: None
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._connect_props = None
        if self.v5:
            self._connect_props = Properties(PacketTypes.CONNECT)
            self._connect_props.SessionExpiryInterval = (session_expiry_s or broker.session_expiry_s) if persistent else 0
            if receive_maximum:
                self._connect_props.ReceiveMaximum = receive_maximum
            if max_packet_bytes:
                self._connect_props.MaximumPacketSize = max_packet_bytes + PACKET_HEADROOM
        self._subscriptions: list[tuple[str, str, Callable[[Inbound], None]]] = []  # (subscribe, match, handler)
        self._subscribing: dict[int, str] = {}
        self._on_connected: list[Callable[[bool], None]] = []
        self._lock = threading.Lock()
        self._pending: dict[int, Acked | None] = {}
        self._acked_early: dict[int, str | None] = {}
        self._outbox: deque[tuple[str, bytes, bool]] = deque()
        self._outbox_size = outbox_size
        self.dropped_telemetry = 0
        self.stale_acks = 0
        self.generation = 0  # connection attempts so far; a message may be acknowledged only on its own
        self.connections = 0  # successful ones
        self.connected = threading.Event()
        self.failure: str | None = None
        self.failed = threading.Event()
        self._had_session = False
        self._short_connections = 0
        self._shared_closes = 0
        self._connack: ReasonCode | None = None
        self._connected_at = 0.0
        self._disconnected_since: float | None = time.monotonic()
        self._last_beat = time.monotonic()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public interface -------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Callable[[Inbound], None], shared_group: str | None = None) -> None:
        """Subscribe at QoS 1 and route messages matching `topic_filter` to `handler` (on the network thread; keep it short)."""
        subscribe_to = f"$share/{shared_group}/{topic_filter}" if shared_group else topic_filter
        self._subscriptions.append((subscribe_to, topic_filter, handler))

    def on_connected(self, callback: Callable[[bool], None]) -> None:
        """Run `callback(resumed)` on the network thread after every successful (re)connect; `resumed` is
        true when this process was connected before and the broker kept the session (and its retained state)."""
        self._on_connected.append(callback)

    def start(self) -> None:
        """Connect (retrying with backoff) and keep the connection on a background thread."""
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False,
                properties: Properties | None = None, on_acked: Acked | None = None, droppable: bool = False) -> None:
        """Publish at QoS 1; `on_acked(refusal)` runs once the broker has answered it (refusal None = accepted).

        While disconnected a `droppable` message waits in the bounded outbox; any other QoS 1
        message is queued by paho and sent on reconnect.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        if droppable and not self.connected.is_set():
            with self._lock:
                if len(self._outbox) >= self._outbox_size:
                    self._outbox.popleft()
                    self.dropped_telemetry += 1
                    log.warning("outbox full: dropped the oldest telemetry message (%d so far)", self.dropped_telemetry)
                self._outbox.append((topic, data, retain))
            return
        info = self._client.publish(topic, data, qos=1, retain=retain, properties=properties)
        with self._lock:  # the PUBACK may already have arrived on the network thread
            early = info.mid in self._acked_early
            refusal = self._acked_early.pop(info.mid, None)
            if not early:
                self._pending[info.mid] = on_acked
        if early and on_acked:
            on_acked(refusal)

    def ack(self, message: Inbound) -> None:
        """Acknowledge an inbound QoS 1 message on the connection it came on; a stale one is dropped."""
        if not (self.persistent and message.qos > 0):
            return
        with self._lock:  # a reconnect bumps the generation under this lock before it opens a socket
            current = message.generation == self.generation
            if current:
                self._client.ack(message.mid, message.qos)
            else:
                self.stale_acks += 1
        if not current:
            log.warning("stale acknowledgement dropped: packet %d came on connection %d, this is connection %d "
                        "(the broker redelivers it)", message.mid, message.generation, self.generation)

    def unacked(self) -> int:
        """Outbound QoS 1 messages still waiting for their PUBACK."""
        with self._lock:
            return len(self._pending)

    def wait_acked(self, timeout: float) -> bool:
        """Wait until no outbound QoS 1 message awaits its PUBACK."""
        deadline = time.monotonic() + timeout
        while self.unacked() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.unacked()

    def problems(self, stall_s: float, max_disconnected_s: float) -> list[str]:
        """Why the session is unhealthy (for the watchdog): a dead or stuck network thread, or no broker for too long."""
        now = time.monotonic()
        found = []
        if self._thread is not None and not self._thread.is_alive() and not self._stopping.is_set():
            found.append("the MQTT thread has ended")
        elif now - self._last_beat > stall_s:
            found.append(f"the MQTT thread has not looped for {now - self._last_beat:.0f} s")
        since = self._disconnected_since
        if since is not None and now - since > max_disconnected_s:
            found.append(f"no broker connection for {now - since:.0f} s")
        return found

    def stop(self, last: tuple[str, str, list[tuple[str, str]] | None] | None = None, timeout: float = 2.0) -> None:
        """Optionally publish a last retained QoS 1 message, wait for acks, disconnect cleanly."""
        if last and self.connected.is_set():
            topic, payload, user = last
            self.publish(topic, payload, retain=True, properties=publish_properties(user=user) if self.v5 else None)
            self.wait_acked(timeout)
        self._stopping.set()
        if self._thread:
            self._thread.join(timeout)

    # ---- connection thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                retrying = tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type((ConnectFailed, ConnectionLost, OSError)),
                    wait=self._backoff(),
                    stop=tenacity.stop_when_event_set(self._stopping),
                    sleep=self._sleep,
                    before_sleep=self._log_retry,
                )
                retrying(self._connection)
        except tenacity.RetryError:
            pass  # stopping
        except SessionFailed as exc:
            self.failure = str(exc)
            self.failed.set()
        except Exception:  # noqa: BLE001 - reported to the watchdog as a dead thread
            log.exception("the MQTT thread failed")
        finally:
            self.connected.clear()
            self._close_socket()

    def _backoff(self) -> tenacity.wait.wait_base:
        """Delays that double from `reconnect_min_s` up to `reconnect_max_s`, each half fixed and half random
        ("equal jitter"): they always grow, and agents that lost one broker together come back spread out."""
        low, high = self.broker.reconnect_min_s / 2, self.broker.reconnect_max_s / 2
        return tenacity.wait_exponential(multiplier=low, max=high) + tenacity.wait_random_exponential(multiplier=low,
                                                                                                      max=high)

    def _sleep(self, seconds: float) -> None:
        """Back off, still beating for the watchdog and waking at once on stop."""
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and time.monotonic() < deadline:
            self._last_beat = time.monotonic()
            self._stopping.wait(min(0.5, max(0.0, deadline - time.monotonic())))

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        level = logging.WARNING if isinstance(exc, ConnectionLost) else logging.ERROR
        what = "" if isinstance(exc, ConnectionLost) else "cannot connect to "
        log.log(level, "%s%s:%s: %s; retry %d in %.1f s", what, self.broker.host, self.broker.port, exc,
                state.attempt_number, state.upcoming_sleep)

    def _connection(self) -> None:
        """One connection from CONNECT to its end. Returns after a long one (backoff resets); raises otherwise."""
        self._connect_once()
        reason = self._serve()
        if self._stopping.is_set():
            return
        if self.failure:
            raise SessionFailed(self.failure)
        lasted = time.monotonic() - self._connected_at
        self._count_shared_closes()
        if lasted >= STABLE_CONNECTION_S:
            self._short_connections = 0
            log.warning("connection to %s:%s lost after %.0f s (%s); reconnecting", self.broker.host, self.broker.port,
                        lasted, reason)
            return
        self._short_connections += 1
        if self._short_connections == SHORT_CONNECTIONS_SUSPECT:
            log.warning("the broker closed %d connections in a row soon after accepting them: another client may use "
                        "client id %s (agents cloned with one hias.name), or the broker refuses something the agent "
                        "sends (see the broker's log)", self._short_connections, self.client_id)
        raise ConnectionLost(f"connection closed {lasted:.1f} s after it was made ({reason})")

    def _count_shared_closes(self) -> None:
        """A broker without shared subscriptions may close the connection on a `$share/` SUBSCRIBE with a
        DISCONNECT 0x9E that does not always reach us (ejabberd: about 1 connection in 8 here). The
        connection ending while that SUBSCRIBE awaits its SUBACK, twice in a row, says the same."""
        pending = [topic for topic in self._subscribing.values() if topic.startswith("$share/")]
        self._shared_closes = self._shared_closes + 1 if pending else 0
        if self._shared_closes >= SHARED_CLOSES_CONCLUSIVE:
            raise SessionFailed(SUBACK_FAILURES[SHARED_NOT_SUPPORTED].format(topic=pending[0]) +
                                f" (the broker closed the connection {self._shared_closes} times in a row while that "
                                "subscription awaited its answer)")

    def _connect_once(self) -> None:
        self._connack = None
        with self._lock:
            self.generation += 1
        try:
            if self.generation == 1:
                v5_args = {"clean_start": not self.persistent, "properties": self._connect_props} if self.v5 else {}
                self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive, **v5_args)
            else:
                self._client.reconnect()
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS handshake failed ({exc.reason or exc}); check broker.tls.ca_certs "
                                "and the broker certificate's host name") from None
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None:
            self._last_beat = time.monotonic()
            rc = self._client.loop(timeout=0.2)
            if self._connack is None and rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectFailed(f"connection closed before CONNACK ({mqtt.error_string(rc)})")
            if self._stopping.is_set():
                raise ConnectFailed("stopping")
            if time.monotonic() > deadline:
                self._close_socket()
                if self.v5 and not self._connected_at and self._refuses_bare_mqtt5():
                    raise SessionFailed(WRONG_PROTOCOL["5"].format(
                        why="no CONNACK to the agent's CONNECT, 'Unsupported protocol version' to a bare one"))
                raise ConnectFailed(f"no CONNACK within {CONNACK_TIMEOUT_S:.0f} s")
        if self._connack.value == UNSUPPORTED_PROTOCOL:
            raise SessionFailed(WRONG_PROTOCOL[self.broker.protocol].format(why=f"CONNACK: {self._connack}"))
        if self._connack.is_failure:
            raise ConnectFailed(f"broker refused the connection: {self._connack}")

    def _refuses_bare_mqtt5(self) -> bool:
        """After an MQTT 5 CONNECT went unanswered: does the broker refuse a bare one (no properties, no
        credentials) as an unsupported protocol? A 3.1.1-only broker that misreads the agent's CONNECT
        (amqtt) never answers it, but refuses this one."""
        probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if self.broker.tls.enabled:
            probe.tls_set_context(self._tls_context())
        answer: list[ReasonCode] = []
        probe.on_connect = lambda client, userdata, flags, reason_code, properties: answer.append(reason_code)
        deadline = time.monotonic() + NO_MQTT5_PROBE_S
        try:
            probe.connect(self.broker.host, self.broker.port, self.broker.keepalive)
            while not answer and time.monotonic() < deadline and not self._stopping.is_set():
                self._last_beat = time.monotonic()
                if probe.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                    break
        except (OSError, ssl.SSLError):
            return False
        finally:
            sock = probe.socket()
            if sock is not None:
                sock.close()
        return bool(answer) and answer[0].value == UNSUPPORTED_PROTOCOL

    def _serve(self) -> str:
        """Run the connection until it ends; returns why it ended."""
        disconnecting = False
        while True:
            self._last_beat = time.monotonic()
            if (self._stopping.is_set() or self.failure) and not disconnecting:
                disconnecting = True
                self._disconnect_for_good()
            try:
                rc = self._client.loop(timeout=0.2)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any one bad packet
                log.exception("network loop failed; reconnecting")
                self._close_socket()
                return f"{type(exc).__name__}: {exc}"
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return mqtt.error_string(rc)

    def _disconnect_for_good(self) -> None:
        """A clean DISCONNECT when stopping; on failure one that makes the broker publish our Last Will."""
        if self.failure and self.v5:
            self._client.disconnect(ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        elif self.failure:
            self._close_socket()  # MQTT 3.1.1: only a dropped connection publishes the Will
        else:
            self._client.disconnect()

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.broker.tls
        ctx = ssl.create_default_context(cafile=None if tls.ca_certs == "system" else tls.ca_certs)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.certfile:
            ctx.load_cert_chain(tls.certfile, tls.keyfile)
        return ctx

    # ---- paho callbacks (network thread) ----------------------------------------------
    def _on_socket_open(self, client, userdata, sock) -> None:
        # Nagle + delayed ACK cost ~88 ms per small QoS 1 round trip on loopback.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code
        if reason_code.is_failure:
            return
        self._warn_if_session_expiry_cut(properties)
        self._connected_at = time.monotonic()
        self._disconnected_since = None
        self.connections += 1
        if self.persistent and self._had_session and not flags.session_present:
            log.warning("broker did not keep the session (session present: False): requests queued while the agent "
                        "was away are lost, and any still unanswered will not be redelivered (broker restarted "
                        "without persistence, or session expired)")
        else:
            log.info("connected to %s:%s (session present: %s)", self.broker.host, self.broker.port,
                     flags.session_present)
        resumed = self._had_session and flags.session_present
        self._had_session = self.persistent
        self._subscribing.clear()
        for subscribe_to, _, _ in self._subscriptions:
            # MQTT 5 Retain As Published: a message published retained keeps its flag when it arrives live, so a
            # retained request or command is known as one at once, not only at the next connect
            options = SubscribeOptions(qos=1, retainAsPublished=True) if self.v5 else None
            _, mid = client.subscribe(subscribe_to, options=options) if options else client.subscribe(subscribe_to, qos=1)
            self._subscribing[mid] = subscribe_to
        self.connected.set()
        for callback in self._on_connected:
            callback(resumed)
        with self._lock:
            queued, self._outbox = list(self._outbox), deque()
        for topic, data, retain in queued:
            self.publish(topic, data, retain=retain)

    def _warn_if_session_expiry_cut(self, connack: Properties | None) -> None:
        """MQTT 5: the broker may keep the session for less than asked (CONNACK Session Expiry Interval)."""
        asked = getattr(self._connect_props, "SessionExpiryInterval", 0)
        granted = getattr(connack, "SessionExpiryInterval", None)
        if self.persistent and granted is not None and granted < asked and not self._connected_at:
            log.warning("the broker keeps the session only %d s (asked for %d s): requests sent while the agent is away "
                        "longer are lost (raise the broker's limit, e.g. ejabberd's mod_mqtt session_expiry)", granted, asked)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        topic = self._subscribing.pop(mid, "?")
        said = getattr(properties, "ReasonString", None)
        for code in reason_codes:
            if code.is_failure and not self.failure:
                self.failure = SUBACK_FAILURES.get(code.value, "the broker refused the subscription to {topic} ({code})") \
                    .format(topic=topic, code=code) + (f" (broker: {said})" if said else "")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self._disconnected_since is None:
            self._disconnected_since = time.monotonic()
        if self.v5 and reason_code.value == SESSION_TAKEN_OVER and not self.failure:
            self.failure = (f"another client uses client id {self.client_id} and took the session over; give each "
                            "agent its own hias.name or broker.client_id")
        elif self.v5 and reason_code.value == SHARED_NOT_SUPPORTED and not self.failure:
            shared = next((topic for topic, _, _ in self._subscriptions if topic.startswith("$share/")), "?")
            self.failure = SUBACK_FAILURES[SHARED_NOT_SUPPORTED].format(topic=shared)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        refusal = str(reason_code) if reason_code.is_failure else None
        if refusal:
            log.error("broker refused publish %d: %s", mid, refusal)
        with self._lock:
            if mid in self._pending:
                callback = self._pending.pop(mid)
            else:
                self._acked_early[mid] = refusal
                callback = None
        if callback:
            try:
                callback(refusal)
            except Exception:  # noqa: BLE001 - a caller's bug must not end the network thread
                log.exception("PUBACK callback failed")

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        inbound = Inbound(message.topic, message.payload, message.properties, message.qos, message.mid,
                          bool(message.retain), self.generation)
        for _, match, handler in self._subscriptions:
            if mqtt.topic_matches_sub(match, inbound.topic):
                try:
                    handler(inbound)
                except Exception:  # noqa: BLE001 - handlers answer their own errors; this is the last line
                    log.exception("handler for %s failed; message acknowledged so it cannot come back", inbound.topic)
                    self.ack(inbound)
                return
        self.ack(inbound)
