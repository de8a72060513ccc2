"""What quality control costs: seconds to measure one shot (farm.shot_metrics.measure) on this CPU.

    python -m bench.qc [--frames 25] [--size 1024x576] [--repeat 5]

A shot of 1024x576 x 25 frames (the seeds' SVD-XT call) is measured `repeat` times, each metric's
share timed alone beside the whole, and the per-frame cost is written beside the simulator's
QC_FRAME_S. As a fraction of the render: only where BENCHMARKS.md has a measured GPU figure for that
shot (none yet: bench/gpu.py has not run on a GPU); the share against this machine's own CPU render
of the same shot is not a figure anyone renders at, so it is not given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from bench.report import table, write_section
from farm.shot_metrics import flow_magnitudes, frame_differences, measure
from farm.sim.costs import QC_FRAME_S


def clip(frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A pan over a soft random texture, with a little noise: real-looking work for every metric."""
    rng = np.random.default_rng(seed)
    tex = cv2.resize((rng.random((height // 16, width // 8, 3)) * 255).astype(np.uint8), (width * 2, height),
                     interpolation=cv2.INTER_CUBIC)
    out = np.stack([tex[:, 4 * t:4 * t + width] for t in range(frames)]).astype(np.int16)
    return np.clip(out + rng.integers(-6, 6, out.shape), 0, 255).astype(np.uint8)


def timed(fn, repeat: int) -> float:  # noqa: ANN001 - any zero-argument callable
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", default="1024x576")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    frames = clip(args.frames, width, height)
    start = frames[0]
    whole = timed(lambda: measure(frames, start, seams=[args.frames // 2]), args.repeat)
    parts = {"frame differences (flicker, frozen, seam)": timed(lambda: frame_differences(frames), args.repeat),
             "optical flow (Farneback at 160 px)": timed(lambda: flow_magnitudes(frames), args.repeat)}
    per_frame = whole / args.frames
    rows = [{"what": f"measure() on {width}x{height} x {args.frames} frames", "seconds (median)": f"{whole:.3f}",
             "per frame": f"{per_frame * 1000:.1f} ms"}]
    rows += [{"what": name, "seconds (median)": f"{s:.3f}", "per frame": f"{s / args.frames * 1000:.1f} ms"}
             for name, s in parts.items()]
    body = (table(rows) + "\n\n"
            f"The simulator charges QC_FRAME_S = {QC_FRAME_S * 1000:.0f} ms per frame (farm/sim/costs.py); measured "
            f"here: {per_frame * 1000:.1f} ms ({per_frame / QC_FRAME_S:.2f}x). QC runs on the encoder side, so it "
            "never holds a GPU; as a share of a GPU render it needs a measured GPU figure for the same shot, "
            "and BENCHMARKS.md has none yet (issue 17 had no GPU lent), so no share is given.")
    print(body)
    if not args.no_write:
        write_section("qc", "Quality control: seconds per shot on the CPU (issue 14)",
                      f"python -m bench.qc --frames {args.frames} --size {args.size} --repeat {args.repeat}", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
