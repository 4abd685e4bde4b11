"""HIAS iotJumpWay topic names: `{location}/{topic_root}/{zone}/{device}/{Channel}`, and which
Response Topics a request may name."""

from __future__ import annotations

from dataclasses import dataclass

import paho.mqtt.client as mqtt

from agent.config import Config


@dataclass(frozen=True)
class Topics:
    """The device's channels; `request` may be a pool's shared topic."""

    base: str
    request: str
    reply_filters: tuple[str, ...] = ()
    extra_commands: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> Topics:
        h = config.hias
        base = f"{h.location}/{h.topic_root}/{h.zone}/{h.device}"
        hias3_commands = f"{h.location}/Devices/{h.zone}/{h.device}/Commands"  # where HIAS 3 forwards commands
        extra = (hias3_commands,) if h.dialect == "hias3" and hias3_commands != f"{base}/Commands" else ()
        return cls(base=base, request=config.inference.request_topic or f"{base}/Inference",
                   reply_filters=tuple(f.replace("{base}", base) for f in config.inference.reply_topics),
                   extra_commands=extra)

    @property
    def status(self) -> str:
        return f"{self.base}/Status"

    @property
    def life(self) -> str:
        return f"{self.base}/Life"

    @property
    def diagnosis(self) -> str:
        return f"{self.base}/Diagnosis"

    @property
    def sensors(self) -> str:
        return f"{self.base}/Sensors"

    @property
    def commands(self) -> str:
        return f"{self.base}/Commands"

    @property
    def model_state(self) -> str:
        return f"{self.base}/ModelState"

    @property
    def classification(self) -> str:
        return f"{self.base}/Classification"

    @property
    def own_channels(self) -> frozenset[str]:
        """Channels whose meaning HIAS or the agent fixes: never a reply route."""
        return frozenset({self.status, self.life, self.sensors, self.commands, self.model_state, self.request,
                          self.classification, f"{self.base}/Inference", f"{self.base}/Model", *self.extra_commands})

    def reply_allowed(self, topic: str) -> bool:
        """A Response Topic the agent will publish an answer on."""
        if not topic or len(topic) > 1024 or topic.startswith("$") or any(c in topic for c in "#+\x00"):
            return False
        if topic in self.own_channels:
            return False
        if topic.startswith(self.base + "/") and f"{self.base}/{topic[len(self.base) + 1:].split('/')[0]}" in \
                self.own_channels:
            return False  # HIAS 3 reads `{base}/Status/anything` as Status
        return any(mqtt.topic_matches_sub(f, topic) for f in self.reply_filters)
