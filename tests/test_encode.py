"""farm.encode against the real ffmpeg binary, on tiny clips (64x48, a second or two at 15 fps)."""

from __future__ import annotations

from pathlib import Path

import ffmpeg
import numpy as np
import pytest

from farm.encode import (
    EncodeError,
    EncodeSettings,
    encode_clip,
    ffmpeg_exe,
    merge_clips,
    probe,
    read_frames,
)

FPS = 15
W, H = 64, 48
RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def solid(colour: tuple[int, int, int], n: int, w: int = W, h: int = H) -> np.ndarray:
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    frames[...] = colour
    return frames


def mean_rgb(frame: np.ndarray) -> np.ndarray:
    return frame.reshape(-1, 3).mean(axis=0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One second each of red, green and blue at 15 fps."""
    root = tmp_path_factory.mktemp("clips")
    return {
        name: encode_clip(solid(colour, FPS), FPS, root / f"{name}.mp4", EncodeSettings(preset="ultrafast"))
        for name, colour in (("red", RED), ("green", GREEN), ("blue", BLUE))
    }


def test_encode_clip_probes_as_h264_yuv420p_faststart(tmp_path: Path) -> None:
    out = encode_clip(solid(RED, 12), 12.0, tmp_path / "shots" / "s01.mp4", EncodeSettings())
    assert out == tmp_path / "shots" / "s01.mp4"
    info = probe(out)
    assert (info.width, info.height) == (W, H)
    assert info.frames == 12
    assert info.fps == 12.0
    assert info.duration == pytest.approx(1.0)
    assert info.codec == "h264"
    assert info.pix_fmt == "yuv420p"
    assert info.faststart is True
    assert [p.name for p in out.parent.iterdir()] == ["s01.mp4"]  # no temp file left beside it


def test_probe_sees_moov_after_mdat_without_faststart(clips: dict[str, Path], tmp_path: Path) -> None:
    # A stream copy without +faststart puts the index at the end, as a plain mp4 mux does.
    plain = tmp_path / "plain.mp4"
    ffmpeg.input(str(clips["red"])).output(str(plain), c="copy").global_args("-loglevel", "error").run(
        cmd=ffmpeg_exe(), quiet=True
    )
    info = probe(plain)
    assert info.faststart is False
    assert info.frames == FPS


def test_encode_clip_accepts_a_list_of_frames(tmp_path: Path) -> None:
    frames = list(solid(BLUE, 7))
    info = probe(encode_clip(frames, FPS, tmp_path / "list.mp4", EncodeSettings()))
    assert info.frames == 7


def test_bitrate_mode_replaces_crf(tmp_path: Path) -> None:
    # Noise is incompressible, so file size follows the rate control: CRF 20 lands between a low
    # and a high target bitrate, and a bitrate encode ignores the crf field entirely.
    noise = np.random.default_rng(0).integers(0, 256, size=(30, H, W, 3), dtype=np.uint8)

    def size(name: str, settings: EncodeSettings) -> int:
        out = encode_clip(noise, FPS, tmp_path / f"{name}.mp4", settings)
        assert probe(out).frames == 30
        return out.stat().st_size

    low = size("low", EncodeSettings(bitrate="40k", preset="ultrafast"))
    low_crf40 = size("low40", EncodeSettings(bitrate="40k", crf=40, preset="ultrafast"))
    crf = size("crf", EncodeSettings(crf=20, preset="ultrafast"))
    high = size("high", EncodeSettings(bitrate="4000k", preset="ultrafast"))
    assert low * 2 < crf < high
    assert low == low_crf40


def test_read_frames_round_trips_shape_colour_and_order(tmp_path: Path) -> None:
    colour = (180, 90, 40)
    frames = solid(colour, 6)
    frames[3] = (20, 20, 20)  # one dark frame: its position shows frames come back in order
    decoded = read_frames(encode_clip(frames, FPS, tmp_path / "c.mp4", EncodeSettings(crf=10)))
    assert decoded.shape == (6, H, W, 3)
    assert decoded.dtype == np.uint8
    np.testing.assert_allclose(mean_rgb(decoded[0]), colour, atol=6)
    np.testing.assert_allclose(mean_rgb(decoded[3]), (20, 20, 20), atol=6)
    np.testing.assert_allclose(mean_rgb(decoded[5]), colour, atol=6)


def test_merge_cut_concatenates(clips: dict[str, Path], tmp_path: Path) -> None:
    short = encode_clip(solid(BLUE, 10), FPS, tmp_path / "short.mp4", EncodeSettings())
    out = merge_clips([clips["red"], short], tmp_path / "final.mp4", EncodeSettings(), fps=FPS).path
    info = probe(out)
    assert info.frames == FPS + 10
    assert info.duration == pytest.approx(1.0 + 10 / FPS)
    assert (info.codec, info.pix_fmt, info.faststart) == ("h264", "yuv420p", True)
    frames = read_frames(out)
    # A cut switches on the exact frame: the last red frame, then the first blue one.
    np.testing.assert_allclose(mean_rgb(frames[FPS - 1]), RED, atol=8)
    np.testing.assert_allclose(mean_rgb(frames[FPS]), BLUE, atol=8)


def test_merge_crossfade_overlaps_each_pair(clips: dict[str, Path], tmp_path: Path) -> None:
    xfade = 0.4
    out = merge_clips(
        [clips["red"], clips["green"], clips["blue"]],
        tmp_path / "final.mp4",
        EncodeSettings(),
        fps=FPS,
        transition="crossfade",
        crossfade_seconds=xfade,
    ).path
    info = probe(out)
    expected = 3 * 1.0 - 2 * xfade
    assert abs(info.duration - expected) <= 1 / FPS + 1e-9
    frames = read_frames(out)
    np.testing.assert_allclose(mean_rgb(frames[0]), RED, atol=8)
    np.testing.assert_allclose(mean_rgb(frames[-1]), BLUE, atol=8)
    # Halfway through the first transition (t = 1.0 - xfade/2) red and green are both on screen.
    r, g, _ = mean_rgb(frames[round((1.0 - xfade / 2) * FPS)])
    assert 70 < r < 160 and 70 < g < 160


@pytest.mark.parametrize("transition", ["cut", "crossfade"])
def test_merge_single_clip(clips: dict[str, Path], tmp_path: Path, transition: str) -> None:
    out = merge_clips([clips["green"]], tmp_path / "one.mp4", EncodeSettings(), fps=FPS, transition=transition).path
    assert probe(out).frames == FPS
    np.testing.assert_allclose(mean_rgb(read_frames(out)[FPS // 2]), GREEN, atol=8)


def test_merge_final_resolution_scales_and_letterboxes(clips: dict[str, Path], tmp_path: Path) -> None:
    same_aspect = probe(
        merge_clips([clips["red"]], tmp_path / "big.mp4", EncodeSettings(), fps=FPS, final_resolution=(128, 96)).path
    )
    assert (same_aspect.width, same_aspect.height) == (128, 96)
    square = merge_clips([clips["red"]], tmp_path / "sq.mp4", EncodeSettings(), fps=FPS, final_resolution=(96, 96)).path
    frame = read_frames(square)[0]
    assert frame.shape == (96, 96, 3)
    # 64x48 -> 96x72 keeps the aspect ratio; the 12-row bars above and below are black.
    assert frame[:8].max() < 20 and frame[-8:].max() < 20
    np.testing.assert_allclose(mean_rgb(frame[20:76]), RED, atol=8)


def test_merge_interpolate_fps_keeps_duration_at_new_rate(clips: dict[str, Path], tmp_path: Path) -> None:
    out = merge_clips(
        [clips["red"], clips["blue"]], tmp_path / "smooth.mp4", EncodeSettings(), fps=FPS, interpolate_fps=30
    ).path
    info = probe(out)
    assert info.fps == 30.0
    assert abs(info.frames - 60) <= 1  # 2 s at 30 fps; minterpolate alone would drop the tail
    assert info.duration == pytest.approx(2.0, abs=1 / 30)


def test_merge_brings_mismatched_clips_to_one_size_and_rate(clips: dict[str, Path], tmp_path: Path) -> None:
    other = encode_clip(solid(BLUE, 30, w=32, h=32), 30, tmp_path / "other.mp4", EncodeSettings())
    info = probe(merge_clips([clips["red"], other], tmp_path / "m.mp4", EncodeSettings(), fps=FPS).path)
    assert (info.width, info.height, info.fps) == (W, H, 15.0)
    assert info.frames == FPS + 15  # one second of 30 fps resampled to 15


def test_crossfade_longer_than_a_clip_is_refused(clips: dict[str, Path], tmp_path: Path) -> None:
    long = encode_clip(solid(RED, 2 * FPS), FPS, tmp_path / "long.mp4", EncodeSettings(preset="ultrafast"))
    out = tmp_path / "final.mp4"
    with pytest.raises(ValueError, match=r"green\.mp4 is 1\.000s long, shorter than the 1\.5s crossfade"):
        merge_clips(
            [long, clips["green"]], out, EncodeSettings(), fps=FPS, transition="crossfade", crossfade_seconds=1.5
        )
    assert not out.exists()


def test_failed_encode_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    # ffmpeg cannot pick a muxer for this suffix, so it fails after the temp file was created.
    out = tmp_path / "clip.notavideo"
    out.write_bytes(b"previous render")
    with pytest.raises(EncodeError, match="status") as err:
        encode_clip(solid(RED, 3), FPS, out, EncodeSettings())
    assert "notavideo" in str(err.value)  # the ffmpeg stderr tail is in the message
    assert out.read_bytes() == b"previous render"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.notavideo"]


def test_failed_merge_leaves_nothing_at_final_path(clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "final.notavideo"
    with pytest.raises(EncodeError):
        merge_clips([clips["red"]], out, EncodeSettings(), fps=FPS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "no frames"),
        (np.zeros((0, H, W, 3), np.uint8), "no frames"),
        (np.zeros((H, W, 3), np.uint8), r"\(N, H, W, 3\)"),
        ([np.zeros((H, W, 3), np.uint8), np.zeros((H, W + 8, 3), np.uint8)], "differs"),
        ([np.zeros((H, W, 4), np.uint8)], "H x W x 3"),
        ([np.zeros((H, W, 3), np.float32)], "uint8"),
        ([np.zeros((H + 1, W, 3), np.uint8)], "even"),
    ],
)
def test_bad_frames_raise_value_error(frames: object, message: str, tmp_path: Path) -> None:
    out = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=message):
        encode_clip(frames, FPS, out, EncodeSettings())  # type: ignore[arg-type]
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs", [{"crf": 52}, {"crf": -1}, {"preset": "warp"}, {"bitrate": "fast"}, {"bitrate": "10000 k"}]
)
def test_bad_settings_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EncodeSettings(**kwargs)  # type: ignore[arg-type]


def test_probe_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(EncodeError) as err:
        probe(junk)
    assert "junk.mp4" in err.value.stderr


def test_cuts_are_joined_by_stream_copy_and_only_crossfaded_runs_re_encoded(clips, tmp_path):
    """Clips at the film's rate are not encoded a second time: the concat demuxer copies their packets;
    a crossfade re-encodes only the clips it joins."""
    import hashlib

    three = [clips["red"], clips["green"], clips["blue"]]
    same = EncodeSettings(preset="ultrafast")  # the clips' own settings, as in a job
    cut = merge_clips(three, tmp_path / "cut.mp4", same, fps=FPS)
    assert cut.how == "stream copy"
    original = read_frames(clips["green"])
    assert np.array_equal(read_frames(cut.path)[FPS:2 * FPS], original)  # bit-identical pixels: never re-encoded
    mixed = merge_clips(three, tmp_path / "mixed.mp4", same, fps=FPS, transitions=["cut", "crossfade"],
                        crossfade_seconds=0.4)
    assert mixed.how == "stream copy; re-encoded 2 of 3 clips (crossfades)"
    info = probe(mixed.path)
    assert abs(info.frames - round((3 - 0.4) * FPS)) <= 1 and info.faststart
    assert np.array_equal(read_frames(mixed.path)[:FPS], read_frames(clips["red"]))  # the cut clip untouched
    scaled = merge_clips(three, tmp_path / "scaled.mp4", same, fps=FPS, final_resolution=(96, 96))
    assert scaled.how == "re-encoded"
    whole = merge_clips(three, tmp_path / "whole.mp4", EncodeSettings(), fps=FPS, transitions=["cut", "crossfade"],
                        crossfade_seconds=0.4)  # other settings than the clips': the film is encoded whole
    assert whole.how == "re-encoded" and abs(probe(whole.path).frames - round(2.6 * FPS)) <= 1
    assert hashlib.sha256(cut.path.read_bytes()).hexdigest() != hashlib.sha256(scaled.path.read_bytes()).hexdigest()


def test_a_boundary_per_transition(clips, tmp_path):
    with pytest.raises(ValueError, match="3 clips need 2 transitions"):
        merge_clips([clips["red"], clips["green"], clips["blue"]], tmp_path / "x.mp4", EncodeSettings(), fps=FPS,
                    transitions=["cut"])
