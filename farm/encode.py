"""ffmpeg: per-shot clips from frames, the final film from clips, and probing the results.

Everything goes through the `ffmpeg` binary (ffmpeg-python builds the command lines). There is
deliberately no ffprobe dependency: imageio-ffmpeg ships only ffmpeg, so `probe` reads ffmpeg's
own stream report and counts frames by decoding.

Every output is written through `atomic_path`, so a failed or killed encode never leaves a
truncated mp4 where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np

from farm.paths import atomic_path

X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip
TRANSITIONS = ("cut", "crossfade")
# A bitrate names its unit: `k` (kbit/s) or `M` (Mbit/s). ffmpeg reads a bare number as bit/s and a
# lower-case `m` as milli, so `8m` and `8000` would both be tiny films: refused, not guessed.
_BITRATE = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>[kM])")
BITRATE_RANGE = (10_000, 500_000_000)  # bit/s: below is no picture at all, above no player streams


def bitrate_bits(text: str) -> int:
    """Bits per second of a bitrate like `10000k` or `10M`; ValueError saying why for anything else."""
    match = _BITRATE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"bitrate {text!r} must be a number with its unit, k or M (e.g. 10000k or 10M); "
                         "ffmpeg reads a bare number as bit/s and a lower-case m as milli")
    bits = int(float(match["n"]) * (1_000 if match["unit"] == "k" else 1_000_000))
    if not BITRATE_RANGE[0] <= bits <= BITRATE_RANGE[1]:
        raise ValueError(f"bitrate {text!r} must be between 10k and 500M")
    return bits


def default_bitrate(width: int, height: int) -> str:
    """docs/sources.md section 1's bitrate fallback: 10000k at 1080p, 5000-8000k at 720p (6500k, the
    middle); other sizes in proportion to 720p's pixels, at least 1000k."""
    lines = min(width, height)
    if lines >= 1080:
        return "10000k"
    if lines >= 720:
        return "6500k"
    return f"{max(1000, round(6500 * width * height / (1280 * 720)))}k"


# The stream line looks like `Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, progressive), 64x48,
# ...`: the pix_fmt's parenthetical may hold commas, and the codec tag holds `0x...`, so anchor the
# size right after the pix_fmt instead of searching for the first `NxM`.
_VIDEO_STREAM = re.compile(
    r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+)(?: \((?P<profile>[^)]*)\))?[^,]*, (?P<pix_fmt>\w+)(?:\([^)]*\))?, "
    r"(?P<w>\d+)x(?P<h>\d+)(?P<rest>.*)"
)
_RATE = re.compile(r"(?P<v>\d+(?:\.\d+)?)(?P<k>k?) (?:fps|tbr)\b")


class EncodeError(RuntimeError):
    """ffmpeg failed; the message carries the tail of its stderr, `stderr` all of it."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True)
class EncodeSettings:
    crf: int = 20
    preset: str = "medium"
    bitrate: str | None = None  # e.g. "10000k": target bitrate instead of constant quality
    # None lets x264 pick (1.5x cores). Set where encodes share cores with denoising (CPU-only hosts),
    # since x264's threads would otherwise preempt torch's.
    threads: int | None = None

    def __post_init__(self) -> None:
        # Checked here so a bad manifest value fails before any GPU time is spent, not at the merge.
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {self.crf}")
        if self.preset not in X264_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}, got {self.preset!r}")
        if self.bitrate is not None:
            bitrate_bits(self.bitrate)


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int
    duration: float
    codec: str
    pix_fmt: str
    faststart: bool
    profile: str = ""  # the codec profile (H.264: High, Constrained Baseline, ...)


def ffmpeg_exe() -> str:
    """The ffmpeg binary: the one on PATH (a system build may have more codecs), else imageio-ffmpeg's."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg  # deferred: only needed where the system has no ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def encode_clip(frames: Sequence[np.ndarray] | np.ndarray, fps: float, out: Path, settings: EncodeSettings) -> Path:
    """Encode uint8 RGB frames (HxWx3 each, or one (N,H,W,3) array) to an H.264 mp4 at `out`."""
    height, width = _check_frames(frames)
    _check_positive("fps", fps)
    out = Path(out)
    source = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=_rate(fps))
    with atomic_path(out) as tmp:
        # Frames go over stdin one at a time: no PNG round trip, and never the whole clip as one bytes copy.
        stream = ffmpeg.output(source, str(tmp), **_h264_args(settings)).global_args("-loglevel", "error")
        _run(stream.overwrite_output(), feed=(np.ascontiguousarray(f).tobytes() for f in frames))
    return out


