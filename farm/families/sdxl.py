"""SDXL: the seed's keyframe model (docs/sources.md section 1), text-to-image.

DPM++ 2M Karras, CFG 7.5, guidance rescale 0.7, the quality template's steps (50/40/30): exactly
the seed's settings. Any keyframe hub id no other family recognises is taken as SDXL-class; the
loader checks the pipeline class.
"""

from __future__ import annotations

from typing import Any

from farm.families.base import Draft, Family, ShotInputs, Variant
from farm.presets import GUIDANCE_SCALE, QUALITY_TEMPLATES


class SDXL(Family):
    name = "sdxl"
    title = "SDXL (text-to-image)"
    role = "keyframe"
    pipeline = "StableDiffusionXLPipeline"
    classes = ("StableDiffusionXLPipeline",)
    single_file = "stabilityai/stable-diffusion-xl-base-1.0"
    default = True
    fallback = True
    # docs/sources.md section 3: LCM-LoRA distils CFG into the model, 4-8 steps at CFG 1-2 (the LoRA:
    # latent-consistency/lcm-lora-sdxl, named in the farm config as models.paths.lcm).
    draft = Draft("LCM-LoRA (latent-consistency/lcm-lora-sdxl)", "lora", steps=4, guidance=1.5,
                  scheduler="LCMScheduler")
    channels_last = True
    # h94/IP-Adapter's SDXL adapters; InstantID (IdentityNet + its face adapter), as the seeds draw keyframes
    identity_methods = ("ip_adapter", "instantid")
    embeddings = True  # textual inversions, one vector set per CLIP text encoder (clip_l, clip_g)
    variants = {"base": Variant(
        "base", "SDXL base 1.0", hub=(r"xl", r"sdxl"), licence="CreativeML Open RAIL++-M", commercial=True,
        repo="stabilityai/stable-diffusion-xl-base-1.0", size_gb=7, weights_gb=6.94,
        size=(1024, 1024), steps={q: t.keyframe_steps for q, t in QUALITY_TEMPLATES.items()},
        guidance=GUIDANCE_SCALE)}
    default_variant = "base"

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        return {"prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "width": inputs.width,
                "height": inputs.height, "num_inference_steps": inputs.steps,
                "guidance_scale": self.guidance(inputs, variant), "guidance_rescale": inputs.guidance_rescale,
                "seed": inputs.seed}


FAMILY = SDXL()
