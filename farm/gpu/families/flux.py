"""FLUX.1's GPU half: the tiny offline build (schnell without, dev with guidance embeddings)."""

from __future__ import annotations

from typing import Any

from farm.gpu.families.base import GpuFamily
from farm.gpu.tiny import build_t5_tokenizer, build_tokenizer, flow_vae, in_eval, seeded, t5_encoder, text_config


class FluxGpu(GpuFamily):
    name = "flux"

    def build_tiny(self, variant: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel

        with seeded():
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64,  # 16 latent channels packed 2x2
                num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32,  # the T5's width
                pooled_projection_dim=32,  # the CLIP's pooled width
                guidance_embeds=variant != "schnell",  # dev is guidance-distilled; schnell takes none
                axes_dims_rope=(4, 4, 8))  # must sum to attention_head_dim
            text_encoder = CLIPTextModel(text_config()).eval()
            text_encoder_2 = t5_encoder(32)
            vae = flow_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's VAE factors
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        return in_eval(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=build_tokenizer(), text_encoder_2=text_encoder_2,
                                    tokenizer_2=build_t5_tokenizer(), transformer=transformer, image_encoder=None,
                                    feature_extractor=None))


GPU = FluxGpu()