@dataclass(frozen=True)
class MergeResult:
    path: Path
    how: str  # "stream copy", "re-encoded k of n clips" (only around crossfades) or "re-encoded" (all)


def merge_clips(
    clips: Sequence[Path],
    out: Path,
    settings: EncodeSettings,
    *,
    fps: float,
    transition: str = "cut",
    transitions: Sequence[str] | None = None,
    crossfade_seconds: float = 0.5,
    final_resolution: tuple[int, int] | None = None,
    interpolate_fps: float | None = None,
) -> MergeResult:
    """Join per-shot clips into the film. `transitions` names each boundary ("cut" or "crossfade"; a
    shot that continues the previous one is always a cut); without it every boundary is `transition`.

    Nothing is encoded twice that need not be: with the film's frame rate and no final scale or
    interpolation, clips are joined with the concat demuxer by stream copy, and only the runs of clips
    joined by crossfades are re-encoded. Otherwise every clip is brought to `fps` and a zero start time
    (concat and xfade need matching rates and timebases) and the film is encoded once; interpolation
    runs before scaling so the expensive motion search works on the small generation-size frames.
    """
    clips = [Path(c) for c in clips]
    if not clips:
        raise ValueError("merge_clips needs at least one clip")
    bounds = list(transitions) if transitions is not None else [transition] * (len(clips) - 1)
    if len(bounds) != len(clips) - 1:
        raise ValueError(f"{len(clips)} clips need {len(clips) - 1} transitions, got {len(bounds)}")
    for kind in bounds:
        if kind not in TRANSITIONS:
            raise ValueError(f"transition must be one of {', '.join(TRANSITIONS)}, got {kind!r}")
    _check_positive("fps", fps)
    if "crossfade" in bounds:
        _check_positive("crossfade_seconds", crossfade_seconds)
    if interpolate_fps is not None:
        _check_positive("interpolate_fps", interpolate_fps)
    if final_resolution is not None:
        w, h = final_resolution
        if w <= 0 or h <= 0 or w % 2 or h % 2:
            raise ValueError(f"final_resolution must be positive and even (yuv420p), got {w}x{h}")
    infos = [probe(c) for c in clips]
    for i, kind in enumerate(bounds):
        if kind == "crossfade":
            for j in (i, i + 1):
                if infos[j].duration < crossfade_seconds:
                    raise ValueError(f"clip {clips[j]} is {infos[j].duration:.3f}s long, shorter than the "
                                     f"{crossfade_seconds}s crossfade")
    out = Path(out)
    copyable = (final_resolution is None and interpolate_fps is None
                and all(abs(i.fps - fps) < 1e-3 and (i.width, i.height) == (infos[0].width, infos[0].height)
                        and i.codec == "h264" and i.pix_fmt == "yuv420p" and i.profile == infos[0].profile
                        for i in infos))
    if copyable:
        result = _merge_by_copy(clips, infos, bounds, out, settings, fps, crossfade_seconds)
        if result is not None:
            return result
    _encode_joined(clips, infos, bounds, out, settings, fps, crossfade_seconds, final_resolution, interpolate_fps)
    return MergeResult(out, "re-encoded")


def film_seconds(durations: Sequence[float], transitions: Sequence[str], crossfade_seconds: float) -> float:
    """The film's length: every clip, less each crossfade actually applied."""
    return sum(durations) - sum(crossfade_seconds for kind in transitions if kind == "crossfade")


