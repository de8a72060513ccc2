"""I2VGen-XL's GPU half: the transformers-5 text encoder patch, and the tiny offline build."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch

from farm.gpu.families.base import GpuFamily
from farm.gpu.tiny import (
    SAMPLE_SIZE,
    TEXT_DIM,
    build_tokenizer,
    feature_extractor,
    image_vae,
    seeded,
    text_config,
    vision_encoder,
)


def build_tiny_i2vgen() -> Any:
    from diffusers import DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet
    from transformers import CLIPTextModel

    cross_dim = TEXT_DIM  # text embeddings and the image embedding both feed cross-attention
    with seeded():
        unet = I2VGenXLUNet(
            sample_size=SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64),  # attention only at the 1/4 level, as for tiny SVD
            layers_per_block=1,
            down_block_types=("DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D"),
            up_block_types=("CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"),
            cross_attention_dim=cross_dim,
            attention_head_dim=4,
            norm_num_groups=32,
        )
        vae = image_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(text_config())
        image_encoder = vision_encoder(projection_dim=cross_dim)
    # I2VGen-XL samples with DDIM on a v-prediction, zero-terminal-SNR cosine schedule.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    return I2VGenXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        image_encoder=image_encoder,
        feature_extractor=feature_extractor(),
        unet=unet,
        scheduler=scheduler,
    )


class I2VGenGpu(GpuFamily):
    name = "i2vgen"

    def build_tiny(self, variant: str) -> Any:
        return build_tiny_i2vgen()

    def decode(self, pipe: Any, latents: torch.Tensor, params: Mapping[str, Any],
               generator: torch.Generator) -> torch.Tensor:
        video = pipe.decode_latents(self._on_vae(pipe, latents), decode_chunk_size=params.get("decode_chunk_size"))
        return pipe.video_processor.postprocess_video(video=video, output_type="pt")[0]

    def prepare(self, pipe: Any) -> Any:
        """Let the (deprecated) I2VGen-XL pipeline run against transformers 5's CLIPTextModel.

        With its default clip_skip=1 the pipeline calls `text_encoder.text_model.final_layer_norm`; in
        transformers 5 CLIPTextModel no longer wraps a `text_model`, its final layer norm is a direct
        child. A plain namespace (not a Module, so state dicts and `.to()` are unaffected) restores the
        old path to the same layer.
        """
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
            object.__setattr__(encoder, "text_model", types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
        return pipe


GPU = I2VGenGpu()
