"""Draft renders: the same storyboard at a fraction of the cost, to check timing, cuts and chaining."""

from __future__ import annotations

from farm.manifest import Manifest, Steps
from farm.presets import PREVIEW_STEPS, preview_size


def preview(manifest: Manifest, multiple: int = 8) -> Manifest:
    """Long side 256 px (sides multiples of `multiple`, what the job's model families need),
    PREVIEW_STEPS steps everywhere, no final upscale; shots, durations, fps, seeds, transitions and
    chaining are untouched, so the draft cuts exactly like the real film."""
    width, height = preview_size(*manifest.output.size, multiple=multiple)
    output = {"resolution": f"{width}x{height}", "final_resolution": None}
    if manifest.output.keyframe_resolution:  # shrunk by the same factor as the video
        scale = width / manifest.output.size[0]
        kw, kh = manifest.output.keyframe_size
        output["keyframe_resolution"] = f"{max(32, round(kw * scale / 8) * 8)}x{max(32, round(kh * scale / 8) * 8)}"
    steps = Steps(keyframe=PREVIEW_STEPS, video=PREVIEW_STEPS)
    return manifest.model_copy(update={
        "steps": steps,
        "output": manifest.output.model_copy(update=output),
        "shots": [shot.model_copy(update={"steps": None}) for shot in manifest.shots],
    })
