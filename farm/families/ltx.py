"""LTX-Video 0.9.x (Lightricks), image-to-video with a prompt, at 25 fps.

Frame counts are 8k+1 and sides multiples of 32 (the VAE compresses 8 frames and 32x32 pixels per
latent). The distilled checkpoints run at guidance 1 in 8 steps; the others about 40 steps at
guidance 3. `decode_timestep`/`decode_noise_scale` are the model card's values for the 0.9.1+
timestep-conditioned VAE (ignored by 0.9.0's).
"""

from __future__ import annotations

from typing import Any

from farm.families.base import Draft, Family, ShotInputs, Variant

LICENCE = "LTX-Video open weights licence (OpenRAIL-M; commercial use allowed with use restrictions)"


class LTX(Family):
    name = "ltx"
    title = "LTX-Video (image-to-video)"
    prompt_encoder = ("tokenizer", 128)  # T5 at the pipeline's max_sequence_length
    role = "video"
    pipeline = "LTXImageToVideoPipeline"
    classes = ("LTXImageToVideoPipeline", "LTXPipeline", "LTXConditionPipeline")
    frame_step = 8
    min_frames = 9
    tiny_frames = 9
    decode_only = ("decode_timestep", "decode_noise_scale")  # the timestep-conditioned VAE's decode noise
    variants = {
        "distilled": Variant(
            "distilled", "LTX-Video 0.9.x distilled", hub=(r"ltx.*distilled",), licence=LICENCE, commercial=True,
            repo="Lightricks/LTX-Video-0.9.7-distilled", size_gb=28, frames_per_call=121, fps=25,
            size=(768, 512), multiple=32, steps={"balanced": 8}, guidance=1.0, distilled=True),
        "dev": Variant(
            "dev", "LTX-Video 0.9.x", hub=(r"ltx",), licence=LICENCE, commercial=True, repo="Lightricks/LTX-Video",
            size_gb=28, weights_gb=15.87,
            frames_per_call=121, fps=25, size=(768, 512), multiple=32, steps={"high": 50, "balanced": 40, "fast": 30},
            guidance=3.0),
    }
    default_variant = "dev"
    # An H200, eager, 768x512x121 frames (BENCHMARKS.md "GPU stages at real size: NVIDIA H200"): 0.177 s
    # per step and 0.30 s of decode, per frame at 1024x576 (x 1.5 pixels).
    measured_rates = {"high": {"video": 0.002194215, "decode": 0.003719008}}
    draft = Draft("LTX-Video distilled", "variant", steps=8, guidance=1.0, variant="distilled")
    step_cache = True
    tier_knobs = {"high": frozenset(), "mid": frozenset({"vae_tiling"}),
                  "low": frozenset({"cpu_offload", "vae_tiling"}), "cpu": frozenset()}
    ladder = (frozenset({"vae_tiling", "vae_slicing"}), frozenset({"cpu_offload"}), frozenset({"fp8_storage"}))

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        return {"prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "width": inputs.width,
                "height": inputs.height, "num_frames": inputs.frames, "frame_rate": self.variant(variant).fps,
                "num_inference_steps": inputs.steps, "guidance_scale": self.guidance(inputs, variant),
                "decode_timestep": 0.05, "decode_noise_scale": 0.025, "seed": inputs.seed}


FAMILY = LTX()