def _merge_by_copy(clips: list[Path], infos: list[VideoInfo], bounds: list[str], out: Path,
                   settings: EncodeSettings, fps: float, crossfade_seconds: float) -> MergeResult | None:
    """Runs of clips joined by crossfades are encoded (once) into one piece each; everything is then
    joined by stream copy. None where the joined film does not have the frames it must (the caller
    re-encodes it whole)."""
    runs: list[list[int]] = [[0]]
    for i, kind in enumerate(bounds):
        if kind == "crossfade":
            runs[-1].append(i + 1)
        else:
            runs.append([i + 1])
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=out.parent) as tmp:
        pieces, reencoded = [], 0
        for n, run in enumerate(runs):
            if len(run) == 1:
                pieces.append(clips[run[0]])
                continue
            piece = Path(tmp) / f"run{n}.mp4"
            _encode_joined([clips[i] for i in run], [infos[i] for i in run], ["crossfade"] * (len(run) - 1),
                           piece, settings, fps, crossfade_seconds, None, None)
            if probe(piece).profile != infos[0].profile:
                return None  # the film's settings are not the clips': packets of both cannot share a stream
            pieces.append(piece)
            reencoded += len(run)
        listing = Path(tmp) / "clips.txt"
        listing.write_text("".join(f"file '{p.resolve()}'\n" for p in pieces), encoding="utf-8")
        with atomic_path(out) as target:
            stream = ffmpeg.output(ffmpeg.input(str(listing), format="concat", safe=0), str(target), c="copy",
                                   movflags="+faststart").global_args("-nostdin", "-loglevel", "error")
            _run(stream.overwrite_output())
            expected = round(film_seconds([i.duration for i in infos], bounds, crossfade_seconds) * fps)
            joined = probe(target)
            if abs(joined.frames - expected) > 1 or abs(joined.fps - fps) > 1e-3:
                return None  # not what a film of these clips must be: encode it whole instead
    how = "stream copy" if not reencoded else f"stream copy; re-encoded {reencoded} of {len(clips)} clips"
    return MergeResult(out, how + " (crossfades)" if reencoded else how)


def _encode_joined(clips: list[Path], infos: list[VideoInfo], bounds: list[str], out: Path,
                   settings: EncodeSettings, fps: float, crossfade_seconds: float,
                   final_resolution: tuple[int, int] | None, interpolate_fps: float | None) -> None:
    first = infos[0]
    streams = []
    for clip, info in zip(clips, infos, strict=True):
        s = (ffmpeg.input(str(clip)).video.filter("fps", fps=_rate(fps)).filter("setpts", "PTS-STARTPTS")
             .filter("settb", f"1/{_rate(fps)}"))
        if (info.width, info.height) != (first.width, first.height):
            s = s.filter("scale", first.width, first.height, flags="lanczos")
        streams.append(s.filter("format", "yuv420p").filter("setsar", 1))

    video, elapsed = streams[0], infos[0].duration
    for stream, info, kind in zip(streams[1:], infos[1:], bounds, strict=True):
        if kind == "crossfade":
            # xfade's offset is on the merged timeline so far, which each transition shortens.
            offset = elapsed - crossfade_seconds
            video = ffmpeg.filter([video, stream], "xfade", transition="fade", duration=crossfade_seconds,
                                  offset=f"{offset:.6f}")
            elapsed = offset + info.duration
        else:
            # concat's output has its own timebase; xfade needs both inputs on one, so set it back
            video = ffmpeg.concat(video, stream, v=1, a=0).filter("settb", f"1/{_rate(fps)}")
            elapsed += info.duration

    if interpolate_fps is not None:
        # minterpolate stops short of the last source frame (about 3 frames lost at 15->30 fps), so
        # hold the end for two frames and then trim to the film's length at the new rate.
        seconds = film_seconds([i.duration for i in infos], bounds, crossfade_seconds)
        video = (
            video.filter("tpad", stop_mode="clone", stop=2)
            .filter("minterpolate", fps=_rate(interpolate_fps))
            .filter("trim", end_frame=max(1, round(seconds * interpolate_fps)))
        )
    if final_resolution is not None:
        w, h = final_resolution
        # Letterbox rather than stretch when the aspect ratio differs from the generation size.
        video = (
            video.filter("scale", w, h, flags="lanczos", force_original_aspect_ratio="decrease", force_divisible_by=2)
            .filter("pad", w, h, "(ow-iw)/2", "(oh-ih)/2")
            .filter("setsar", 1)
        )
    video = video.filter("format", "yuv420p")
    with atomic_path(out) as tmp:
        stream = ffmpeg.output(video, str(tmp), **_h264_args(settings)).global_args("-nostdin", "-loglevel", "error")
        _run(stream.overwrite_output())


