"""Stable Diffusion 3.5 (Stability AI), text-to-image: medium, large and large turbo.

Three text encoders (two CLIP, one T5) and an MMDiT; sides are multiples of 16. Defaults from the
model cards: medium 40 steps at guidance 4.5, large 28 at 3.5, turbo 4 steps without guidance.
"""

from __future__ import annotations

from typing import Any

from farm.families.base import Family, ShotInputs, Variant

LICENCE = "Stability AI Community License (commercial use free under USD 1M annual revenue; check it)"


class SD3(Family):
    name = "sd3"
    title = "Stable Diffusion 3.5 (text-to-image)"
    prompt_encoder = ("tokenizer_3", 256)  # T5 at the pipeline's max_sequence_length (the CLIPs stop at 77)
    # InstantX/SD3.5-Large-IP-Adapter (SigLIP so400m image encoder): diffusers loads one adapter per call
    identity_methods = ("ip_adapter",)
    identity_per_shot = 1
    role = "keyframe"
    pipeline = "StableDiffusion3Pipeline"
    classes = ("StableDiffusion3Pipeline",)
    variants = {
        "large-turbo": Variant(
            "large-turbo", "SD 3.5 Large Turbo", hub=(r"stable-diffusion-3\.5-large-turbo", r"sd3.*turbo"),
            licence=LICENCE, commercial=False, size=(1024, 1024), multiple=16, steps={"balanced": 4}, guidance=0.0,
            distilled=True, repo="stabilityai/stable-diffusion-3.5-large-turbo", size_gb=28),
        "large": Variant(
            "large", "SD 3.5 Large", hub=(r"stable-diffusion-3\.5-large", r"sd3.*large"), licence=LICENCE,
            commercial=False, size=(1024, 1024), multiple=16, steps={"high": 40, "balanced": 28, "fast": 20},
            guidance=3.5, repo="stabilityai/stable-diffusion-3.5-large", size_gb=28),
        "medium": Variant(
            "medium", "SD 3.5 Medium", hub=(r"stable-diffusion-3", r"sd3"), licence=LICENCE, commercial=False,
            size=(1024, 1024), multiple=16, steps={"high": 50, "balanced": 40, "fast": 28}, guidance=4.5,
            repo="stabilityai/stable-diffusion-3.5-medium", size_gb=12),
    }
    default_variant = "medium"
    tier_knobs = {"high": frozenset(), "mid": frozenset({"vae_slicing"}),
                  "low": frozenset({"cpu_offload", "vae_slicing", "vae_tiling"}), "cpu": frozenset()}
    ladder = (frozenset({"vae_slicing", "vae_tiling"}), frozenset({"cpu_offload"}), frozenset({"fp8_storage"}))

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        return {"prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "width": inputs.width,
                "height": inputs.height, "num_inference_steps": inputs.steps,
                "guidance_scale": self.guidance(inputs, variant), "max_sequence_length": 256, "seed": inputs.seed}


FAMILY = SD3()
