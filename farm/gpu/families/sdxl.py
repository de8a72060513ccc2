"""SDXL's GPU half: DPM++ 2M Karras on every loaded pipeline, and the tiny offline build."""

from __future__ import annotations

from typing import Any

from farm.gpu.families.base import GpuFamily
from farm.gpu.tiny import SAMPLE_SIZE, TEXT_DIM, build_tokenizer, image_vae, seeded, text_config


def build_tiny_sdxl() -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    add_time_dim = 8
    with seeded():
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=add_time_dim,
            # 6 micro-conditioning ids (original size, crop, target size) + text_encoder_2's pooled embeds
            projection_class_embeddings_input_dim=6 * add_time_dim + TEXT_DIM,
            # the two encoders' hidden states are concatenated
            cross_attention_dim=2 * TEXT_DIM,
            norm_num_groups=32,
        )
        vae = image_vae(scaling_factor=0.13025)  # SDXL's VAE scale
        text_encoder = CLIPTextModel(text_config())
        text_encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim=TEXT_DIM))
    # SDXL base ships an Euler scheduler; load_pipeline swaps in DPM++ 2M Karras for real and tiny alike.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    tokenizer = build_tokenizer()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


class SDXLGpu(GpuFamily):
    name = "sdxl"

    def build_tiny(self, variant: str) -> Any:
        return build_tiny_sdxl()

    def tiny_ip_adapter(self, pipe: Any, image_embed_dim: int) -> dict[str, dict[str, Any]]:
        from farm.gpu.identity import tiny_adapter_state_dict

        return tiny_adapter_state_dict(pipe.unet, image_embed_dim)

    def prepare(self, pipe: Any) -> Any:
        # DPM++ 2M Karras: the documents' sampler (40 steps ~ 60 Euler steps), for real and tiny alike.
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
            use_karras_sigmas=True)
        return pipe


GPU = SDXLGpu()
