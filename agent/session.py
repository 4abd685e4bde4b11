"""The one MQTT session: paho client, Last Will, TLS, TCP_NODELAY, reconnects with backoff,
manual acknowledgement and PUBACK tracking. The rest of the program never touches paho.
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

from agent.config import Broker

log = logging.getLogger("allds.session")

Handler = Callable[[mqtt.MQTTMessage], None]
CONNACK_TIMEOUT_S = 10.0


class ConnectFailed(Exception):
    """One connection attempt failed (refused, TLS, no CONNACK); retried with backoff."""


@dataclass(frozen=True)
class Will:
    """The Last Will: topic and payload, published QoS 1 retained by the broker."""

    topic: str
    payload: str


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


class MqttSession:
    """An MQTT connection kept alive on its own thread.

    `persistent=True` makes a fixed-id session that survives disconnects (queued QoS 1 messages
    are delivered on return) and acknowledges inbound messages only when `ack` is called.
    Publishes made while disconnected are queued: QoS 1 messages by paho (sent in order on
    reconnect), `droppable` ones (telemetry) in a bounded outbox that drops its oldest first.
    """

    def __init__(self, broker: Broker, client_id: str, password: str | None = None, *,
                 persistent: bool = True, will: Will | None = None, receive_maximum: int | None = None,
                 outbox_size: int = 100, session_expiry_s: int | None = None, tcp_nodelay: bool = True) -> None:
        self.broker = broker
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
            self._client.will_set(will.topic, will.payload, qos=1, retain=True)
        if broker.tls.enabled:
            self._client.tls_set_context(self._tls_context())
        if tcp_nodelay:  # off only to measure what Nagle's algorithm costs (bench/)
            self._client.on_socket_open = self._on_socket_open
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._connect_props = None
        if self.v5:
            self._connect_props = Properties(PacketTypes.CONNECT)
            self._connect_props.SessionExpiryInterval = (session_expiry_s or broker.session_expiry_s) if persistent else 0
            if receive_maximum:
                self._connect_props.ReceiveMaximum = receive_maximum
        self._subscriptions: list[tuple[str, str, Handler]] = []  # (subscribe filter, match filter, handler)
        self._on_connected: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._pending: dict[int, Callable[[], None] | None] = {}
        self._acked_early: set[int] = set()
        self._outbox: deque[tuple[str, bytes, bool]] = deque()
        self._outbox_size = outbox_size
        self.dropped_telemetry = 0
        self.connected = threading.Event()
        self._connack: mqtt.ReasonCode | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public interface -------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, shared_group: str | None = None) -> None:
        """Subscribe at QoS 1 and route messages matching `topic_filter` to `handler` (on the network thread; keep it short)."""
        subscribe_to = f"$share/{shared_group}/{topic_filter}" if shared_group else topic_filter
        self._subscriptions.append((subscribe_to, topic_filter, handler))

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the network thread after every successful (re)connect."""
        self._on_connected.append(callback)

    def start(self) -> None:
        """Connect (retrying with backoff) and keep the connection on a background thread."""
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False,
                properties: Properties | None = None, on_acked: Callable[[], None] | None = None,
                droppable: bool = False) -> None:
        """Publish at QoS 1; `on_acked` runs once the broker has acknowledged it.

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
            if early:
                self._acked_early.discard(info.mid)
            else:
                self._pending[info.mid] = on_acked
        if early and on_acked:
            on_acked()

    def ack(self, message: mqtt.MQTTMessage) -> None:
        """Acknowledge an inbound QoS 1 message (persistent sessions acknowledge manually)."""
        if self.persistent and message.qos > 0:
            self._client.ack(message.mid, message.qos)

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

    def stop(self, last: tuple[str, str] | None = None, timeout: float = 5.0) -> None:
        """Optionally publish a last retained QoS 1 message, wait for acks, disconnect cleanly."""
        if last and self.connected.is_set():
            self.publish(last[0], last[1], retain=True)
            self.wait_acked(timeout)
        self._stopping.set()
        if self.connected.is_set():
            self._client.disconnect()
        if self._thread:
            self._thread.join(timeout)

    # ---- connection thread ------------------------------------------------------------
    def _run(self) -> None:
        first = True
        while not self._stopping.is_set():
            try:
                self._connect_with_backoff(first)
            except tenacity.RetryError:
                break  # stopping
            first = False
            while not self._stopping.is_set():
                try:
                    rc = self._client.loop(timeout=0.2)
                except Exception:  # noqa: BLE001 - this thread must outlive any one bad packet
                    log.exception("network loop failed; reconnecting")
                    self._client.disconnect()
                    break
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    if not self._stopping.is_set():
                        log.warning("connection to %s:%s lost (%s); reconnecting",
                                    self.broker.host, self.broker.port, mqtt.error_string(rc))
                    break
            self.connected.clear()

    def _connect_with_backoff(self, first: bool) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((ConnectFailed, OSError)),
            wait=tenacity.wait_random_exponential(multiplier=self.broker.reconnect_min_s,
                                                  max=self.broker.reconnect_max_s),
            stop=tenacity.stop_when_event_set(self._stopping),
            sleep=self._stopping.wait,
            before_sleep=self._log_retry,
        )
        retrying(self._connect_once, first)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.error("cannot connect to %s:%s: %s; retry %d in %.1f s", self.broker.host, self.broker.port,
                  exc, state.attempt_number, state.upcoming_sleep)

    def _connect_once(self, first: bool) -> None:
        self._connack = None
        try:
            if first:
                v5_args = {"clean_start": not self.persistent, "properties": self._connect_props} if self.v5 else {}
                self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive, **v5_args)
            else:
                self._client.reconnect()
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS handshake failed ({exc.reason or exc}); check broker.tls.ca_certs "
                                "and the broker certificate's host name") from None
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None:
            rc = self._client.loop(timeout=0.2)
            if self._connack is None and rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectFailed(f"connection closed before CONNACK ({mqtt.error_string(rc)})")
            if time.monotonic() > deadline:
                raise ConnectFailed(f"no CONNACK within {CONNACK_TIMEOUT_S:.0f} s")
        if self._connack.is_failure:
            raise ConnectFailed(f"broker refused the connection: {self._connack}")

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
        log.info("connected to %s:%s (session present: %s)", self.broker.host, self.broker.port,
                 flags.session_present)
        for subscribe_to, _, _ in self._subscriptions:
            client.subscribe(subscribe_to, qos=1)
        self.connected.set()
        for callback in self._on_connected:
            callback()
        with self._lock:
            queued, self._outbox = list(self._outbox), deque()
        for topic, data, retain in queued:
            self.publish(topic, data, retain=retain)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker rejected publish %d: %s", mid, reason_code)
        with self._lock:
            if mid in self._pending:
                callback = self._pending.pop(mid)
            else:
                self._acked_early.add(mid)
                callback = None
        if callback:
            callback()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        for _, match, handler in self._subscriptions:
            if mqtt.topic_matches_sub(match, message.topic):
                handler(message)
                return
        self.ack(message)
