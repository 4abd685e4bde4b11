"""The wire format: parse `Inference` requests and build Diagnosis, error and Sensors payloads."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from dataclasses import dataclass

from model.classifier import Diagnosis
from model.preprocess import ImageError

MAX_ID_CHARS = 256
MAX_NAME_CHARS = 1024
MAX_USER_PROPERTIES = 16


class RequestError(ImageError):
    """A request that cannot be served; carries what is known of its id and name for the reply."""

    def __init__(self, code: str, message: str, request_id: str | None = None, name: str | None = None) -> None:
        super().__init__(code, message)
        self.request_id = request_id
        self.name = name


@dataclass
class Request:
    """One classification request, decoded from either payload form."""

    id: str
    name: str | None
    image: bytes
    response_topic: str | None = None
    correlation: bytes | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()


def correlation_id(correlation: bytes) -> str:
    """A request id from MQTT 5 Correlation Data: its text, or hex when it is not UTF-8."""
    try:
        return correlation.decode("utf-8")
    except UnicodeDecodeError:
        return correlation.hex()


def reply_route(properties) -> tuple[str | None, bytes | None]:
    """The MQTT 5 Response Topic and Correlation Data of a message, when valid."""
    topic = getattr(properties, "ResponseTopic", None) if properties else None
    correlation = getattr(properties, "CorrelationData", None) if properties else None
    if topic and ("#" in topic or "+" in topic or len(topic) > 1024):
        topic = None  # answered on the default Diagnosis topic instead
    if correlation is not None and len(correlation) > MAX_ID_CHARS:
        correlation = None
    return topic, correlation


def parse_request(payload: bytes, properties, max_payload_bytes: int) -> Request:
    """A request from raw image bytes (with optional MQTT 5 properties) or a JSON envelope."""
    response_topic, correlation = reply_route(properties)
    request_id = correlation_id(correlation) if correlation is not None else None
    user = dict(getattr(properties, "UserProperty", None) or []) if properties else {}
    name = user.get("name")
    if len(payload) > max_payload_bytes:
        raise RequestError("payload_too_large", f"payload of {len(payload)} bytes exceeds {max_payload_bytes}",
                           request_id, _short(name))
    if properties and len(getattr(properties, "UserProperty", None) or []) > MAX_USER_PROPERTIES:
        raise RequestError("bad_request", f"more than {MAX_USER_PROPERTIES} user properties", request_id)
    if name is not None and len(name) > MAX_NAME_CHARS:
        raise RequestError("bad_request", f"user property name longer than {MAX_NAME_CHARS} characters", request_id)
    if payload[:1] == b"{" or payload.lstrip()[:1] == b"{":
        return _parse_envelope(payload, response_topic, correlation, request_id, name)
    if not payload:
        raise RequestError("empty_payload", "the payload is empty", request_id, name)
    request_id = request_id or hashlib.sha256(payload).hexdigest()[:16]
    return Request(request_id, name, payload, response_topic, correlation)


def _parse_envelope(payload: bytes, response_topic, correlation, request_id, name) -> Request:
    try:
        doc = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("bad_json", "the JSON envelope is not UTF-8", request_id, name) from None
    except json.JSONDecodeError as exc:
        raise RequestError("bad_json", f"the JSON envelope does not parse: {exc.msg} at {exc.pos}",
                           request_id, name) from None
    if not isinstance(doc, dict):
        raise RequestError("bad_request", "the JSON envelope must be an object", request_id, name)
    raw_id, name = doc.get("id", request_id), doc.get("name", name)
    if isinstance(raw_id, (int, float)) and not isinstance(raw_id, bool):
        raw_id = str(raw_id)
    if not isinstance(raw_id, str) or not raw_id or len(raw_id) > MAX_ID_CHARS:
        raise RequestError("bad_request", f"\"id\" must be a string of 1 to {MAX_ID_CHARS} characters",
                           None, _short(name))
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
        raise RequestError("bad_request", f"\"name\" must be a string of at most {MAX_NAME_CHARS} characters", raw_id)
    image = doc.get("image")
    if not isinstance(image, str) or not image:
        raise RequestError("bad_request", "\"image\" must be a non-empty base64 string", raw_id, name)
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("bad_base64", "\"image\" is not valid base64", raw_id, name) from None
    if not data:
        raise RequestError("empty_payload", "\"image\" decodes to no bytes", raw_id, name)
    return Request(raw_id, name, data, response_topic, correlation)


def _short(value):
    return value[:MAX_NAME_CHARS] if isinstance(value, str) else None


def now_iso() -> str:
    """UTC time stamp, ISO 8601 with milliseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def diagnosis_reply(request: Request, diagnosis: Diagnosis, model: dict, timing_ms: dict, device: str) -> bytes:
    """The Diagnosis JSON for one served request."""
    return json.dumps({
        "id": request.id, "name": request.name, "sha256": request.sha256,
        "diagnosis": diagnosis.label, "confidence": round(diagnosis.confidence, 6),
        "probabilities": diagnosis.probabilities, "model": model,
        "timing_ms": {k: round(v, 3) for k, v in timing_ms.items()},
        "device": device, "ts": now_iso(),
    }).encode()


def error_reply(code: str, message: str, request_id: str | None, name: str | None) -> bytes:
    """The error JSON for a request (or command) that cannot be served."""
    return json.dumps({"id": request_id, "name": name, "error": {"code": code, "message": message},
                       "ts": now_iso()}).encode()


def sensors_record(diagnosis: Diagnosis) -> bytes:
    """The record HIAS stores (and hashes on its blockchain) for each diagnosis."""
    return json.dumps({
        "Type": "GeniSysAI", "Sensor": "ALL Classifier", "Value": diagnosis.label,
        "Message": "Acute Lymphoblastic Leukemia detected!" if diagnosis.positive
        else "Acute Lymphoblastic Leukemia not detected!",
    }).encode()
