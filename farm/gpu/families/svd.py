"""SVD's GPU half: the tiny offline build (SVD-XT's scheduler, a 224 px CLIP image encoder)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from farm.gpu.families.base import GpuFamily
from farm.gpu.tiny import SAMPLE_SIZE, feature_extractor, seeded, vision_encoder


def svd_xt_scheduler() -> Any:
    """EulerDiscreteScheduler configured as in SVD-XT's scheduler_config.json."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )


def build_tiny_svd() -> Any:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )

    add_time_dim = 32
    cross_dim = 32
    with seeded():
        unet = UNetSpatioTemporalConditionModel(
            sample_size=SAMPLE_SIZE,
            in_channels=8,  # noisy latents + the conditioning image's latents
            out_channels=4,
            # the spatio-temporal blocks hard-code 32 norm groups, so channels are multiples of 32
            # Attention only at the deepest (1/4) level: spatial self-attention is quadratic in pixels,
            # and at full latent size it made a 1024x576 tiny render take minutes per segment.
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlockSpatioTemporal", "DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
            up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
            cross_attention_dim=cross_dim,
            num_attention_heads=(2, 2, 4),
            addition_time_embed_dim=add_time_dim,
            projection_class_embeddings_input_dim=3 * add_time_dim,  # fps, motion bucket, noise aug
            num_frames=8,
        )
        # The temporal decoder also hard-codes 32 norm groups.
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 32, 32, 32),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            sample_size=SAMPLE_SIZE * 8,
        )
        image_encoder = vision_encoder(projection_dim=cross_dim)
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=svd_xt_scheduler(),
        feature_extractor=feature_extractor(),
    )


class SVDGpu(GpuFamily):
    name = "svd"

    def build_tiny(self, variant: str) -> Any:
        return build_tiny_svd()

    def decode(self, pipe: Any, latents: torch.Tensor, params: Mapping[str, Any],
               generator: torch.Generator) -> torch.Tensor:
        # The temporal VAE decodes `decode_chunk_size` frames per call; the chunk changes the pixels.
        frames = pipe.decode_latents(self._on_vae(pipe, latents), int(params["num_frames"]),
                                     int(params["decode_chunk_size"]))
        return pipe.video_processor.postprocess_video(video=frames, output_type="pt")[0]


GPU = SVDGpu()
