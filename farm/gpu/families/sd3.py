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

    # InstantX's SD 3.5 Large IP-Adapter through diffusers' SD3IPAdapterMixin: SigLIP's penultimate
    # hidden states through a timestep-aware perceiver, one adapter only (one character per shot).

    def tiny_image_encoder(self) -> tuple[Any, Any, int]:
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        from farm.gpu.identity import TINY_IMAGE_EMBED_DIM as width

        with seeded():
            encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=64, patch_size=16))
        return encoder, SiglipImageProcessor(size={"height": 64, "width": 64}), width

    def image_encoder(self, folder: str, dtype: Any) -> tuple[Any, Any]:
        from transformers import SiglipImageProcessor, SiglipVisionModel

        return (SiglipVisionModel.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype),
                SiglipImageProcessor.from_pretrained(folder, local_files_only=True))

    def tiny_ip_adapter(self, pipe: Any, image_embed_dim: int) -> dict[str, dict[str, Any]]:
        from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
        from diffusers.models.embeddings import IPAdapterTimeImageProjection

        config = pipe.transformer.config
        inner, hidden = config.attention_head_dim * config.num_attention_heads, 64
        with seeded():  # diffusers' own layout (its converter renames only InstantX's original keys)
            proj = IPAdapterTimeImageProjection(embed_dim=image_embed_dim, output_dim=inner, hidden_dim=hidden,
                                                heads=1, num_queries=8, timestep_in_dim=32).state_dict()
            layers = {f"{i}.{k}": v for i, _name in enumerate(pipe.transformer.attn_processors)
                      for k, v in SD3IPAdapterJointAttnProcessor2_0(
                          inner, inner, config.attention_head_dim, timesteps_emb_dim=hidden).state_dict().items()}
        return {"image_proj": proj, "ip_adapter": layers}

    def load_ip_adapter(self, pipe: Any, weights: list[Any], folders: list[str], names: list[str]) -> None:
        if len(weights) != 1:
            raise ValueError("SD 3.5 takes one IP-Adapter: one character per shot")
        pipe.load_ip_adapter(weights[0], weight_name=names[0] or "ip-adapter.safetensors",
                             subfolder=folders[0] or None, image_encoder_folder=None, local_files_only=True)

    def reference_embeds(self, pipe: Any, images: list[Any], device: str) -> Any:
        """SigLIP's penultimate hidden states of each photo, averaged (the adapter reads one image),
        zeros as the unconditional half, as the pipeline makes it."""
        import torch

        positive = pipe.encode_image(images, device).mean(dim=0, keepdim=True)
        return torch.cat([torch.zeros_like(positive), positive])

    def set_ip_adapter_scales(self, pipe: Any, scales: list[float]) -> None:
        pipe.set_ip_adapter_scale(scales[0])

    def ip_adapter_kwargs(self, embeds: list[Any], cfg: bool) -> dict[str, Any]:
        (one,) = embeds
        return {"ip_adapter_image_embeds": one if cfg else one.chunk(2)[1]}


GPU = SD3Gpu()
