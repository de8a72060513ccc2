"""Wan 2.x's GPU half: loading any variant as WanImageToVideoPipeline (TI2V-5B is published as a
WanPipeline; with expand_timesteps the image-to-video pipeline conditions on the first latent frame
with the same weights), and tiny offline builds of each variant."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from farm.gpu.families.base import GpuFamily
from farm.gpu.tiny import build_t5_tokenizer, in_eval, seeded, t5_encoder


def _scheduler(flow_shift: float) -> Any:
    # What the official *-Diffusers repos ship.
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=flow_shift)


def _transformer(channels_in: int, channels_out: int, image_dim: int | None) -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels_in,
        out_channels=channels_out, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim)


class WanGpu(GpuFamily):
    name = "wan"

    def decode(self, pipe: Any, latents: torch.Tensor, params: Mapping[str, Any],
               generator: torch.Generator) -> torch.Tensor:
        # As WanImageToVideoPipeline does after its loop (diffusers 0.42): un-normalise, decode whole.
        vae = pipe.vae
        lat = self._on_vae(pipe, latents)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(lat.device, lat.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(lat.device, lat.dtype)
        video = vae.decode(lat / inv_std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt")[0]

    def build_tiny(self, variant: str) -> Any:
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        image_processor = image_encoder = transformer_2 = None
        with seeded():
            text_encoder = t5_encoder(32, umt5=True)
            if variant == "ti2v-5b":
                # Wan 2.2's VAE: 48 latent channels, 2x2 pixel patches: x16 in space, x4 in time.
                vae = AutoencoderKLWan(
                    base_dim=8, decoder_base_dim=12, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                    patch_size=2, latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1],
                    num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                    temperal_downsample=[False, True, True])
                transformer = _transformer(48, 48, None)
            else:
                # Wan 2.1's VAE: 16 latent channels, x8 in space, x4 in time. The transformer reads the
                # noise (16), the mask (4) and the image's latents (16).
                vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[False, True, True])
                if variant == "a14b":  # two experts, no CLIP image encoder
                    transformer = _transformer(36, 16, None)
                    transformer_2 = _transformer(36, 16, None)
                else:
                    transformer = _transformer(36, 16, 16)
                    image_encoder = CLIPVisionModel(CLIPVisionConfig(
                        hidden_size=16, projection_dim=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, image_size=32, patch_size=8)).eval()
                    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32})
        settings = self.rules.variant(variant).pipeline
        return in_eval(WanImageToVideoPipeline(
            tokenizer=build_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
            scheduler=_scheduler(5.0 if variant == "ti2v-5b" else 3.0), image_processor=image_processor,
            image_encoder=image_encoder, transformer=transformer, transformer_2=transformer_2,
            boundary_ratio=settings.get("boundary_ratio"), expand_timesteps=bool(settings.get("expand_timesteps"))))


GPU = WanGpu()
