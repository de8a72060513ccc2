"""Disk: the cache's cap (least recently used out first, never what a queued or running job needs),
an output folder checked at submit, and a full or read-only disk failing the job with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from actors.effects import Effects
from farm.cache import ArtifactCache, CacheEntry, choose_evictions
from farm.store import Store

NOW = 1_000_000.0
REPO = Path(__file__).resolve().parent.parent


def entry(key: str, size: int, used: float) -> CacheEntry:
    return CacheEntry(key, Path(f"/x/{key}.npz"), size, used)


def test_least_recently_used_go_first_until_the_cache_fits():
    entries = [entry("new", 100, NOW - 700), entry("old", 100, NOW - 5000), entry("mid", 100, NOW - 2000)]
    assert [e.key for e in choose_evictions(entries, 200, set(), NOW)] == ["old"]
    assert [e.key for e in choose_evictions(entries, 100, set(), NOW)] == ["old", "mid"]
    assert choose_evictions(entries, 300, set(), NOW) == []


def test_pinned_and_just_used_outputs_are_spared_even_over_the_cap():
    entries = [entry("pinned", 100, NOW - 9000), entry("fresh", 100, NOW - 10), entry("old", 100, NOW - 5000)]
    chosen = choose_evictions(entries, 0, {"pinned"}, NOW, grace_s=600)
    assert [e.key for e in chosen] == ["old"]


def fill(cache: ArtifactCache, key: str, nbytes: int, used: float) -> Path:
    path = cache.put_arrays(key, a=np.zeros(nbytes, np.uint8))
    os.utime(path, (used, used))
    return path


def test_gc_on_disk_spares_what_an_active_job_needs_and_what_was_read(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    store = Store(tmp_path / "farm.sqlite")
    now = time.time()
    keys = {name: f"{i:02x}" + name * 8 for i, name in enumerate(["a", "b", "c", "d"])}
    for i, key in enumerate(keys.values()):
        fill(cache, key, 10_000, now - 10_000 + i)  # a oldest ... d newest
    size = cache.path(keys["a"], "npz").stat().st_size
    # A running job made "a" and will read it: pinned. "b" was just read by a stage: recently used.
    store.add_job("j1", "t", {}, str(tmp_path), str(tmp_path / "out"))
    store.set_job_state("j1", "running")
    store.set_stage("j1", "s1", "succeeded", cache_key=keys["a"])
    store.add_job("j2", "t", {}, str(tmp_path), str(tmp_path / "out2"))
    store.set_stage("j2", "s1", "succeeded", cache_key=keys["c"])
    store.set_job_state("j2", "succeeded")  # a finished job pins nothing
    cache.get_arrays(keys["b"])
    stale = cache.path(keys["d"], "npz").with_name(".dead.tmp.npz")
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (now - 2 * 86400, now - 2 * 86400))
    pinned = store.pinned_keys()
    assert pinned == {keys["a"]}
    usage = cache.usage(pinned)
    assert (usage.files, usage.bytes, usage.pinned_bytes, usage.stale_temp) == (4, 4 * size, size, 1)

    dry = cache.gc(3 * size, pinned, dry_run=True)
    assert dry.removed == 1 and all(cache.path(k, "npz").is_file() for k in keys.values()) and stale.exists()
    report = cache.gc(size, pinned)  # only the two nobody needs can go: still over the cap
    assert (report.removed, report.freed, report.left, report.over_cap) == (2, 2 * size, 2 * size, True)
    assert [k for k, v in keys.items() if cache.path(v, "npz").is_file()] == ["a", "b"]
    assert not stale.exists()


def test_farm_cache_du_and_gc_commands(tmp_path):
    env = {**os.environ, "FARM_HOME": str(tmp_path), "FARM_CACHE_CAP_GB": "0.00002"}  # a 20 kB cap
    cache = ArtifactCache(tmp_path / "cache")
    for i in range(4):
        fill(cache, f"{i:02x}{'e' * 10}", 10_000, time.time() - 5000 + i)

    def farm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "farm.cli", "cache", *args], capture_output=True, text=True,
                              env=env, timeout=60)

    du = json.loads(farm("du", "--json").stdout)
    assert du["files"] == 4 and du["cap_bytes"] == 20_000 and du["by_kind"] == {"npz": du["bytes"]}
    gc = farm("gc")
    assert gc.returncode == 0 and gc.stdout.startswith("removed 3 files"), gc.stdout + gc.stderr
    assert json.loads(farm("du", "--json").stdout)["files"] == 1
    assert farm("gc", "--cap-gb", "-1").returncode == 2


def test_the_director_tidies_the_cache_after_a_job_ends(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    for i in range(3):
        fill(cache, f"{i:02x}{'f' * 10}", 10_000, time.time() - 5000 + i)
    size = cache.path(f"00{'f' * 10}", "npz").stat().st_size
    effects = Effects(Store(tmp_path / "farm.sqlite"), cache, fleet=None, cache_cap=size)  # type: ignore[arg-type]
    effects.tidy_cache()
    assert effects._tidying is not None
    effects._tidying.join(10)
    assert effects.evicted == {"files": 2, "bytes": 2 * size}
    assert len(cache.entries()) == 1


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    from farm.paths import folder_room, output_problem

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "cannot write to" in (output_problem(blocker / "out", 1) or "")
    assert "MB free; the job writes about" in (output_problem(tmp_path / "out", 10**18) or "")
    assert output_problem(tmp_path / "fine", 1) is None and (tmp_path / "fine").is_dir()
    assert list((tmp_path / "fine").iterdir()) == []  # the probe leaves nothing behind
    # Submits queued together look at a folder once: each is judged on that one look.
    room = folder_room(tmp_path / "fine")
    assert room[0] is None and room[1] > 0
    assert output_problem(tmp_path / "fine", room[1] + 1, room) is not None
    assert output_problem(tmp_path / "fine", room[1], room) is None
    assert output_problem(tmp_path / "fine", 1, ("cannot write to it", 0)) == "cannot write to it"


def test_farm_render_refuses_an_unwritable_output_folder_at_once(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "farm.cli", "render", str(REPO / "examples" / "storyboard.yaml"),
                          "-o", str(blocker / "out"), "--models", "tiny"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "FARM_HOME": str(tmp_path / "home")})
    assert out.returncode == 2 and "output" in out.stderr and "cannot write to" in out.stderr, out.stderr
    assert time.time() - started < 60  # before Ray starts


def test_a_full_disk_is_named_as_such():
    from farm.paths import disk_trouble

    try:
        with open("/dev/full", "wb") as fh:  # a real ENOSPC from the kernel
            fh.write(b"x" * 65536)
            fh.flush()
    except OSError as exc:
        wrapped = RuntimeError("stage failed")
        wrapped.__cause__ = exc
        assert "disk trouble" in (disk_trouble(wrapped) or "") and "No space left" in (disk_trouble(wrapped) or "")
    else:
        raise AssertionError("/dev/full accepted a write")
    assert disk_trouble(ValueError("something else")) is None
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x)")
    db.execute("PRAGMA query_only = 1")
    try:
        db.execute("INSERT INTO t VALUES (1)")
    except sqlite3.OperationalError as exc:
        assert "read-only" in (disk_trouble(exc) or "")
    else:
        raise AssertionError("a query-only database took a write")
