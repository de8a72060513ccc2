"""FLUX.1 (Black Forest Labs), text-to-image: schnell (4 steps, no guidance, Apache-2.0) and dev
(guidance-distilled, about 50 steps at guidance 3.5, non-commercial licence).

FLUX has no negative prompt (its guidance is distilled into the model); sides are multiples of 16
(the VAE's 8 times the transformer's 2x2 patches).
"""

from __future__ import annotations

from typing import Any

from farm.families.base import Draft, Family, ShotInputs, Variant


class Flux(Family):
    name = "flux"
    title = "FLUX.1 (text-to-image)"
    prompt_encoder = ("tokenizer_2", 512)  # T5 reads the prompt (CLIP only its first 77 tokens, pooled)
    role = "keyframe"
    pipeline = "FluxPipeline"
    classes = ("FluxPipeline",)
    takes_negative_prompt = False
    variants = {
        "schnell": Variant(
            "schnell", "FLUX.1 [schnell]", hub=(r"flux\.?1?-schnell", r"schnell"), licence="Apache-2.0",
            commercial=True, size=(1024, 1024), multiple=16, steps={"balanced": 4}, guidance=0.0, distilled=True,
            repo="black-forest-labs/FLUX.1-schnell", size_gb=34, weights_gb=33.72,
            pipeline={"max_sequence_length": 256}),
        "dev": Variant(
            "dev", "FLUX.1 [dev]", hub=(r"flux",), licence="FLUX.1 [dev] Non-Commercial License", commercial=False,
            size=(1024, 1024), multiple=16, steps={"high": 50, "balanced": 40, "fast": 28}, guidance=3.5,
            repo="black-forest-labs/FLUX.1-dev", size_gb=34, weights_gb=33.72,
            note="accept the FLUX.1 [dev] licence on the hub first",
            pipeline={"max_sequence_length": 512}),
    }
    default_variant = "schnell"
    draft = Draft("FLUX.1 [schnell]", "variant", steps=4, guidance=0.0, variant="schnell")
    step_cache = True
    identity_methods = ("ip_adapter",)  # XLabs' FLUX IP-Adapter with its CLIP ViT-L/14 image encoder
    # 12B transformer + T5-XXL: a 24 GB card needs the models offloaded between calls; below that,
    # leaf-level group offload and fp8 storage of the transformer.
    tier_knobs = {"high": frozenset(), "mid": frozenset({"cpu_offload", "vae_tiling"}),
                  "low": frozenset({"group_offload", "vae_tiling", "fp8_storage"}), "cpu": frozenset()}
    ladder = (frozenset({"vae_tiling"}), frozenset({"cpu_offload"}), frozenset({"group_offload"}),
              frozenset({"fp8_storage"}))

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        v = self.variant(variant)
        return {"prompt": inputs.prompt, "width": inputs.width, "height": inputs.height,
                "num_inference_steps": inputs.steps,
                "guidance_scale": self.guidance(inputs, variant), **v.pipeline, "seed": inputs.seed}


FAMILY = Flux()
