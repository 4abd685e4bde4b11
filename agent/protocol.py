"""The wire format: parse `Inference` requests and HIAS commands, build Diagnosis, error, Sensors
and ModelState payloads. Every parser here is total: bad input raises `RequestError`, nothing else."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass

from model.classifier import Diagnosis
from model.preprocess import ImageError

MAX_ID_CHARS = 256
MAX_NAME_CHARS = 1024
MAX_USER_PROPERTIES = 16
MAX_JSON_DEPTH = 32
MAX_JSON_TOKENS = 10_000  # brackets, quotes and backslashes: an envelope has a few dozen
MAX_COMMAND_BYTES = 64 * 1024
BOM = b"\xef\xbb\xbf"
_JSON_STRUCTURE = re.compile(rb'[\[\]{}"\\]')
_DATA_URI = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)
_WHITESPACE = re.compile(r"\s+")


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
    correlation: bytes | None = None
    explain: bool = False  # the requester wants a heat map of where the model looked

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()


@dataclass(frozen=True)
class Command:
    """A HIAS command: `{"From", "Type", "Value", "Message"}`."""

    type: str
    value: str | None
    sender: str | None
    to: str | None = None  # HIAS 3 names the device a command is for


def correlation_id(correlation: bytes) -> str:
    """A request id from MQTT 5 Correlation Data: its text, or hex when it is not UTF-8."""
    try:
        return correlation.decode("utf-8")
    except UnicodeDecodeError:
        return correlation.hex()


def reply_route(properties) -> tuple[str | None, bytes | None]:
    """The MQTT 5 Response Topic and Correlation Data a message asks for (unchecked topic)."""
    topic = getattr(properties, "ResponseTopic", None) if properties else None
    correlation = getattr(properties, "CorrelationData", None) if properties else None
    return topic or None, correlation


def parse_json(data: bytes, what: str) -> object:
    """JSON with a nesting and token bound, checked before the parser runs (no recursion to exhaust)."""
    depth = tokens = 0
    in_string = False
    escaped_at = -1
    for match in _JSON_STRUCTURE.finditer(data):
        tokens += 1
        if tokens > MAX_JSON_TOKENS:
            raise ValueError(f"{what} has more than {MAX_JSON_TOKENS} brackets and quotes")
        char, at = match.group(), match.start()
        if at == escaped_at:
            continue
        if char == b"\\":
            escaped_at = at + 1 if in_string else -1
        elif char == b'"':
            in_string = not in_string
        elif not in_string:
            depth += 1 if char in b"[{" else -1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} does not parse: {exc.msg} at {exc.pos}") from None


def parse_request(payload: bytes, properties, max_payload_bytes: int) -> Request:
    """A request from raw image bytes (with optional MQTT 5 properties) or a JSON envelope."""
    _, correlation = reply_route(properties)
    if correlation is not None and len(correlation) > MAX_ID_CHARS:
        raise RequestError("bad_request", f"Correlation Data longer than {MAX_ID_CHARS} bytes (it is the request id)")
    request_id = correlation_id(correlation) if correlation is not None else None
    user_properties = (getattr(properties, "UserProperty", None) or []) if properties else []
    name = dict(user_properties).get("name")
    if len(payload) > max_payload_bytes:
        raise RequestError("payload_too_large", f"payload of {len(payload)} bytes exceeds {max_payload_bytes}",
                           request_id, _short(name))
    if len(user_properties) > MAX_USER_PROPERTIES:
        raise RequestError("bad_request", f"more than {MAX_USER_PROPERTIES} user properties", request_id)
    if name is not None and len(name) > MAX_NAME_CHARS:
        raise RequestError("bad_request", f"user property name longer than {MAX_NAME_CHARS} characters", request_id)
    text = payload.removeprefix(BOM)
    if text.lstrip()[:1] in (b"{", b"["):
        return _parse_envelope(text, correlation, request_id, name, dict(user_properties).get("explain") == "1")
    if not payload:
        raise RequestError("empty_payload", "the payload is empty", request_id, name)
    request_id = request_id or hashlib.sha256(payload).hexdigest()[:16]
    return Request(request_id, name, payload, correlation, dict(user_properties).get("explain") == "1")


def _parse_envelope(payload: bytes, correlation, request_id, name, explain: bool) -> Request:
    try:
        doc = parse_json(payload, "the JSON envelope")
    except ValueError as exc:
        raise RequestError("bad_json", str(exc), request_id, name) from None
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
    image = _WHITESPACE.sub("", _DATA_URI.sub("", image, count=1) if image.startswith("data:") else image)
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("bad_base64", "\"image\" is not valid base64", raw_id, name) from None
    if not data:
        raise RequestError("empty_payload", "\"image\" decodes to no bytes", raw_id, name)
    wants = doc.get("explain", explain)
    if not isinstance(wants, bool):
        raise RequestError("bad_request", "\"explain\" must be true or false", raw_id, name)
    return Request(raw_id, name, data, correlation, wants)


def parse_command(payload: bytes) -> Command:
    """A HIAS command; `ValueError` says what is wrong with it."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise ValueError(f"a command is at most {MAX_COMMAND_BYTES} bytes")
    doc = parse_json(payload.removeprefix(BOM), "the command")
    if not isinstance(doc, dict):
        raise ValueError("a command must be a JSON object")
    kind, value, sender, to = doc.get("Type"), doc.get("Value"), doc.get("From"), doc.get("To")
    if not isinstance(kind, str):
        raise ValueError("\"Type\" must be a string")
    if value is not None and not isinstance(value, str):
        raise ValueError("\"Value\" must be a string when given")
    if to is not None and not isinstance(to, str):
        raise ValueError("\"To\" must be a string when given")
    return Command(kind[:64], value or None, sender[:MAX_NAME_CHARS] if isinstance(sender, str) else None, to)


