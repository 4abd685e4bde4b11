"""The one configuration schema: dataclasses with a doc per key. Loading validates against it and
the config reference (`docs/config.md`) is generated from it, so neither can drift.

`python -m agent.config --reference` prints the reference.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A config problem, reported as one line naming the key."""


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")  # a folder of model.dir, e.g. cellnet@2026-12-01-1a2b3c4d5e6f
TOPIC_LEVEL = re.compile(r"[^/#+$\x00][^/#+\x00]*")  # one topic level: no separator, wildcard, `$` start or NUL
MAX_MQTT_PACKET = 268_435_455


def key(default, doc: str, choices: tuple | None = None, minimum: float | None = None, maximum: float | None = None,
        pattern: re.Pattern | None = None, pattern_doc: str | None = None):
    """A schema field: default, meaning, and optional allowed values, bounds or pattern."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum, "pattern": pattern,
            "pattern_doc": pattern_doc}
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def topic_id(default: str, doc: str):
    """An id used as one MQTT topic level (HIAS ids, client ids)."""
    return key(default, doc, pattern=TOPIC_LEVEL, pattern_doc="one topic level: no `/`, `#`, `+`, leading `$` or NUL")


@dataclass
class Hias:
    """The device as HIAS registered it; topics are `{location}/{topic_root}/{zone}/{device}/...`."""

    location: str = topic_id("allds-location", "HIAS location id (first topic level).")
    zone: str = topic_id("allds-zone", "HIAS zone id.")
    device: str = topic_id("allds-device", "HIAS device id.")
    name: str = topic_id("allds-agent", "Device name; the default MQTT client id (unique per agent).")
    topic_root: str = key("Devices", "`Devices` for HIAS 1.x/2.x, `Agents` for HIAS 3 (its AI agents are entities "
                                     "of type `Agent`).", choices=("Devices", "Agents"))
    dialect: str = key("hias2", "`hias2`: today's topics and payloads. `hias3`: also a `Classification` record per "
                                "diagnosis and per model change (as HIAS 3's IoT agent parses it), commands also "
                                "taken from `{location}/Devices/{zone}/{device}/Commands` (where HIAS 3 forwards "
                                "them), and a number for an unknown `Temperature` in Life (HIAS 3 fails on null).",
                       choices=("hias2", "hias3"))
    model_name: str | None = key(None, "HIAS 3: the model's name in HIAS (`Model` of each Classification record; it "
                                       "must match HIAS's model exactly); default: the serving model's name.")


@dataclass
class Tls:
    """TLS toward the broker (HIAS brokers listen on 8883)."""

    enabled: bool = key(False, "Connect with TLS 1.2 or newer.")
    ca_certs: str = key("system", "CA bundle that signs the broker certificate; `system` = the OS bundle.")
    certfile: str | None = key(None, "Client certificate (PEM) for certificate authentication.")
    keyfile: str | None = key(None, "Private key of the client certificate.")


@dataclass
class Broker:
    """The MQTT broker connection."""

    host: str = key("127.0.0.1", "Broker host name or address.")
    port: int = key(1883, "Broker port (1883 plain, 8883 TLS).", minimum=1, maximum=65535)
    username: str | None = key(None, "MQTT user name (HIAS generates one per device).")
    password_env: str | None = key(None, "Name of the environment variable holding the password.")
    password_file: str | None = key(None, "File holding the password; not readable by others, not writable by group or "
                                          "others (e.g. root:allds 0640).")
    client_id: str | None = topic_id(None, "MQTT client id; default `hias.name`. Fixed, so the session persists; "
                                           "two agents with one id take the session from each other (the second "
                                           "one to connect wins, the other exits with code 2).")
    keepalive: int = key(60, "MQTT keepalive in seconds.", minimum=5, maximum=65535)
    protocol: str = key("5", "MQTT protocol version.", choices=("5", "3.1.1"))
    session_expiry_s: int = key(86400, "How long the broker keeps the session (and queued requests) while the agent "
                                       "is away (MQTT 5). The session is always persistent, so at least a minute.",
                                minimum=60, maximum=4_294_967_295)
    reconnect_min_s: float = key(0.5, "First reconnect delay; doubles with jitter up to `reconnect_max_s`.", minimum=0.01)
    reconnect_max_s: float = key(30.0, "Longest reconnect delay.", minimum=0.1)
    allow_insecure: bool = key(False, "Allow plain MQTT toward a host that is not loopback (never with credentials).")
    tls: Tls = key(Tls(), "")


@dataclass
class Model:
    """The served model."""

    dir: str = key("model/artifacts", "Folder of models, one sub-folder per model name with its card and artifacts; "
                                      "relative to the project.")
    name: str = key("cellnet_standardised", "Model served at start; `Reload` commands name another model of `dir`.",
                    pattern=MODEL_NAME, pattern_doc="letters, digits, `.`, `_`, `-`; no path")
    variant: str = key("int8", "Artifact of the model card served: LiteRT `int8` or `float32`, or `keras` (TensorFlow).",
                       choices=("int8", "float32", "keras"))
    threads: int = key(2, "LiteRT (XNNPACK) threads.", minimum=1, maximum=64)
    state_file: str | None = key(None, "File where the agent remembers which model serves (after a Reload, a delivery or "
                                       "a Rollback) and which one served before, so a restart serves the last active "
                                       "model; none = always start with `name`.")
    trusted_keys: list[str] = key([], "Ed25519 public keys (`signing.pub` of `python -m model keygen`) whose signed "
                                      "bundles the agent accepts on `{base}/Model` (and `fleet_topic`); empty = "
                                      "delivery over the broker off. Accepted models are installed into `dir`.")
    max_bundle_bytes: int = key(10 * 1024 * 1024, "Largest model bundle accepted.", minimum=1024,
                                maximum=MAX_MQTT_PACKET - 65536)
    fleet_topic: str | None = key(None, "A topic every agent of a fleet also takes bundles from (one publish updates "
                                        "them all), e.g. `{location}/Devices/{zone}/Fleet/Models` (five levels: "
                                        "HIAS 3's IoT agent fails on four).",
                                  pattern=re.compile(r"[^#+$\x00][^#+\x00]*"), pattern_doc="a topic name, no wildcards")


@dataclass
class Inference:
    """Requests and the serving pipeline."""

    max_payload_bytes: int = key(10 * 1024 * 1024, "Largest request payload accepted; the MQTT 5 Maximum Packet Size "
                                                    "the agent announces is this plus 64 KiB.", minimum=1,
                                 maximum=MAX_MQTT_PACKET - 65536)
    max_pixels: int = key(12_000_000, "Largest image (width x height, read from the header) accepted; formats "
                                      "without a reduced decode (PNG, TIFF) cost 3 bytes a pixel per decode worker "
                                      "(bench/memory.py).", minimum=1)
    min_side_px: int = key(48, "Smallest image side accepted (smaller smears are misread: docs/trust.md).", minimum=1)
    max_aspect_ratio: float = key(20.0, "Largest long/short side ratio accepted.", minimum=1)
    max_inflight: int = key(8, "Requests held at once (MQTT 5 Receive Maximum). The agent also holds at most this "
                               "many times `max_payload_bytes` of request payloads, whatever the broker lets through "
                               "(Mosquitto 2.0.11 exceeds Receive Maximum): more is answered `busy`.", minimum=1,
                            maximum=65535)
    max_batch: int = key(8, "Largest micro-batch.", minimum=1)
    batch_wait_ms: float = key(2.0, "Longest wait for more requests to join a batch while others are still decoding.", minimum=0)
    decode_workers: int = key(2, "Threads that decode and preprocess images.", minimum=1)
    explain_max_side: int = key(1024, "An explanation's heat map has the image's size, scaled down to fit this many "
                                      "pixels on its longer side.", minimum=16, maximum=8192)
    request_topic: str | None = key(None, "Request topic; default `{base}/Inference`. Agents of one pool share one.",
                                    pattern=re.compile(r"[^#+$\x00][^#+\x00]*"), pattern_doc="a topic name, no wildcards")
    shared_group: str | None = topic_id(None, "Subscribe as `$share/{group}/{request topic}` so a pool of agents shares "
                                              "requests.")
    reply_topics: list[str] = key(["{base}/Diagnosis/#"], "Topic filters a request's MQTT 5 Response Topic must match "
                                  "(`{base}` = the device's base topic); any other, and every own channel of the "
                                  "device, is refused with `bad_response_topic` on the Diagnosis topic.",
                                  pattern=re.compile(r"[^$\x00][^\x00]*"), pattern_doc="a topic filter not starting with `$`")


@dataclass
class Telemetry:
    """HIAS Life telemetry."""

    life_interval_s: float = key(300.0, "Seconds between Life messages (the first goes at connect).", minimum=1)
    latitude: float = key(0.0, "Device latitude reported in Life.")
    longitude: float = key(0.0, "Device longitude reported in Life.")
    outbox_size: int = key(100, "Telemetry messages kept while disconnected (oldest dropped first).", minimum=1)


@dataclass
class Http:
    """HIAS's Diagnosis page: `POST /Inference` (multipart field `file`, or the raw image) answered
    `{"Response", "Message", "Diagnosis", "Confidence"}` through the same pipeline as MQTT requests.
    HIAS reaches it through its NGINX, which checks the user's credentials; the agent answers only
    the addresses in `allowed_clients` (HIAS's server)."""

    port: int = key(0, "Port of the listener; 0 = off.", minimum=0, maximum=65535)
    bind: str = key("127.0.0.1", "Address it listens on (the agent's LAN address when HIAS's NGINX is on another host).")
    allowed_clients: list[str] = key(["127.0.0.1/32", "::1/128"], "Networks allowed to connect (HIAS's NGINX), "
                                     "as addresses or CIDR blocks; others get 403.")
    max_body_bytes: int = key(10 * 1024 * 1024 + 64 * 1024, "Largest request body; larger ones get 413 unread.",
                              minimum=1024, maximum=MAX_MQTT_PACKET)
    max_concurrent: int = key(4, "Requests handled at once; more get 503.", minimum=1, maximum=64)
    timeout_s: float = key(25.0, "Longest wait for an answer (HIAS gives up after 30 s).", minimum=1, maximum=300)


@dataclass
class Metrics:
    """Prometheus metrics at `http://{bind}:{port}/metrics`."""

    port: int = key(0, "Port of the metrics endpoint; 0 = off.", minimum=0, maximum=65535)
    bind: str = key("127.0.0.1", "Address the endpoint listens on (`0.0.0.0` for every interface).")


@dataclass
class Watchdog:
    """What the systemd watchdog checks before each `WATCHDOG=1` (systemd restarts the agent when they stop)."""

    stall_s: float = key(60.0, "Longest a network-loop iteration or one inference may take.", minimum=1)
    max_disconnected_s: float = key(900.0, "Longest time without a broker connection.", minimum=1)


@dataclass
class Logging:
    """Logging."""

    level: str = key("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class Config:
    """The agent configuration (`config/agent.yaml`)."""

    hias: Hias = key(Hias(), "")
    broker: Broker = key(Broker(), "")
    model: Model = key(Model(), "")
    inference: Inference = key(Inference(), "")
    telemetry: Telemetry = key(Telemetry(), "")
    watchdog: Watchdog = key(Watchdog(), "")
    metrics: Metrics = key(Metrics(), "")
    http: Http = key(Http(), "")
    logging: Logging = key(Logging(), "")

    @property
    def client_id(self) -> str:
        return self.broker.client_id or self.hias.name

    @property
    def model_dir(self) -> Path:
        path = Path(self.model.dir).expanduser()
        return path if path.is_absolute() else PROJECT / path

    def password(self) -> str | None:
        """The broker password from the named environment variable or the password file."""
        if self.broker.password_env:
            value = os.environ.get(self.broker.password_env)
            if value is None:
                raise ConfigError(f"broker.password_env: environment variable {self.broker.password_env} is not set")
            return value
        if self.broker.password_file:
            path = Path(self.broker.password_file)
            try:
                if not path.is_file():
                    raise ConfigError(f"broker.password_file: {path} does not exist")
                if path.stat().st_mode & (stat.S_IRWXO | stat.S_IWGRP):
                    raise ConfigError(f"broker.password_file: {path} is readable by others or writable by group "
                                      "(chmod 640 or 600 it)")
                return path.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"broker.password_file: cannot read {path} ({exc.strerror})") from None
        return None


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check(path: str, value, tp, meta: dict):
    """Validate one value against its declared type and constraints; return it (coerced)."""
    if _is_optional(tp):
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be a list, got {value!r}")
        return [_check(f"{path}[{n}]", item, typing.get_args(tp)[0], meta) for n, item in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and meta.get("choices"):
            value = str(value)  # `protocol: 5`
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: must be a non-empty string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{path}: must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(f"{path}: must be at least {meta['minimum']}, got {value!r}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(f"{path}: must be at most {meta['maximum']}, got {value!r}")
    if meta.get("pattern") is not None and not meta["pattern"].fullmatch(value):
        raise ConfigError(f"{path}: must be {meta['pattern_doc']}, got {value!r}")
    return value


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in sorted(set(raw) - names):
        raise ConfigError(f"{prefix}{unknown}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        path = f"{prefix}{f.name}"
        if _is_dataclass_type(hints[f.name]):
            values[f.name] = _build(hints[f.name], raw[f.name], path + ".")
        else:
            values[f.name] = _check(path, raw[f.name], hints[f.name], dict(f.metadata))
    return cls(**values)


def parse(raw: dict | None) -> Config:
    """Validate a parsed YAML document and apply the cross-key rules."""
    config = _build(Config, raw, "")
    broker = config.broker
    if not broker.tls.enabled and not _is_loopback(broker.host):
        if broker.username or broker.password_env or broker.password_file:
            raise ConfigError(f"broker.username: credentials would cross the network in plain text to {broker.host}; "
                              "enable broker.tls")
        if not broker.allow_insecure:
            raise ConfigError(f"broker.tls.enabled: false toward non-loopback host {broker.host}; "
                              "enable TLS or set broker.allow_insecure: true")
    if broker.tls.keyfile and not broker.tls.certfile:
        raise ConfigError("broker.tls.keyfile: set without broker.tls.certfile")
    if broker.password_env and broker.password_file:
        raise ConfigError("broker.password_file: set together with broker.password_env; choose one")
    if config.inference.shared_group and broker.protocol != "5":
        raise ConfigError("inference.shared_group: shared subscriptions need broker.protocol 5")
    for n, network in enumerate(config.http.allowed_clients):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"http.allowed_clients[{n}]: not an address or CIDR block: {network!r}") from None
    if config.model.trusted_keys and not config.model.state_file:
        raise ConfigError("model.state_file: needed with model.trusted_keys, so a delivered model survives a restart")
    if broker.reconnect_max_s < broker.reconnect_min_s:
        raise ConfigError("broker.reconnect_max_s: must be at least broker.reconnect_min_s")
    return config


def load(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    return parse(raw)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reference() -> str:
    """The config reference in Markdown, generated from the schema."""
    lines = ["# Agent configuration reference", "",
             "Generated from `agent/config.py` by `python -m agent.config --reference`; do not edit.",
             "Every key is optional; unknown keys are an error.", ""]

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        leaves = [f for f in dataclasses.fields(cls) if not _is_dataclass_type(hints[f.name])]
        if leaves:
            lines.extend([f"## `{prefix.rstrip('.')}`", "", cls.__doc__ or "", "",
                          "| key | type | default | meaning |", "|---|---|---|---|"])
        for f in leaves:
            tp = hints[f.name]
            type_name = " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp)) \
                if _is_optional(tp) else "list of str" if typing.get_origin(tp) is list else tp.__name__
            meaning = f.metadata["doc"]
            if f.metadata.get("choices"):
                meaning += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            if f.metadata.get("minimum") is not None:
                meaning += f" At least {f.metadata['minimum']}."
            if f.metadata.get("maximum") is not None:
                meaning += f" At most {f.metadata['maximum']}."
            if f.metadata.get("pattern_doc"):
                meaning += f" Must be {f.metadata['pattern_doc']}."
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            default = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"| `{prefix}{f.name}` | {type_name} | `{default}` | {meaning} |")
        lines.append("")
        for f in dataclasses.fields(cls):
            if _is_dataclass_type(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Config, "")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--reference"]:
        sys.stdout.write(reference())
    else:
        print("usage: python -m agent.config --reference", file=sys.stderr)
        sys.exit(2)
