"""SD 3.5's GPU half: the tiny offline build (two CLIP encoders with projection, a T5, an MMDiT)."""

from __future__ import annotations

from typing import Any

from farm.gpu.families.base import GpuFamily
from farm.gpu.tiny import build_t5_tokenizer, build_tokenizer, flow_vae, in_eval, seeded, t5_encoder, text_config


class SD3Gpu(GpuFamily):
    name = "sd3"

    def build_tiny(self, variant: str) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        with seeded():
            transformer = SD3Transformer2DModel(
                sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32,
                joint_attention_dim=64,  # the T5's width: at least the two CLIP widths together
                pooled_projection_dim=64,  # the two CLIP projections concatenated
                pos_embed_max_size=16, qk_norm="rms_norm")  # SD 3.5's
            text_encoder = CLIPTextModelWithProjection(text_config(projection_dim=32)).eval()
            text_encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim=32)).eval()
            text_encoder_3 = t5_encoder(64)
            vae = flow_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE factors
        return in_eval(StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=text_encoder, tokenizer=build_tokenizer(), text_encoder_2=text_encoder_2,
            tokenizer_2=build_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=build_t5_tokenizer(),
            image_encoder=None, feature_extractor=None))


GPU = SD3Gpu()
