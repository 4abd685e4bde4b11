"""Fixtures: real brokers and agents, the data root (required in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import BASE, Agent, Broker, Client, write_config


def _real_data(variable: str, default: Path, marker: str) -> Path:
    """The data set at `$variable` (else `default`), which must hold `marker`; in CI a missing data set
    fails the test instead of skipping it."""
    root = Path(os.environ.get(variable, default))
    if not (root / marker).is_dir():
        message = f"real data not found at {root} (set {variable})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """ALL_Aria2021 from ALLDS_DATA."""
    return _real_data("ALLDS_DATA", Path(__file__).resolve().parents[2] / "shared/data/ALL_Aria2021", "Benign")


@pytest.fixture(scope="session")
def bccd_root(data_root) -> Path:
    """BCCD (another laboratory's normal blood) from ALLDS_BCCD, else beside ALL_Aria2021."""
    return _real_data("ALLDS_BCCD", data_root.parent / "BCCD", "JPEGImages")


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def start_agent(tmp_path):
    """Start agents against a broker port; all are killed at the end of the test."""
    agents = []

    def start(port: int, name: str = "agent", env: dict | None = None, **sections) -> Agent:
        config = write_config(tmp_path / f"{name}.yaml", port, **sections)
        agent = Agent(config, tmp_path / f"{name}.log", env).start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


@pytest.fixture
def client(broker):
    c = Client(broker.port).subscribe(f"{BASE}/#")
    yield c
    c.close()
