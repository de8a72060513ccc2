"""Bringing a picture to a size without stretching it: centre-crop (the default) or pad.

Used for users' own keyframes (another aspect ratio than the film), for keyframes a family renders a
little larger than asked (FLUX and SD3 need multiples of 16: 1920x1080 is drawn at 1920x1088 and
cropped), and for video frames a tier renders smaller than the film (I2VGen-XL below 16 GB).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import PIL.Image

Fit = Literal["crop", "pad"]


def fit_image(image: np.ndarray, size: tuple[int, int], fit: Fit = "crop") -> np.ndarray:
    """An HxWx3 uint8 image at `size` (width, height), scaled with Lanczos to cover it and centre-cropped
    (`crop`), or to fit inside it and centred on black (`pad`). The same aspect ratio just resizes."""
    width, height = size
    if image.shape[1] == width and image.shape[0] == height:
        return image
    src = PIL.Image.fromarray(image)
    scale = (max if fit == "crop" else min)(width / src.width, height / src.height)
    scaled = src.resize((max(1, round(src.width * scale)), max(1, round(src.height * scale))),
                        PIL.Image.Resampling.LANCZOS)
    if fit == "crop":
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return np.asarray(scaled.crop((left, top, left + width, top + height)))
    canvas = PIL.Image.new("RGB", (width, height))
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return np.asarray(canvas)


def fit_frames(frames: np.ndarray, size: tuple[int, int] | None, fit: Fit = "crop") -> np.ndarray:
    """Every frame of (N, H, W, 3) brought to `size` (unchanged when already there, or no size given)."""
    if size is None or (frames.shape[2] == size[0] and frames.shape[1] == size[1]):
        return frames
    return np.stack([fit_image(frame, size, fit) for frame in frames])