def tag(path: Path, tags: dict[str, str]) -> Path:
    """Write `tags` into an mp4's container metadata, by stream copy (nothing re-encoded), atomically.
    Standard keys (title, comment) show in players; the others are kept as mp4 metadata tags."""
    path = _existing(path)
    with atomic_path(path) as target:
        stream = ffmpeg.output(ffmpeg.input(str(path)), str(target), c="copy", map_metadata=-1,
                               movflags="+faststart+use_metadata_tags",
                               **{f"metadata:g:{i}": f"{k}={v}" for i, (k, v) in enumerate(tags.items())})
        _run(stream.global_args("-nostdin", "-loglevel", "error").overwrite_output())
    return path


def read_tags(path: Path) -> dict[str, str]:
    """An mp4's container metadata (what `tag` wrote), as ffmpeg's ffmetadata report gives it."""
    out, _ = _run(ffmpeg.output(ffmpeg.input(str(_existing(path))), "-", format="ffmetadata").global_args(
        "-nostdin", "-loglevel", "error"), capture_stdout=True)
    pairs = (line.split("=", 1) for line in out.decode("utf-8", "replace").splitlines()
             if "=" in line and not line.startswith(";"))
    return {k: v for k, v in pairs}


def probe(path: Path) -> VideoInfo:
    """Size, codec and pix_fmt from ffmpeg's stream report; the frame count by decoding every frame."""
    path = _existing(path)
    # `-progress` reports the exact count of frames that reached the null muxer; passthrough stops
    # ffmpeg from dropping or duplicating any on the way there.
    stream = ffmpeg.output(ffmpeg.input(str(path)).video, "-", format="null", fps_mode="passthrough").global_args(
        "-nostdin", "-hide_banner", "-nostats", "-progress", "pipe:1"
    )
    progress, report = _run(stream, capture_stdout=True)
    matches = list(_VIDEO_STREAM.finditer(report))
    counts = re.findall(r"^frame=(\d+)", progress.decode(), flags=re.MULTILINE)
    if not matches or not counts:
        raise EncodeError(f"no video stream found in {path}", report)
    m = matches[0]  # the input's stream; later ones describe the null output
    rate = _RATE.search(m["rest"])
    if rate is None:
        raise EncodeError(f"no frame rate in ffmpeg's report for {path}: {m.group(0)}", report)
    fps = float(rate["v"]) * (1000 if rate["k"] else 1)
    frames = int(counts[-1])
    return VideoInfo(
        width=int(m["w"]),
        height=int(m["h"]),
        fps=fps,
        frames=frames,
        duration=frames / fps,
        codec=m["codec"],
        profile=m["profile"] or "",
        pix_fmt=m["pix_fmt"],
        faststart=_moov_before_mdat(path),
    )


def read_frames(path: Path) -> np.ndarray:
    """Decode every frame to an (N, H, W, 3) uint8 RGB array."""
    path = _existing(path)
    stream = ffmpeg.output(
        ffmpeg.input(str(path)).video, "pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough"
    ).global_args("-nostdin", "-hide_banner", "-nostats")
    raw, report = _run(stream, capture_stdout=True)
    matches = list(_VIDEO_STREAM.finditer(report))
    if not matches:
        raise EncodeError(f"no video stream found in {path}", report)
    # The last stream line is the rawvideo output: its size already includes any autorotation.
    width, height = int(matches[-1]["w"]), int(matches[-1]["h"])
    frame_bytes = width * height * 3
    if len(raw) % frame_bytes:
        raise EncodeError(f"decoded {len(raw)} bytes, not a whole number of {width}x{height} frames", report)
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3)


# ----------------------------------------------------------------------------------------------


