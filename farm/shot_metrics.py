"""A shot's quality metrics, measured on the CPU from its frames (no weights): what `farm.qc` judges.

Sources of the definitions (docs/qc.md has the table with the thresholds and their reasons):
- flicker: VBench's temporal flickering score, (255 - mean |frame[t+1] - frame[t]|) / 255, 1 = still.
- frozen: ffmpeg `freezedetect` (noise -60 dB, i.e. a mean difference under 0.1 % of full scale).
- black: ffmpeg `blackdetect` (pixel black under 10 % luma, frame black when 98 % of it is).
- saturation: the seed's checklist, "colours not over-saturated": HSV saturation, mean and 99th pct.
- flow: OpenCV's Farneback optical flow at a reduced size; SSIM: scikit-image's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from skimage.metrics import structural_similarity

FLOW_WIDTH = 160  # Farneback on frames brought to this width: motion amount, not detail, is wanted
SSIM_WIDTH = 256
FROZEN_DIFF = 0.001  # freezedetect's -60 dB: mean |difference| below 0.1 % of full scale
BLACK_LUMA, BLACK_SHARE = 0.10, 0.98  # blackdetect's pix_th and pic_th


def _resize(frame: np.ndarray, width: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if w <= width:
        return frame
    return cv2.resize(frame, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def _gray(frames: np.ndarray, width: int) -> list[np.ndarray]:
    return [cv2.cvtColor(_resize(f, width), cv2.COLOR_RGB2GRAY) for f in frames]


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean |frame[t+1] - frame[t]| per consecutive pair, 0-255."""
    if len(frames) < 2:
        return np.zeros(0)
    f = frames.astype(np.int16)
    return np.abs(f[1:] - f[:-1]).reshape(len(frames) - 1, -1).mean(axis=1)


def flow_magnitudes(frames: np.ndarray) -> np.ndarray:
    """Mean Farneback optical-flow magnitude per consecutive pair, in pixels at FLOW_WIDTH."""
    gray = _gray(frames, FLOW_WIDTH)
    out = []
    for a, b in zip(gray, gray[1:], strict=False):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        out.append(float(np.linalg.norm(flow, axis=2).mean()))
    return np.array(out)


def _longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def measure(frames: np.ndarray, start: np.ndarray | None = None, seams: Sequence[int] = ()) -> dict[str, Any]:
    """Every metric of a shot. frames: (T, H, W, 3) uint8 RGB; start: the image the shot starts from
    (its keyframe, the user's image, the previous shot's last frame), any size; seams: frame indices
    where a new model call's frames begin. Also returns the per-pair curves the report plots."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, not {frames.shape}")
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    n = len(frames)
    diffs = frame_differences(frames)
    flows = flow_magnitudes(frames)
    gray = _gray(frames, SSIM_WIDTH)
    ssims = np.array([structural_similarity(a, b, data_range=255) for a, b in zip(gray, gray[1:], strict=False)])
    frozen_pairs = _longest_run(diffs < FROZEN_DIFF * 255)
    luma = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).reshape(n, -1)
    black = (luma < BLACK_LUMA * 255).mean(axis=1) >= BLACK_SHARE
    hsv_s = np.stack([cv2.cvtColor(_resize(f, SSIM_WIDTH), cv2.COLOR_RGB2HSV)[..., 1] for f in frames]) / 255.0
    median_diff = float(np.median(diffs)) if len(diffs) else 0.0
    seam_jumps = [float(diffs[s - 1]) / max(median_diff, 1.0) for s in seams if 0 < s < n]
    drift = None
    if start is not None:
        first = frames[0]
        image = cv2.resize(np.ascontiguousarray(start[..., :3], dtype=np.uint8), (first.shape[1], first.shape[0]),
                           interpolation=cv2.INTER_AREA)
        drift = float(np.abs(first.astype(np.int16) - image.astype(np.int16)).mean() / 255)
    median_flow = float(np.median(flows)) if len(flows) else 0.0
    return {
        "frames": n,
        "flicker": float((255 - diffs.mean()) / 255) if len(diffs) else 1.0,
        "ssim_min": float(ssims.min()) if len(ssims) else 1.0,
        "ssim_mean": float(ssims.mean()) if len(ssims) else 1.0,
        "flow_mean": float(flows.mean()) if len(flows) else 0.0,
        "flow_jump": float(flows.max() / max(median_flow, 0.05)) if len(flows) else 0.0,
        "frozen": (frozen_pairs + 1) / n if frozen_pairs else 0.0,
        "black": float(black.mean()),
        "saturation": float(hsv_s.mean()),
        "saturation_p99": float(np.percentile(hsv_s, 99)),
        "drift": drift,
        "seam": max(seam_jumps) if seam_jumps else None,
        "curves": {"difference": [round(float(d), 3) for d in diffs], "flow": [round(float(f), 4) for f in flows]},
    }