def _short(value):
    return value[:MAX_NAME_CHARS] if isinstance(value, str) else None


def now_iso() -> str:
    """UTC time stamp, ISO 8601 with milliseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def diagnosis_reply(request: Request, diagnosis: Diagnosis, model: dict, timing_ms: dict, device: str,
                    explanation: dict | None = None) -> bytes:
    """The Diagnosis JSON for one served request: Positive/Negative with the calibrated confidence, or
    Indeterminate with its reason; the explanation when the request asked for one."""
    reply = {
        "id": request.id, "name": request.name, "sha256": request.sha256,
        "diagnosis": diagnosis.label, "reason": diagnosis.reason,
        "confidence": None if diagnosis.confidence is None else round(diagnosis.confidence, 6),
        "probabilities": diagnosis.probabilities, "model": model,
        "timing_ms": {k: round(v, 3) for k, v in timing_ms.items()},
        "device": device, "ts": now_iso(),
    }
    if explanation:
        reply["explanation"] = explanation
    return json.dumps(reply).encode()


def error_reply(code: str, message: str, request_id: str | None, name: str | None, device: str,
                payload_sha256: str) -> bytes:
    """The error JSON for a request (or command) that cannot be served; `payload_sha256` names the bytes
    refused, so a client can tell its own errors from ones about another requester's payload."""
    return json.dumps({"id": request_id, "name": name, "error": {"code": code, "message": message},
                       "payload_sha256": payload_sha256, "device": device, "ts": now_iso()}).encode()


SENSORS_MESSAGES = {"Positive": "Acute Lymphoblastic Leukemia detected!",
                    "Negative": "No Acute Lymphoblastic Leukemia detected"}
MAX_REASON_CHARS = 26  # "Refused: " + reason keeps the Indeterminate record's hashed part within 72 bytes


def sensors_record(diagnosis: Diagnosis, request_id: str) -> bytes:
    """The record HIAS stores for each diagnosis. HIAS bcrypt-hashes Sensor + Type + Value + Message,
    and bcrypt reads at most 72 bytes, so those four stay within 72; `id` and `ts` are ignored by HIAS."""
    return json.dumps({
        "Type": "GeniSysAI", "Sensor": "ALL Classifier", "Value": diagnosis.label,
        "Message": SENSORS_MESSAGES.get(diagnosis.label) or f"Refused: {diagnosis.reason}"[:9 + MAX_REASON_CHARS],
        "id": request_id, "ts": now_iso(),
    }).encode()


def model_state(state: str, model: dict | None, reason: str | None = None, serving: dict | None = None) -> bytes:
    """A retained `ModelState` record: what happened to which model, and what is serving now."""
    return json.dumps({"state": state, **(model or {}), "reason": reason, "serving": serving, "ts": now_iso()}).encode()
