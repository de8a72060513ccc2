"""Where things go on disk, and how they get there without ever being half-written."""

from __future__ import annotations

import contextlib
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
