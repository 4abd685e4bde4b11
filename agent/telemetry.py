"""HIAS Life telemetry: host health as numbers, plus the agent's own counters."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from agent.config import Telemetry
from agent.protocol import now_iso

log = logging.getLogger("allds.telemetry")
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")


def temperature() -> float | None:
    """SoC temperature in °C: the Pi's thermal zone, else the first psutil sensor, else None."""
    try:
        return round(int(THERMAL_ZONE.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        pass
    sensors = getattr(psutil, "sensors_temperatures", lambda: {})()
    for readings in sensors.values():
        if readings:
            return round(float(readings[0].current), 1)
    return None


def life_payload(settings: Telemetry, agent_fields: dict, numeric_temperature: bool = False) -> bytes:
    """The Life JSON: HIAS's numeric fields, when it was measured (`ts`; a queued Life may arrive late)
    and an `Agent` object of our own. Without a temperature sensor `Temperature` is null, or, where
    the reader needs a number (HIAS 3), 0 with `TemperatureMeasured: false`."""
    reading = temperature()
    life = {
        "CPU": psutil.cpu_percent(interval=None),
        "Memory": psutil.virtual_memory().percent,
        "Diskspace": psutil.disk_usage("/").percent,
        "Temperature": 0.0 if reading is None and numeric_temperature else reading,
        "Latitude": float(settings.latitude),
        "Longitude": float(settings.longitude),
        "Agent": agent_fields,
        "ts": now_iso(),
    }
    if reading is None and numeric_temperature:
        life["TemperatureMeasured"] = False
    return json.dumps(life).encode()


class LifeReporter:
    """Publishes Life every interval and on demand; an error is logged and the loop goes on."""

    def __init__(self, settings: Telemetry, publish: Callable[[bytes], None], agent_fields: Callable[[], dict],
                 numeric_temperature: bool = False) -> None:
        self.settings = settings
        self.numeric_temperature = numeric_temperature
        self._publish = publish
        self._agent_fields = agent_fields
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_sent = -math.inf
        self._thread = threading.Thread(target=self._run, name="life", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def trigger(self, min_gap_s: float = 0.0) -> None:
        """Publish Life now (on the HIAS `Life` command), or on connect unless one went out within `min_gap_s`."""
        if time.monotonic() - self._last_sent >= min_gap_s:
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            triggered = self._wake.wait(self.settings.life_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._last_sent = time.monotonic()
                self._publish(life_payload(self.settings, self._agent_fields(), self.numeric_temperature))
            except Exception:  # noqa: BLE001 - one failure must not end telemetry for good
                log.exception("Life publish failed (%s); next in %.0f s",
                              "on demand" if triggered else "periodic", self.settings.life_interval_s)
