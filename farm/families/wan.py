"""Wan 2.x (Alibaba), image-to-video with a prompt: Wan 2.2 TI2V-5B (121 frames at 24 fps, the
default), Wan 2.1 I2V-14B (81 frames at 16 fps) and Wan 2.2 I2V-A14B (two 14B experts split by
`boundary_ratio`). All Apache-2.0.

Frame counts are 4k+1 (the VAE packs 4 frames per latent after the first); the model generates at
its own rate and the merge brings each clip to the film's. Memory from the published needs: TI2V-5B
fits about 24 GB with model offload; the 14B models about 13 GB with leaf-level group offload on CUDA
streams; below that the transformer is stored in fp8 (layerwise casting), the low tier's last rung.
Wan's VAE tiles and slices (AutoencoderKLWan in diffusers 0.42), so there is no decode chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from farm.families.base import Draft, Family, ShotInputs, Variant
from farm.presets import Tier

STEPS = {"high": 50, "balanced": 40, "fast": 30}


class Wan(Family):
    name = "wan"
    title = "Wan 2.x (image-to-video)"
    prompt_encoder = ("tokenizer", 512)  # umT5 at the pipeline's max_sequence_length
    role = "video"
    pipeline = "WanImageToVideoPipeline"
    classes = ("WanImageToVideoPipeline", "WanPipeline")  # TI2V-5B is published as a WanPipeline
    frame_step = 4
    min_frames = 5
    tiny_frames = 9
    variants = {
        "ti2v-5b": Variant(
            "ti2v-5b", "Wan 2.2 TI2V-5B", hub=(r"wan2\.2-ti2v", r"ti2v"), licence="Apache-2.0", commercial=True,
            repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers", size_gb=34, weights_gb=22.77, frames_per_call=121, fps=24,
            size=(1280, 704), multiple=32, steps=STEPS, guidance=5.0, pipeline={"expand_timesteps": True}),
        "a14b": Variant(
            "a14b", "Wan 2.2 I2V-A14B (two experts)", hub=(r"wan2\.2-i2v-a14b", r"a14b"), licence="Apache-2.0",
            commercial=True, repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers", size_gb=70, frames_per_call=81,
            fps=16, size=(1280, 720), multiple=16, steps=STEPS, guidance=3.5,
            pipeline={"boundary_ratio": 0.9, "guidance_scale_2": 3.5}),
        "i2v-14b": Variant(
            "i2v-14b", "Wan 2.1 I2V-14B", hub=(r"wan2\.1", r"wan"), licence="Apache-2.0", commercial=True,
            repo="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", size_gb=65, frames_per_call=81, fps=16,
            size=(832, 480), multiple=16, steps=STEPS, guidance=5.0),
    }
    default_variant = "ti2v-5b"
    # A step-distillation LoRA (e.g. lightx2v's Wan step-distill LoRAs): 4 steps at CFG 1.
    draft = Draft("Wan step-distillation LoRA", "lora", steps=4, guidance=1.0)
    step_cache = True
    ladder = (frozenset({"vae_tiling", "vae_slicing"}), frozenset({"group_offload"}), frozenset({"fp8_storage"}))

    def variant_of_folder(self, index: Mapping[str, Any], path: Path) -> str | None:
        if index.get("expand_timesteps"):
            return "ti2v-5b"
        if (index.get("transformer_2") or [None])[0]:
            return "a14b"
        return super().variant_of_folder(index, path)

    def knobs(self, tier: Tier, variant: str | None = None) -> Any:
        big = self.variant(variant).name != "ti2v-5b"
        on = {"high": set(), "mid": {"group_offload"} if big else {"cpu_offload"},
              "low": {"group_offload", "fp8_storage"}, "cpu": set()}[tier]
        return super().knobs("cpu").with_on(frozenset(on | ({"vae_tiling"} if tier != "cpu" else set())))

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        v = self.variant(variant)
        params = {"prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "width": inputs.width,
                  "height": inputs.height, "num_frames": inputs.frames, "num_inference_steps": inputs.steps,
                  "guidance_scale": self.guidance(inputs, variant), "seed": inputs.seed}
        if "guidance_scale_2" in v.pipeline:  # the low-noise expert's guidance (Wan 2.2 A14B)
            params["guidance_scale_2"] = v.pipeline["guidance_scale_2"]
        return params


FAMILY = Wan()
