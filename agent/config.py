"""The one configuration schema: dataclasses with a doc per key. Loading validates against it and
the config reference (`docs/config.md`) is generated from it, so neither can drift.

`python -m agent.config --reference` prints the reference.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
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


def key(default, doc: str, choices: tuple | None = None, minimum: float | None = None):
    """A schema field: default, meaning, and optional allowed values or lower bound."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum}
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Hias:
    """The device as HIAS registered it; topics are `{location}/{topic_root}/{zone}/{device}/...`."""

    location: str = key("allds-location", "HIAS location id (first topic level).")
    zone: str = key("allds-zone", "HIAS zone id.")
    device: str = key("allds-device", "HIAS device id.")
    name: str = key("allds-agent", "Device name; the default MQTT client id.")
    topic_root: str = key("Devices", "`Devices` for HIAS 1.x/2.x, `Agents` for HIAS 3.",
                          choices=("Devices", "Agents"))


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
    port: int = key(1883, "Broker port (1883 plain, 8883 TLS).", minimum=1)
    username: str | None = key(None, "MQTT user name (HIAS generates one per device).")
    password_env: str | None = key(None, "Name of the environment variable holding the password.")
    password_file: str | None = key(None, "File holding the password; must not be readable by group or others.")
    client_id: str | None = key(None, "MQTT client id; default `hias.name`. Fixed, so the session persists.")
    keepalive: int = key(60, "MQTT keepalive in seconds.", minimum=5)
    protocol: str = key("5", "MQTT protocol version.", choices=("5", "3.1.1"))
    session_expiry_s: int = key(86400, "How long the broker keeps the session (and queued requests) while the agent "
                                       "is away (MQTT 5).", minimum=0)
    reconnect_min_s: float = key(0.5, "First reconnect delay; doubles with jitter up to `reconnect_max_s`.", minimum=0.01)
    reconnect_max_s: float = key(30.0, "Longest reconnect delay.", minimum=0.1)
    allow_insecure: bool = key(False, "Allow plain MQTT toward a host that is not loopback.")
    tls: Tls = key(Tls(), "")


@dataclass
class Model:
    """The served model."""

    path: str = key("model/artifacts/cellnet/cellnet_int8.tflite",
                    "Model artifact (`.tflite` served by LiteRT, `.keras` by TensorFlow); relative to the project.")
    threads: int = key(2, "LiteRT (XNNPACK) threads.", minimum=1)


@dataclass
class Inference:
    """Requests and the serving pipeline."""

    max_payload_bytes: int = key(10 * 1024 * 1024, "Largest request payload accepted.", minimum=1)
    max_pixels: int = key(50_000_000, "Largest image (width x height, read from the header) accepted.", minimum=1)
    min_side_px: int = key(8, "Smallest image side accepted.", minimum=1)
    max_aspect_ratio: float = key(20.0, "Largest long/short side ratio accepted.", minimum=1)
    max_inflight: int = key(32, "Requests held at once (MQTT 5 Receive Maximum); bounds memory.", minimum=1)
    max_batch: int = key(8, "Largest micro-batch.", minimum=1)
    batch_wait_ms: float = key(2.0, "Longest wait for more requests to join a batch while others are still decoding.", minimum=0)
    decode_workers: int = key(2, "Threads that decode and preprocess images.", minimum=1)
    request_topic: str | None = key(None, "Request topic; default `{base}/Inference`. Agents of one pool share one.")
    shared_group: str | None = key(None, "Subscribe as `$share/{group}/{request topic}` so a pool of agents shares requests.")


@dataclass
class Telemetry:
    """HIAS Life telemetry."""

    life_interval_s: float = key(300.0, "Seconds between Life messages (the first goes at connect).", minimum=1)
    latitude: float = key(0.0, "Device latitude reported in Life.")
    longitude: float = key(0.0, "Device longitude reported in Life.")
    outbox_size: int = key(100, "Telemetry messages kept while disconnected (oldest dropped first).", minimum=1)


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
    logging: Logging = key(Logging(), "")

    @property
    def client_id(self) -> str:
        return self.broker.client_id or self.hias.name

    @property
    def model_path(self) -> Path:
        path = Path(self.model.path).expanduser()
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
            if not path.is_file():
                raise ConfigError(f"broker.password_file: {path} does not exist")
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"broker.password_file: {path} is readable by group or others (chmod 600 it)")
            return path.read_text().strip()
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
    if not broker.tls.enabled and not broker.allow_insecure and not _is_loopback(broker.host):
        raise ConfigError(f"broker.tls.enabled: false toward non-loopback host {broker.host}; "
                          "enable TLS or set broker.allow_insecure: true")
    if broker.tls.keyfile and not broker.tls.certfile:
        raise ConfigError("broker.tls.keyfile: set without broker.tls.certfile")
    if broker.password_env and broker.password_file:
        raise ConfigError("broker.password_file: set together with broker.password_env; choose one")
    if config.inference.shared_group and broker.protocol != "5":
        raise ConfigError("inference.shared_group: shared subscriptions need broker.protocol 5")
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
                if _is_optional(tp) else tp.__name__
            meaning = f.metadata["doc"]
            if f.metadata.get("choices"):
                meaning += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            if f.metadata.get("minimum") is not None:
                meaning += f" At least {f.metadata['minimum']}."
            default = yaml.safe_dump(f.default).strip().removesuffix("...").strip()
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
