"""Requests -> replies: decode on a worker pool, micro-batch, classify, reply, then acknowledge.

An inbound request is acknowledged only after its reply (diagnosis or error) has been
acknowledged by the broker, so a request in flight when the agent dies is redelivered. Every
handler is total: whatever goes wrong with one message is answered with an error code and that
message is acknowledged, so no message can stop the agent or come back to do it again.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from agent import protocol
from agent.config import MODEL_NAME, Config
from agent.metrics import Metrics
from agent.models import ModelStore
from agent.session import Inbound, MqttSession, publish_properties
from agent.topics import Topics
from model.classifier import Classifier, Diagnosis, ModelError
from model.explain import explain
from model.preprocess import ImageError, ImageLimits, decode, jpeg_quality

log = logging.getLogger("allds.service")
FAILED_BATCHES_ROLLBACK = 3


@dataclass
class Job:
    """A request on its way through the pipeline."""

    message: Inbound
    received: float
    request: protocol.Request | None = None
    tensor: np.ndarray | None = None
    shown_size: tuple[int, int] = (0, 0)  # (width, height) of the image as decoded, for an explanation
    payload_sha256: str = ""  # named by an error reply (hashed on a decoder, not on the network thread)
    decode_ms: float = 0.0
    jpeg_quality: int | None = None  # the gate refuses heavily compressed JPEGs, which the tensor cannot show
    respond: Callable[[dict], None] | None = None  # a local (HTTP) request: the answer goes here, not to MQTT


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

    def __init__(self, config: Config, session: MqttSession, classifier: Classifier, store: ModelStore, topics: Topics,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.session = session
        self.classifier = classifier
        self.store = store
        self.topics = topics
        self.counters = Counters()
        self.on_life_command: Callable[[], None] = lambda: None
        inf = config.inference
        self._limits = ImageLimits(inf.max_pixels, inf.min_side_px, inf.max_aspect_ratio)
        self._decoder = ThreadPoolExecutor(inf.decode_workers, thread_name_prefix="decode")
        self._models = ThreadPoolExecutor(1, thread_name_prefix="models")  # model changes, one at a time
        self._model_jobs = 0
        self._failed_batches = 0
        self._ready: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._open = 0  # accepted and not yet acknowledged
        self._held = 0  # their payload bytes
        self._held_limit = inf.max_inflight * inf.max_payload_bytes
        self._decoding = 0
        self._inferring_since: float | None = None
        self._last_beat = time.monotonic()
        self._accepting = threading.Event()
        self._accepting.set()
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._inference_loop, name="inference", daemon=True)

    def start(self) -> None:
        """Register the subscriptions and start the inference thread (before the session starts)."""
        self.session.subscribe(self.topics.request, self._on_request, self.config.inference.shared_group)
        for topic in (self.topics.commands, *self.topics.extra_commands):
            self.session.subscribe(topic, self._on_command)
        if self.config.model.trusted_keys:
            for topic in (f"{self.topics.base}/Model", self.config.model.fleet_topic):
                if topic:
                    self.session.subscribe(topic, self._on_bundle)
        self.session.on_connected(lambda resumed: None if resumed else self.publish_model_state())
        self._worker.start()

    @property
    def open_requests(self) -> int:
        with self._lock:
            return self._open

    @property
    def model(self) -> dict:
        """Name, version and sha256 of the serving model."""
        clf = self.classifier
        return {"name": clf.name, "version": clf.version, "sha256": clf.sha256}

    def problems(self, stall_s: float) -> list[str]:
        """Why serving is unhealthy (for the watchdog): a dead inference thread or one inference taking too long."""
        now = time.monotonic()
        if not self._worker.is_alive():
            return ["the inference thread has ended"]
        since = self._inferring_since
        if since is not None and now - since > stall_s:
            return [f"one inference has run for {now - since:.0f} s"]
        if since is None and now - self._last_beat > stall_s:
            return [f"the inference thread has not looped for {now - self._last_beat:.0f} s"]
        return []

    def drain(self, timeout: float) -> bool:
        """Stop taking requests (unacknowledged ones are redelivered later) and finish those taken."""
        self._accepting.clear()
        deadline = time.monotonic() + timeout
        while self.open_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopped.set()
        self._worker.join(max(0.0, deadline - time.monotonic()))
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._models.shutdown(wait=False, cancel_futures=True)
        return self.open_requests == 0

    # ---- models ------------------------------------------------------------------------
    def publish_model_state(self, state: str = "active", model: dict | None = None, reason: str | None = None) -> None:
        """The retained `ModelState` record (on every connect, and on every step of every model change)."""
        model = model or self.model
        self.session.publish(self.topics.model_state, protocol.model_state(state, model, reason, self.model), retain=True)
        if self.config.hias.dialect == "hias3":
            self._classification({"State": state}, f"{model.get('name')} {model.get('version')} {state}"
                                                   + (f": {reason}" if reason else ""))

    def _classification(self, fields: dict, message: str) -> None:
        """HIAS 3's `Classification` record: `Model` as HIAS names it, a `State` or a `Type` + `Value`, `Message`."""
        record = {"Model": self.config.hias.model_name or self.classifier.name, **fields, "Message": message[:200]}
        self.session.publish(self.topics.classification, json.dumps(record))

    def submit_local(self, image: bytes, name: str | None, respond: Callable[[dict], None]) -> bool:
        """Serve an image that came another way than MQTT (HIAS's Diagnosis page over HTTP) through the
        same pipeline; `respond` gets the answer JSON. False when the agent is stopping."""
        if not self._accepting.is_set():
            return False
        properties = publish_properties(user=[("name", name)]) if name else None
        job = Job(Inbound("http", image, properties, 0, 0, False, 0), time.perf_counter(), respond=respond)
        with self._lock:
            self._open += 1
            self._decoding += 1
            self._held += len(image)
        try:
            self._decoder.submit(self._decode, job)
        except RuntimeError:
            with self._lock:
                self._open -= 1
                self._decoding -= 1
                self._held -= len(image)
            return False
        return True

    def _serve(self, name: str, state: str, origin: str, new: Classifier | None = None,
               bundle: str | None = None) -> Classifier:
        """Serve model `name` of `model.dir` (verified here unless `new` is its verified classifier) from the
        next batch on; `ModelError` leaves the serving model in place."""
        new = new or self.store.load(name)
        old = self.classifier
        self.classifier = new
        self.store.activate(name)
        self._failed_batches = 0
        log.info("model %s: %s %s (%s) sha256 %s, was %s %s; %s", state, new.name, new.version, name, new.sha256[:12],
                 old.name, old.sha256[:12], origin)
        self.publish_model_state(state, {**self.model, "bundle": bundle} if bundle else None)
        return new

    def _model_failing(self, whole_batch_failed: bool) -> None:
        """A model that fails whole batches again and again is replaced by the one that served before it."""
        self._failed_batches = self._failed_batches + 1 if whole_batch_failed else 0
        if self._failed_batches == FAILED_BATCHES_ROLLBACK and self.store.served.previous:
            log.error("the serving model failed %d batches in a row; rolling back to %s", self._failed_batches,
                      self.store.served.previous)
            self._submit_model_job(self._serve, self.store.served.previous, "rolled_back",
                                   f"{self._failed_batches} failed batches in a row")

    def _submit_model_job(self, job, *args) -> bool:
        """Queue a model change; False when one is already queued or running (commands are refused then)."""
        with self._lock:
            if self._model_jobs:
                return False
            self._model_jobs += 1

        def run() -> None:
            try:
                job(*args)
            except Exception:  # noqa: BLE001 - a model change must never stop the agent
                log.exception("model change failed")
            finally:
                with self._lock:
                    self._model_jobs -= 1

        self._models.submit(run)
        return True

    # ---- requests ----------------------------------------------------------------------
    def _on_request(self, message: Inbound) -> None:
        """Network thread: hand the message to the decoders, nothing more."""
        if not self._accepting.is_set():
            return  # not acknowledged: the broker redelivers it to the next session
        self.counters.add("requests")
        job = Job(message, time.perf_counter())
        with self._lock:
            busy = self._open and self._held + len(message.payload) > self._held_limit
            if not busy:
                self._open += 1
                self._decoding += 1
                self._held += len(message.payload)
        if busy:  # the broker let more through than we can hold: answered and acknowledged, never dropped
            unheld = dataclasses.replace(message, payload=b"")  # the payload is not kept while the answer goes out
            self._send_error(unheld, "busy", f"the agent holds {self._held_limit} bytes of requests already; "
                             "send it again later", None, dict(getattr(message.properties, "UserProperty", None) or
                                                               []).get("name"), on_acked=lambda _: self.session.ack(unheld),
                             payload_sha256=hashlib.sha256(message.payload).hexdigest())
            if self.metrics:
                self.metrics.answered("busy", time.perf_counter() - job.received)
            return
        try:
            self._decoder.submit(self._decode, job)
        except RuntimeError:  # the pool shut down under us: leave it for redelivery
            with self._lock:
                self._open -= 1
                self._decoding -= 1
                self._held -= len(message.payload)

    def _decode(self, job: Job) -> None:
        start = time.perf_counter()
        job.payload_sha256 = hashlib.sha256(job.message.payload).hexdigest()
        try:
            job.request = protocol.parse_request(job.message.payload, job.message.properties,
                                                 self.config.inference.max_payload_bytes)
            if job.message.retain:  # kept by the broker: it would come again, and be diagnosed again, on every connect
                raise protocol.RequestError("retained_request", "retained requests are not answered (clear it: "
                                            f"mosquitto_pub -r -n -t {job.message.topic})")
            requested, _ = protocol.reply_route(job.message.properties)
            if requested is not None and not self.topics.reply_allowed(requested):
                raise protocol.RequestError("bad_response_topic", "the Response Topic must lie under one of "
                                            f"{', '.join(self.topics.reply_filters)} and name no device channel")
            decoded = decode(job.request.image, self.classifier.input_size, self._limits)
            job.tensor, job.shown_size = decoded.tensor, decoded.shown_size
            job.jpeg_quality = jpeg_quality(job.request.image)
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
            self._last_beat = time.monotonic()
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._classify(batch)
                self._failed_batches = 0
            except Exception:  # noqa: BLE001 - one poisoned image must not fail the others of its batch
                log.exception("inference failed for a batch of %d; classifying each alone", len(batch))
                failed = 0
                for job in batch:
                    try:
                        self._classify([job])
                    except Exception as exc:  # noqa: BLE001 - answer it, keep serving
                        failed += 1
                        self._reply_error(job, "internal_error", f"{type(exc).__name__}: {exc}")
                self._model_failing(failed == len(batch))
            finally:
                self._inferring_since = None

    def _classify(self, batch: list[Job]) -> None:
        clf = self.classifier
        for job in batch:  # a reload may have changed the input size since decoding
            if job.tensor.shape[0] != clf.input_size:
                job.tensor = decode(job.request.image, clf.input_size, self._limits).tensor
        start = time.perf_counter()
        self._inferring_since = time.monotonic()
        diagnoses = clf.assess(np.stack([job.tensor for job in batch]), [job.jpeg_quality for job in batch])
        self._inferring_since = None
        inference_ms = (time.perf_counter() - start) * 1000
        if self.metrics:
            self.metrics.batch(len(batch), inference_ms / 1000)
        model = {"name": clf.name, "version": clf.version, "sha256": clf.sha256}
        for job, diagnosis in zip(batch, diagnoses, strict=True):
            self._reply(job, diagnosis, model, inference_ms, len(batch))

    def _explain(self, job: Job) -> dict:
        """The heat map a request asked for, at the image's size (scaled to fit `explain_max_side`)."""
        width, height = job.shown_size
        scale = min(1.0, self.config.inference.explain_max_side / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        self._inferring_since = time.monotonic()
        try:
            explanation = explain(self.classifier, job.tensor, size)
        finally:
            self._inferring_since = None
        return {"method": explanation.method, "png": base64.b64encode(explanation.png).decode(), "size": list(size),
                "ms": round(explanation.ms, 3)}

    def _reply(self, job: Job, diagnosis: Diagnosis, model: dict, inference_ms: float, batch_size: int) -> None:
        req = job.request
        # a gate refusal is not read by the network: no heat map of it (and no tenfold work for a hostile request)
        explanation = self._explain(job) if req.explain and diagnosis.reason in (None, "borderline") else None
        total_ms = (time.perf_counter() - job.received) * 1000
        body = protocol.diagnosis_reply(req, diagnosis, model,
                                        {"decode": job.decode_ms, "inference": inference_ms, "total": total_ms},
                                        self.config.hias.name, explanation)
        if job.respond:
            job.respond(json.loads(body))
            self._finish(job)
        else:
            topic = protocol.reply_route(job.message.properties)[0] or self.topics.diagnosis
            self.session.publish(topic, body, properties=publish_properties(correlation=req.correlation),
                                 on_acked=lambda refusal: self._replied(job, topic, refusal))
        self.session.publish(self.topics.sensors, protocol.sensors_record(diagnosis, req.id))
        if self.config.hias.dialect == "hias3":
            self._classification({"Type": "Diagnosis", "Value": diagnosis.label},  # the label first: the name is the requester's
                                 f"{diagnosis.label}: {req.name or req.id}")
        self.counters.add("diagnoses")
        if self.metrics:
            self.metrics.answered(diagnosis.label, total_ms / 1000, job.decode_ms / 1000)
        log.info("request id=%s name=%s diagnosis=%s reason=%s confidence=%s batch=%d decode_ms=%.1f inference_ms=%.1f "
                 "total_ms=%.1f", req.id, req.name, diagnosis.label, diagnosis.reason,
                 "-" if diagnosis.confidence is None else f"{diagnosis.confidence:.4f}", batch_size, job.decode_ms,
                 inference_ms, total_ms)

    def _replied(self, job: Job, topic: str, refusal: str | None) -> None:
        """A reply's PUBACK: acknowledge the request, or first say on the default topic that the reply was refused."""
        if refusal is None or topic == self.topics.diagnosis:
            self._finish(job)
            return
        self._reply_error(job, "reply_rejected", f"the broker refused the answer on {topic}: {refusal}",
                          to_default=True)

    def _reply_error(self, job: Job, code: str, message: str, request_id: str | None = None,
                     name: str | None = None, to_default: bool = False) -> None:
        if job.request:
            request_id, name = job.request.id, job.request.name
        if self.metrics:
            self.metrics.answered(code, time.perf_counter() - job.received)
        if job.respond:
            job.respond(json.loads(protocol.error_reply(code, message, request_id, name, self.config.hias.name,
                                                        job.payload_sha256)))
            self.counters.add("errors")
            self._finish(job)
            return
        self._send_error(job.message, code, message, request_id, name, on_acked=lambda _: self._finish(job),
                         to_default=to_default or code == "bad_response_topic", payload_sha256=job.payload_sha256)

    def _send_error(self, message: Inbound, code: str, text: str, request_id, name, on_acked,
                    to_default: bool = False, payload_sha256: str | None = None) -> None:
        """The error reply on the request's reply topic; `payload_sha256` defaults to the message payload's (a
        command's, or a `busy` request's: hashed here, on the network thread, at about 1 ms a MB)."""
        payload_sha256 = payload_sha256 or hashlib.sha256(message.payload).hexdigest()
        requested, correlation = protocol.reply_route(message.properties)
        topic = requested if requested and not to_default and self.topics.reply_allowed(requested) \
            else self.topics.diagnosis
        if request_id is None and correlation is not None and len(correlation) <= protocol.MAX_ID_CHARS:
            request_id = protocol.correlation_id(correlation)
        self.session.publish(topic, protocol.error_reply(code, text, request_id, name, self.config.hias.name,
                                                         payload_sha256),
                             properties=publish_properties(correlation=correlation), on_acked=on_acked)
        self.counters.add("errors")
        log.warning("error id=%s name=%s code=%s message=%s", request_id, name, code, text)

    def _finish(self, job: Job) -> None:
        self.session.ack(job.message)
        with self._lock:
            self._open -= 1
            self._held -= len(job.message.payload)

    # ---- commands ----------------------------------------------------------------------
    def _on_command(self, message: Inbound) -> None:
        """Network thread: commands are rare; model changes (Reload, Rollback) run on the one model thread."""
        self.counters.add("commands")
        try:
            command = protocol.parse_command(message.payload)
        except ValueError as exc:
            self._command_error(message, f"malformed command: {exc}")
            return
        log.info("command Type=%s Value=%s From=%s retained=%s", command.type, command.value, command.sender,
                 message.retain)
        if message.retain:
            self._command_error(message, "retained commands are not executed (clear it: mosquitto_pub -r -n -t "
                                         f"{message.topic})")
        elif command.to is not None and command.to != self.config.hias.device:
            self._command_error(message, f"the command is addressed To {command.to[:80]!r}, not to this device")
        elif command.type == "Life":
            self.on_life_command()
            self.session.ack(message)
        elif command.type in ("Reload", "Rollback"):
            if not self._submit_model_job(self._reload_command, message, command):
                self._command_error(message, "a model change is already running")
        else:
            self._command_error(message, f"unknown command Type {command.type!r} (supported: Life, Reload, Rollback)")

    def _reload_command(self, message: Inbound, command: protocol.Command) -> None:
        name = command.value or self.config.model.name
        shown = repr(name) if MODEL_NAME.fullmatch(name) else "the requested model"
        try:
            if command.type == "Rollback":
                name = shown = self.store.rollback_target()
                self._serve(name, "rolled_back", f"Rollback from {command.sender}")
            else:
                self._serve(name, "active", f"Reload from {command.sender}")
        except (OSError, ModelError) as exc:
            log.error("model change refused: %s (From=%s); still serving %s %s", exc, command.sender,
                      self.classifier.name, self.classifier.sha256[:12])
            if MODEL_NAME.fullmatch(name) and "unknown model" not in str(exc):
                self.publish_model_state("failed", {"name": name, "version": None, "sha256": None}, str(exc))
            self._command_error(message, f"{command.type.lower()} to {shown} failed, still serving "
                                         f"{self.classifier.name}: {exc}")
        else:
            self.session.ack(message)

    def _on_bundle(self, message: Inbound) -> None:
        """Network thread: a signed model bundle; checked and installed on the model thread."""
        if not message.payload:  # a retained bundle being cleared
            self.session.ack(message)
            return
        with self._lock:
            self._model_jobs += 1  # bundles queue behind each other; commands wait for them

        def run() -> None:
            try:
                self._deliver(message)
            except Exception:  # noqa: BLE001 - a bundle must never stop the agent
                log.exception("model delivery failed")
            finally:
                self.session.ack(message)
                with self._lock:
                    self._model_jobs -= 1

        self._models.submit(run)

    def _deliver(self, message: Inbound) -> None:
        """received -> verified -> active, each step published retained; any failure: `failed` with the
        reason, and the serving model stays."""
        digest = hashlib.sha256(message.payload).hexdigest()
        if self.store.seen(digest):
            log.info("bundle %s on %s went active before; not installed again", digest[:12], message.topic)
            if not message.retain:  # a live delivery is answered; a retained copy comes again on every connect
                self._answer_known_bundle(digest)
            return
        model = {"name": None, "version": None, "sha256": None, "bundle": digest}
        log.info("bundle %s received on %s (%d bytes)", digest[:12], message.topic, len(message.payload))
        self.publish_model_state("received", model)
        try:
            bundle = self.store.verify(message.payload)
            model.update(name=bundle.name, version=bundle.version,
                         sha256=bundle.card["artifacts"][self.config.model.variant]["sha256"])
            self.publish_model_state("verified", model)
            name, candidate, worst = self.store.install(bundle)
        except (OSError, ValueError) as exc:  # BundleError and ModelError are ValueErrors
            log.error("bundle %s refused: %s; still serving %s %s", digest[:12], exc, self.classifier.name,
                      self.classifier.sha256[:12])
            self.publish_model_state("failed", model, str(exc))
            return
        log.info("bundle %s: %s %s verified (key %s), canary within %.4f", digest[:12], bundle.name, bundle.version,
                 bundle.key.name, worst)
        self.store.remember(bundle)
        self._serve(name, "active", f"bundle {digest[:12]} signed by {bundle.key}", candidate, digest)

    def _answer_known_bundle(self, digest: str) -> None:
        """`ModelState` for a bundle that went active here before: `active` while it serves, else `failed`."""
        if self.store.served.active.endswith(f"-{digest[:12]}"):
            self.publish_model_state("active", {**self.model, "bundle": digest}, "delivered again: already serving")
        else:
            self.publish_model_state("failed", {"name": None, "version": None, "sha256": None, "bundle": digest},
                                     "went active here before and was replaced since: Reload its folder to serve it")

    def _command_error(self, message: Inbound, text: str) -> None:
        self._send_error(message, "bad_command", text, None, None, on_acked=lambda _: self.session.ack(message))
