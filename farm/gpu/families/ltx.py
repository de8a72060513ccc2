"""LTX-Video's GPU half: the tiny offline build (a 0.9.5-style VAE: x32 in space, x8 in time, a
timestep-conditioned decoder)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from farm.gpu.families.base import GpuFamily
from farm.gpu.tiny import build_t5_tokenizer, in_eval, seeded, t5_encoder


class LTXGpu(GpuFamily):
    name = "ltx"

    def decode(self, pipe: Any, latents: torch.Tensor, params: Mapping[str, Any],
               generator: torch.Generator) -> torch.Tensor:
        # As LTXImageToVideoPipeline does after its loop (diffusers 0.42): unpack the token sequence,
        # un-normalise, and decode with the timestep-conditioned VAE's small decode noise.
        from diffusers.utils.torch_utils import randn_tensor

        frames, height, width = int(params["num_frames"]), int(params["height"]), int(params["width"])
        space, time = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
        lat = pipe._unpack_latents(latents.to(pipe._execution_device), (frames - 1) // time + 1, height // space,
                                   width // space, pipe.transformer_spatial_patch_size,
                                   pipe.transformer_temporal_patch_size)
        vae = pipe.vae
        lat = pipe._denormalize_latents(lat, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        lat = lat.to(pipe.vae.dtype)
        timestep = None
        if pipe.vae.config.timestep_conditioning:
            noise = randn_tensor(lat.shape, generator=generator, device=lat.device, dtype=lat.dtype)
            timestep = torch.tensor([float(params["decode_timestep"])], device=lat.device, dtype=lat.dtype)
            scale = float(params["decode_noise_scale"])
            lat = (1 - scale) * lat + scale * noise
        video = pipe.vae.decode(lat, timestep, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt")[0]

    def build_tiny(self, variant: str) -> Any:
        from diffusers import (
            AutoencoderKLLTXVideo,
            FlowMatchEulerDiscreteScheduler,
            LTXImageToVideoPipeline,
            LTXVideoTransformer3DModel,
        )

        with seeded():
            transformer = LTXVideoTransformer3DModel(
                in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
                attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32)
            # Widths double per level like the real VAE's: the 0.9.1+ decoder's up blocks assume it.
            vae = AutoencoderKLLTXVideo(
                in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(4, 8, 16, 32, 64),
                down_block_types=("LTXVideo095DownBlock3D",) * 4, decoder_block_out_channels=(8, 16, 32),
                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
                decoder_inject_noise=(False, False, False, False),
                downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
                patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
                spatial_compression_ratio=32, temporal_compression_ratio=8)
            text_encoder = t5_encoder(32)
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                    base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
        return in_eval(LTXImageToVideoPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                               tokenizer=build_t5_tokenizer(), transformer=transformer))


GPU = LTXGpu()
