"""The fleet bench in a short form: two Pi-sized agents (cgroup CPU quotas) behind one broker answer
every id exactly once and together serve well over one agent's throughput."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_two_quota_bound_agents_scale_and_lose_nothing(data_root, tmp_path):
    out = tmp_path / "fleet.json"
    result = subprocess.run([sys.executable, "bench/fleet.py", "--agents", "1", "2", "--quota", "0.25", "--images", "240",
                             "--data", str(data_root), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(out.read_text())
    print(f"\none agent {one['throughput']:.0f}/s, two {two['throughput']:.0f}/s: {two['scaling']:.2f}x")
    for row in (one, two):
        assert row["answered"] == row["images"] and row["missing"] == 0 and row["duplicates"] == 0
    assert len(two["per_agent"]) == 2 and min(two["per_agent"].values()) > 0
    assert two["scaling"] > 1.5
