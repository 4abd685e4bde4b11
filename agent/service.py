"""Requests -> replies: decode on a worker pool, micro-batch, classify, reply, then acknowledge.

An inbound request is acknowledged only after its reply (diagnosis or error) has been
acknowledged by the broker, so a request in flight when the agent dies is redelivered.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as mqtt

from agent import protocol
from agent.config import Config
from agent.session import MqttSession, publish_properties
from agent.topics import Topics
from model.classifier import Classifier
from model.preprocess import ImageError, ImageLimits, preprocess

log = logging.getLogger("allds.service")


@dataclass
class Job:
    """A request on its way through the pipeline."""

    message: mqtt.MQTTMessage
    received: float
    request: protocol.Request | None = None
    tensor: np.ndarray | None = None
    decode_ms: float = 0.0


@dataclass
class Counters:
    """What the agent has done since it started (reported in Life)."""

    requests: int = 0
    diagnoses: int = 0
    errors: int = 0
    commands: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class ClassificationService:
    """Serves `Inference` requests and HIAS `Commands` for one device."""

    def __init__(self, config: Config, session: MqttSession, classifier: Classifier, topics: Topics) -> None:
        self.config = config
        self.session = session
        self.classifier = classifier
        self.topics = topics
        self.counters = Counters()
        self.on_life_command = lambda: None
        inf = config.inference
        self._limits = ImageLimits(inf.max_pixels, inf.min_side_px, inf.max_aspect_ratio)
        self._decoder = ThreadPoolExecutor(inf.decode_workers, thread_name_prefix="decode")
        self._ready: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._open = 0  # accepted and not yet acknowledged
        self._decoding = 0
        self._accepting = threading.Event()
        self._accepting.set()
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._inference_loop, name="inference", daemon=True)

    def start(self) -> None:
        """Register the subscriptions and start the inference thread (before the session starts)."""
        self.session.subscribe(self.topics.request, self._on_request, self.config.inference.shared_group)
        self.session.subscribe(self.topics.commands, self._on_command)
        self._worker.start()

    @property
    def open_requests(self) -> int:
        with self._lock:
            return self._open

    def healthy(self) -> bool:
        """The inference thread is alive (for the systemd watchdog)."""
        return self._worker.is_alive()

    def drain(self, timeout: float) -> bool:
        """Stop taking requests (unacknowledged ones are redelivered later) and finish those taken."""
        self._accepting.clear()
        deadline = time.monotonic() + timeout
        while self.open_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopped.set()
        self._worker.join(max(0.0, deadline - time.monotonic()))
        self._decoder.shutdown(wait=False, cancel_futures=True)
        return self.open_requests == 0

    def reload(self, path: str | None = None) -> Classifier:
        """Load a model file (default: the configured one) and serve it from the next batch on."""
        new = Classifier.load(path or self.config.model_path, self.config.model.threads)
        self.classifier = new
        log.info("model reloaded: %s %s (%s) sha256 %s", new.name, new.version, new.path, new.sha256[:12])
        return new

    # ---- requests ----------------------------------------------------------------------
    def _on_request(self, message: mqtt.MQTTMessage) -> None:
        """Network thread: hand the message to the decoders, nothing more."""
        if not self._accepting.is_set():
            return  # not acknowledged: the broker redelivers it to the next session
        self.counters.add("requests")
        with self._lock:
            self._open += 1
            self._decoding += 1
        self._decoder.submit(self._decode, Job(message, time.perf_counter()))

    def _decode(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            job.request = protocol.parse_request(job.message.payload, job.message.properties,
                                                 self.config.inference.max_payload_bytes)
            job.tensor = preprocess(job.request.image, self.classifier.input_size, self._limits)
            job.decode_ms = (time.perf_counter() - start) * 1000
            self._ready.put(job)
        except protocol.RequestError as exc:
            self._reply_error(job, exc.code, exc.message, exc.request_id, exc.name)
        except ImageError as exc:
            self._reply_error(job, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
            log.exception("unexpected error decoding a request")
            self._reply_error(job, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._decoding -= 1

    def _next_batch(self) -> list[Job]:
        """Up to `max_batch` ready jobs; waits at most `batch_wait_ms` and only while others decode."""
        try:
            batch = [self._ready.get(timeout=0.2)]
        except queue.Empty:
            return []
        inf = self.config.inference
        deadline = time.perf_counter() + inf.batch_wait_ms / 1000
        while len(batch) < inf.max_batch:
            try:
                batch.append(self._ready.get_nowait())
                continue
            except queue.Empty:
                pass
            with self._lock:
                decoding = self._decoding
            remaining = deadline - time.perf_counter()
            if not decoding or remaining <= 0:
                break
            try:
                batch.append(self._ready.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _inference_loop(self) -> None:
        while not (self._stopped.is_set() and self._ready.empty()):
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._classify(batch)
            except Exception as exc:  # noqa: BLE001 - answer each, log, keep serving
                log.exception("inference failed for a batch of %d", len(batch))
                for job in batch:
                    self._reply_error(job, "internal_error", f"{type(exc).__name__}: {exc}")

    def _classify(self, batch: list[Job]) -> None:
        clf = self.classifier
        for job in batch:  # a reload may have changed the input size since decoding
            if job.tensor.shape[0] != clf.input_size:
                job.tensor = preprocess(job.request.image, clf.input_size, self._limits)
        start = time.perf_counter()
        probabilities = clf.classify(np.stack([job.tensor for job in batch]))
        inference_ms = (time.perf_counter() - start) * 1000
        model = {"name": clf.name, "version": clf.version, "sha256": clf.sha256}
        for job, diagnosis in zip(batch, clf.diagnose(probabilities), strict=True):
            self._reply(job, diagnosis, model, inference_ms, len(batch))

    def _reply(self, job: Job, diagnosis, model: dict, inference_ms: float, batch_size: int) -> None:
        req = job.request
        total_ms = (time.perf_counter() - job.received) * 1000
        body = protocol.diagnosis_reply(req, diagnosis, model,
                                        {"decode": job.decode_ms, "inference": inference_ms, "total": total_ms},
                                        self.config.hias.name)
        self.session.publish(req.response_topic or self.topics.diagnosis, body,
                             properties=publish_properties(correlation=req.correlation),
                             on_acked=lambda: self._finish(job))
        self.session.publish(self.topics.sensors, protocol.sensors_record(diagnosis))
        self.counters.add("diagnoses")
        log.info("request id=%s name=%s diagnosis=%s confidence=%.4f batch=%d decode_ms=%.1f inference_ms=%.1f "
                 "total_ms=%.1f", req.id, req.name, diagnosis.label, diagnosis.confidence, batch_size, job.decode_ms,
                 inference_ms, total_ms)

    def _reply_error(self, job: Job, code: str, message: str, request_id: str | None = None,
                     name: str | None = None) -> None:
        if job.request:
            request_id, name = job.request.id, job.request.name
        self._send_error(job.message, code, message, request_id, name, on_acked=lambda: self._finish(job))

    def _send_error(self, message: mqtt.MQTTMessage, code: str, text: str, request_id, name, on_acked) -> None:
        topic, correlation = protocol.reply_route(message.properties)
        if request_id is None and correlation is not None:
            request_id = protocol.correlation_id(correlation)
        self.session.publish(topic or self.topics.diagnosis, protocol.error_reply(code, text, request_id, name),
                             properties=publish_properties(correlation=correlation), on_acked=on_acked)
        self.counters.add("errors")
        log.warning("error id=%s name=%s code=%s message=%s", request_id, name, code, text)

    def _finish(self, job: Job) -> None:
        self.session.ack(job.message)
        with self._lock:
            self._open -= 1

    # ---- commands ----------------------------------------------------------------------
    def _on_command(self, message: mqtt.MQTTMessage) -> None:
        """Network thread: commands are rare; the slow one (Reload) runs on its own thread."""
        self.counters.add("commands")
        try:
            command = json.loads(message.payload.decode("utf-8"))
            if not isinstance(command, dict):
                raise ValueError("a command must be a JSON object")
            kind, value = command.get("Type"), command.get("Value")
            if not isinstance(kind, str):
                raise ValueError("\"Type\" must be a string")
            if value is not None and not isinstance(value, str):
                raise ValueError("\"Value\" must be a string when given")
        except (UnicodeDecodeError, ValueError) as exc:
            self._command_error(message, f"malformed command: {exc}")
            return
        log.info("command Type=%s Value=%s From=%s", kind, value, command.get("From"))
        if kind == "Life":
            self.on_life_command()
            self.session.ack(message)
        elif kind == "Reload":
            threading.Thread(target=self._reload_command, args=(message, value), daemon=True).start()
        else:
            self._command_error(message, f"unknown command Type {kind!r} (supported: Life, Reload)")

    def _reload_command(self, message: mqtt.MQTTMessage, path: str | None) -> None:
        try:
            self.reload(path)
            self.session.ack(message)
        except Exception as exc:  # noqa: BLE001 - a bad model file must not stop the agent
            self._command_error(message, f"reload failed, still serving the previous model: {exc}")

    def _command_error(self, message: mqtt.MQTTMessage, text: str) -> None:
        self._send_error(message, "bad_command", text, None, None, on_acked=lambda: self.session.ack(message))
