"""Draft renders: the same storyboard at a fraction of the cost, to check timing, cuts and chaining."""

from __future__ import annotations

from farm.manifest import Manifest, Steps
from farm.presets import PREVIEW_STEPS, preview_size


def preview(manifest: Manifest, multiple: int = 8) -> Manifest:
    """Long side 256 px (sides multiples of `multiple`, what the job's model families need),
    PREVIEW_STEPS steps everywhere, no final upscale; shots, durations, fps, seeds, transitions and
    chaining are untouched, so the draft cuts exactly like the real film."""
    width, height = preview_size(*manifest.output.size, multiple=multiple)
    steps = Steps(keyframe=PREVIEW_STEPS, video=PREVIEW_STEPS)
    return manifest.model_copy(update={
        "steps": steps,
        "output": manifest.output.model_copy(update={"resolution": f"{width}x{height}", "final_resolution": None}),
        "shots": [shot.model_copy(update={"steps": None}) for shot in manifest.shots],
    })
