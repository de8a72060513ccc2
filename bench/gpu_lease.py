"""One GPU lease, one command: bench/gpu.py's runs in priority order, each time-boxed.

A lent GPU comes for about 15 minutes in all, start-up included (docs/gpu.md), so the whole measurement is one
scripted call. Each step is a `python -m bench.gpu` of its own with a deadline: a step that overruns
(a compile that takes too long, a hang) is killed and the next one still gets its time, and every
finished case is already appended to the outcomes file. At the end the outcomes become BENCHMARKS.md's
`gpu-<card>` section, written by bench/gpu.py as any run writes it.

    python -m bench.gpu_lease --out "$OUT" --budget 560      # on the GPU machine
    python -m bench.gpu_lease --out /tmp/lease --size tiny    # the same steps at tiny size on a CPU

Priority (issue 17): (a) the two anchors, SDXL 1024x1024 30 steps and SVD-XT 25 frames 1024x576 25
steps, at the high tier, eager then compiled, each profiled; (b) SDXL and SVD under each tier's memory
cap, and the OOM ladder; (c) FLUX.1, LTX-Video and Wan TI2V-5B at the high tier, a few steps each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import BENCHMARKS

MERGE_RESERVE_S = 40  # the section's FLOP table is counted on the meta device: seconds, not minutes
MIN_STEP_S = 25  # a step with less than this left is not started: it could not finish a case


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]
    budget_s: int  # the step's own cap; it also gets no more than what is left of the lease


STEPS = (
    # Eager first: a compile that overruns its box must not cost the eager rows.
    Step("anchors-eager", ("--families", "sdxl", "svd", "--runs", "anchor", "--compile", "off", "--profile"), 110),
    Step("anchors-compiled", ("--families", "sdxl", "svd", "--runs", "anchor", "--compile", "on", "--profile"), 230),
    Step("tiers", ("--families", "sdxl", "svd", "--runs", "tier", "ladder", "--compile", "off", "--steps", "5"), 140),
    # The whole card: FLUX.1's and Wan's weights alone are ~24 GB and ~21 GB in bf16, so under the high tier's
    # 24 GB cap the ladder offloads them and the host-side random init outlasts the box (the first lease).
    Step("flux", ("--families", "flux", "--runs", "tier", "--tiers", "high", "--compile", "off", "--steps", "4",
                  "--whole-card"), 70),
    Step("ltx", ("--families", "ltx", "--runs", "tier", "--tiers", "high", "--compile", "off", "--steps", "4"), 80),
    Step("wan", ("--families", "wan", "--runs", "tier", "--tiers", "high", "--compile", "off", "--steps", "3",
                 "--whole-card"), 100),
)


def ceilings(log: Path) -> dict[str, float | str]:
    """The card as found: its name, and the bf16 matrix rate and copy bandwidth measured here, the
    ceilings the utilisation figures are read against (the datasheet peak stays the MFU's denominator)."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "CPU"}
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12
    x = torch.randn(1 << 30, device="cuda", dtype=torch.float32)  # 4 GiB
    y = torch.empty_like(x)
    y.copy_(x)
    start.record()
    for _ in range(5):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    tbps = 5 * 2 * x.numel() * 4 / (start.elapsed_time(end) / 1000) / 1e12
    found = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
             "bf16_matmul_tflops": round(tflops, 1), "copy_tb_per_s": round(tbps, 2),
             "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    with log.open("a") as f:
        f.write(json.dumps(found) + "\n")
    del a, b, x, y
    torch.cuda.empty_cache()
    return found


def run_step(step: Step, size: str, outcomes: Path, log: Path, timeout_s: float) -> tuple[str, float]:
    command = [sys.executable, "-m", "bench.gpu", "--size", size, *step.args, "--jsonl", str(outcomes), "--no-write"]
    started = time.monotonic()
    with log.open("a") as f:
        f.write(f"\n=== {step.name}: {' '.join(command[1:])} (timeout {timeout_s:.0f} s)\n")
        f.flush()
        try:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            status = "timed out"
    return status, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where outcomes, the log and the section go")
    ap.add_argument("--budget", type=float, default=560, help="seconds for the whole lease, merge included")
    ap.add_argument("--size", choices=("auto", "real", "tiny"), default="auto")
    ap.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], help="only these steps")
    ap.add_argument("--keep", type=Path, nargs="*", default=[],
                    help="outcomes of an earlier lease to merge into the section with this one's")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone (the section goes to --out)")
    args = ap.parse_args(argv)

    deadline = time.monotonic() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes, log = args.out / "outcomes.jsonl", args.out / "lease.log"
    card = ceilings(log)
    print(json.dumps(card), flush=True)
    done: list[str] = []
    for step in STEPS:
        if args.steps and step.name not in args.steps:
            continue
        left = deadline - MERGE_RESERVE_S - time.monotonic()
        if left < MIN_STEP_S:
            done.append(f"{step.name}: skipped, {max(left, 0):.0f} s left")
            print(done[-1], flush=True)
            continue
        status, took = run_step(step, args.size, outcomes, log, min(step.budget_s, left))
        done.append(f"{step.name}: {status} in {took:.0f} s")
        print(done[-1], flush=True)
    with log.open("a") as f:
        f.write("\n" + "\n".join(done) + "\n")
    if not outcomes.exists():
        print("no outcomes: nothing to write")
        return 1
    note = "The lease's steps (bench/gpu_lease.py; each time-boxed, in priority order): " + "; ".join(done) + "."
    if "bf16_matmul_tflops" in card:
        note = (f"The card as found: {card['device']}, {card['memory_gib']} GiB, torch {card['torch']}; an 8192^3 "
                f"bf16 matmul measured {card['bf16_matmul_tflops']} TFLOP/s and a 4 GiB device copy "
                f"{card['copy_tb_per_s']} TB/s (read + write) here, the practical ceilings beside the datasheet "
                "peak that MFU is computed against.\n\n" + note)
    merge = [sys.executable, "-m", "bench.gpu", "--from-jsonl", *map(str, args.keep), str(outcomes), "--note", note,
             "--command", f"python -m bench.gpu_lease --out OUT --budget {args.budget:.0f}"]
    if args.no_write:
        merge.append("--no-write")
    with (args.out / "section.md").open("w") as f:
        code = subprocess.run(merge, stdout=f).returncode
    if not args.no_write:
        shutil.copy(BENCHMARKS, args.out / "BENCHMARKS.md")
    print("\n".join(done))
    return code


if __name__ == "__main__":
    sys.exit(main())
