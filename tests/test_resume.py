"""Kill the `farm render` process mid-job, run it again: the job completes without redoing stages."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import base_manifest, write_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def succeeded_attempts(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM attempts WHERE outcome='succeeded'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_killed_render_resumes_where_it_stopped(tmp_path, tiny_models):
    shots = [{"id": f"s{i}", "prompt": f"shot {i}", "duration": 1.5, "steps": {"video": 6}} for i in range(4)]
    manifest = write_manifest(tmp_path / "job", base_manifest(shots=shots))
    home = tmp_path / "farmhome"
    # share the session's tiny models; keep the store and cache private to this test
    (home / "models").parent.mkdir(parents=True)
    os.symlink(Path(os.environ["FARM_HOME"]) / "models", home / "models")
    env = {**os.environ, "FARM_HOME": str(home), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "farm.cli", "render", str(manifest), "-o", str(tmp_path / "out"), "--models", "tiny",
           "--quiet"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while succeeded_attempts(home / "farm.sqlite") < 4:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the local Ray it started
    proc.wait()
    done_before = succeeded_attempts(home / "farm.sqlite")
    assert not (tmp_path / "out" / "final.mp4").exists()

    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()
    ok = [r for r in rows if r["outcome"] == "succeeded"]
    executed = [r["stage"] for r in ok if not r["cache_hit"]]
    hits = [r["stage"] for r in ok if r["cache_hit"]]
    assert len(executed) == len(set(executed)), "a stage finished before the kill ran again"
    assert len(hits) >= done_before - 1 >= 3  # all but possibly one in-flight write were reused
    assert set(executed) | set(hits) >= {"merge", "clip:s0", "clip:s3", "keyframe:s2"}
    with sqlite3.connect(home / "farm.sqlite") as conn:
        assert conn.execute("SELECT count(*), min(state) FROM jobs").fetchone() == (1, "succeeded")
