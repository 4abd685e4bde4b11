"""HIAS iotJumpWay topic names: `{location}/{topic_root}/{zone}/{device}/{Channel}`."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import Config


@dataclass(frozen=True)
class Topics:
    """The device's channels; `request` may be a pool's shared topic."""

    base: str
    request: str

    @classmethod
    def from_config(cls, config: Config) -> Topics:
        h = config.hias
        base = f"{h.location}/{h.topic_root}/{h.zone}/{h.device}"
        return cls(base=base, request=config.inference.request_topic or f"{base}/Inference")

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