def _run(stream: Any, *, feed: Iterable[bytes] | None = None, capture_stdout: bool = False) -> tuple[bytes, str]:
    """Run an ffmpeg-python stream; return (stdout, stderr) or raise EncodeError with stderr's tail.

    stdout and stderr are drained on threads while this thread writes `feed` to stdin: a full pipe
    on either side would otherwise stall ffmpeg and us with it.
    """
    proc = stream.run_async(cmd=ffmpeg_exe(), pipe_stdin=feed is not None, pipe_stdout=capture_stdout, pipe_stderr=True)
    sinks: dict[str, bytes] = {}

    def drain(name: str, pipe: Any) -> None:
        sinks[name] = pipe.read()

    readers = [threading.Thread(target=drain, args=("err", proc.stderr), daemon=True)]
    if capture_stdout:
        readers.append(threading.Thread(target=drain, args=("out", proc.stdout), daemon=True))
    for t in readers:
        t.start()
    try:
        if feed is not None:
            try:
                for chunk in feed:
                    proc.stdin.write(chunk)
            except BrokenPipeError:
                pass  # ffmpeg exited early; its exit status and stderr below say why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()  # EOF tells ffmpeg the clip is complete
        proc.wait()
    except BaseException:
        proc.kill()  # interrupted mid-encode: don't leave ffmpeg writing into the temp file
        proc.wait()
        raise
    finally:
        for t in readers:
            t.join()
    stderr = sinks.get("err", b"").decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:]) or "(no output)"
        raise EncodeError(f"ffmpeg exited with status {proc.returncode}:\n{tail}", stderr)
    return sinks.get("out", b""), stderr


def _h264_args(settings: EncodeSettings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "vcodec": "libx264",
        "pix_fmt": "yuv420p",
        "preset": settings.preset,
        "movflags": "+faststart",  # index up front so players and browsers can start before the download ends
        "an": None,
    }
    if settings.threads is not None:
        args["threads"] = settings.threads
    if settings.bitrate is None:
        args["crf"] = settings.crf
    else:
        args["b:v"] = settings.bitrate
    return args


def _check_frames(frames: Sequence[np.ndarray] | np.ndarray) -> tuple[int, int]:
    """Validate before ffmpeg starts, so a bad frame is a clear ValueError, not a garbled video."""
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(f"a frames array must be (N, H, W, 3), got shape {frames.shape}")
    if len(frames) == 0:
        raise ValueError("no frames to encode")
    shape = np.shape(frames[0])
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
            raise ValueError(f"frame {i}: expected a uint8 array, got {getattr(frame, 'dtype', type(frame))}")
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame {i}: expected H x W x 3 RGB, got shape {frame.shape}")
        if frame.shape != shape:
            raise ValueError(f"frame {i}: shape {frame.shape} differs from frame 0's {shape}")
    height, width = shape[0], shape[1]
    if height % 2 or width % 2:
        raise ValueError(f"frame size {width}x{height} must be even for yuv420p")
    return height, width


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _rate(fps: float) -> str:
    """fps as an exact ratio string, so 23.976 becomes 24000/1001 instead of a lossy decimal."""
    rate = Fraction(fps).limit_denominator(1001)
    return str(rate.numerator) if rate.denominator == 1 else f"{rate.numerator}/{rate.denominator}"


def _existing(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    return path


def _atoms(path: Path) -> Iterator[str]:
    """Types of the top-level MP4 atoms, in file order."""
    with path.open("rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                return
            size, kind = struct.unpack(">I4s", header)
            if size == 1:  # 64-bit size follows the type
                size = struct.unpack(">Q", f.read(8))[0]
                body = size - 16
            elif size == 0:  # atom runs to the end of the file
                yield kind.decode("latin-1")
                return
            else:
                body = size - 8
            if body < 0:
                return  # not an MP4 (or corrupt): stop rather than loop
            yield kind.decode("latin-1")
            f.seek(body, 1)


def _moov_before_mdat(path: Path) -> bool:
    order = [a for a in _atoms(path) if a in ("moov", "mdat")]
    return "moov" in order and "mdat" in order and order.index("moov") < order.index("mdat")
