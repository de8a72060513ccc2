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

    # XLabs' FLUX IP-Adapter (XLabs-AI/flux-ip-adapter, CLIP ViT-L/14 image encoder), through diffusers'
    # FluxIPAdapterMixin: an image projection to 4 tokens, and K/V weights per double-stream block.

    def tiny_ip_adapter(self, pipe: Any, image_embed_dim: int) -> dict[str, dict[str, Any]]:
        import torch
        from diffusers.models.embeddings import ImageProjection

        transformer = pipe.transformer
        cross, hidden = transformer.config.joint_attention_dim, transformer.inner_dim
        layers: dict[str, Any] = {}
        with seeded():
            blocks = [n for n in transformer.attn_processors if not n.startswith("single_transformer_blocks")]
            for key_id, _name in enumerate(blocks):
                for kv in ("to_k_ip", "to_v_ip"):
                    linear = torch.nn.Linear(cross, hidden)
                    layers[f"{key_id}.{kv}.weight"] = linear.weight.detach()
                    layers[f"{key_id}.{kv}.bias"] = linear.bias.detach()
            proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=image_embed_dim,
                                   num_image_text_embeds=4).state_dict()
        image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                      "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
        return {"image_proj": image_proj, "ip_adapter": layers}

    def load_ip_adapter(self, pipe: Any, weights: list[Any], folders: list[str], names: list[str]) -> None:
        pipe.load_ip_adapter(weights, subfolder=folders, weight_name=names,
                             image_encoder_pretrained_model_name_or_path=None, local_files_only=True)

    def reference_embeds(self, pipe: Any, images: list[Any], device: str) -> Any:
        """FLUX encodes no unconditional half: its pipeline's negative is a black image's embedding
        (used with true CFG), here repeated per photo so both halves stack (attention over identical
        tokens is the same as over one)."""
        import numpy as np
        import torch

        (positive,) = pipe.prepare_ip_adapter_image_embeds([images], None, device, 1)
        (black,) = pipe.prepare_ip_adapter_image_embeds([[np.zeros((64, 64, 3), np.uint8)]], None, device, 1)
        return torch.cat([black.expand_as(positive), positive])

    def ip_adapter_kwargs(self, embeds: list[Any], cfg: bool) -> dict[str, Any]:
        return {"ip_adapter_image_embeds": [e[1:2] for e in embeds],
                "negative_ip_adapter_image_embeds": [e[0:1] for e in embeds]}


GPU = FluxGpu()
