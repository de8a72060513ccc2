"""Where things go on disk, and how they get there without ever being half-written."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def state_dir() -> Path:
    """The farm's state dir (SQLite store, tiny-model cache, artifacts): $FARM_HOME or ~/.farm."""
    return Path(os.environ.get("FARM_HOME") or Path.home() / ".farm")


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success rename it over `final`, on error remove it.

    The temp file keeps `final`'s suffix so tools that pick a format by extension (ffmpeg,
    PIL, pyarrow) still work. A crash never leaves a truncated file at `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    # mkstemp makes owner-only files; outputs are ordinary files, readable as the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def folder_room(folder: Path | str) -> tuple[str | None, int]:
    """Whether a job could write to `folder` at all (None, or why not: read-only, not a folder) and
    the bytes free there. Creates the folder, as the job would."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".farm-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
        stat = os.statvfs(folder)
    except OSError as exc:
        return f"cannot write to {folder}: {exc.strerror or exc}", 0
    return None, stat.f_bavail * stat.f_frsize


def output_problem(folder: Path | str, need_bytes: int, room: tuple[str | None, int] | None = None) -> str | None:
    """Why a job could not write its outputs to `folder` (read-only, not a folder, too little free
    space), found before any GPU work; None when it can. `room`: `folder_room(folder)` already probed
    (submits queued together share one look at the outputs folder)."""
    problem, free = room or folder_room(folder)
    if problem:
        return problem
    if free < need_bytes:
        return (f"{folder} has {free / 1e6:.0f} MB free; the job writes about {need_bytes / 1e6:.0f} MB "
                "there (free some space or choose another output folder)")
    return None


DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
SQLITE_DISK_CODES = {13: "the disk is full", 8: "the database is read-only"}  # SQLITE_FULL, SQLITE_READONLY


def disk_trouble(exc: BaseException) -> str | None:
    """The message a job fails with when `exc` (or what caused it) is a full or read-only disk: at
    once, since trying again on another worker writes to the same disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            where = f" writing {seen.filename}" if seen.filename else ""
            return f"disk trouble{where}: {os.strerror(seen.errno)} (free space on that disk, then requeue the job)"
        code = getattr(seen, "sqlite_errorcode", None)
        if code in SQLITE_DISK_CODES:
            return f"disk trouble writing the farm's store: {SQLITE_DISK_CODES[code]} ({seen})"
        seen = seen.__cause__ or seen.__context__
    return None


def atomic_write_bytes(final: Path | str, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: Path | str, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


class OutputLayout:
    """The OUT/ layout (docs/architecture.md, Outputs), in one place."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def final(self) -> Path:
        return self.root / "final.mp4"

    def shot_clip(self, shot_id: str) -> Path:
        return self.root / "shots" / f"{shot_id}.mp4"

    def keyframe(self, shot_id: str) -> Path:
        return self.root / "keyframes" / f"{shot_id}.png"

    def take_clip(self, shot_id: str, take: int) -> Path:
        """A QC retake's clip (take 1 is the shot's own until a later take wins; then it moves here)."""
        return self.root / "takes" / f"{shot_id}.take{take}.mp4"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def contact_sheet(self) -> Path:
        return self.root / "contact_sheet.png"

    @property
    def timeline(self) -> Path:
        return self.root / "timeline.otio"

    @property
    def lockfile(self) -> Path:
        return self.root / "manifest.lock.json"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.parquet"

    @property
    def work(self) -> Path:
        """Intermediate artifacts (segment frames) kept out of the user-facing folders."""
        return self.root / ".work"
