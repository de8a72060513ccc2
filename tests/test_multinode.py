"""Multi-node: stages land on workers of the right tier, and the job survives losing a node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_three_tier_cluster_survives_node_removal(tmp_path, tiny_models):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scenarios" / "multinode.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["state"] == "succeeded", report["error"]
    assert sorted(report["before"].values()) == ["high", "low", "mid"]
    assert sorted(report["after"].values()) == ["high", "low"]  # the mid node's worker left the pool
    rows = report["attempts"]
    gpu = [r for r in rows if r["stage"].split(":")[0] in ("keyframe", "video") and not r["cache_hit"]]
    # every stage ran on a worker whose tier is the tier recorded for it, and all tiers took work
    for r in gpu:
        assert report["before"].get(r["worker"], r["tier"]) == r["tier"], r
    assert {r["tier"] for r in gpu if r["outcome"] == "succeeded"} == {"high", "mid", "low"}
    # nothing succeeded on the mid node after it was removed
    late_mid = [r for r in gpu if r["tier"] == "mid" and r["outcome"] == "succeeded"
                and r["start"] > report["removed_at"]]
    assert not late_mid
