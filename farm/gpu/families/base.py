"""The GPU half of a model family: building its pipeline class, preparing a loaded pipeline, calling
it with the parameters its pure half (farm/families/<name>.py) mapped, and its tiny offline build."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from farm.families import Family, family
from farm.frames import fit_image


class GpuFamily:
    name: ClassVar[str]

    @property
    def rules(self) -> Family:
        return family(self.name)

    def pipeline_class(self) -> type:
        import diffusers

        cls: type = getattr(diffusers, self.rules.pipeline)
        return cls

    def build_tiny(self, variant: str) -> Any:
        """The family's pipeline class with tiny random weights, built offline and deterministically."""
        raise NotImplementedError

    def prepare(self, pipe: Any) -> Any:
        """What the farm changes on any freshly built pipeline of this family, however it was built."""
        return pipe

    # --- its IP-Adapter (characters, docs/characters.md; farm/gpu/identity.py loads and calls it) ---

    def tiny_ip_adapter(self, pipe: Any, image_embed_dim: int) -> dict[str, dict[str, Any]]:
        """An IP-Adapter for this family's tiny denoiser, random weights in the official file layout."""
        raise NotImplementedError(f"{self.name} has no IP-Adapter")

    def tiny_image_encoder(self) -> tuple[Any, Any, int]:
        """The adapter's image encoder for tiny renders: (model, processor, width of what it hands on)."""
        from farm.gpu.identity import TINY_IMAGE_EMBED_DIM
        from farm.gpu.tiny import feature_extractor, seeded, vision_encoder

        with seeded():
            return vision_encoder(TINY_IMAGE_EMBED_DIM), feature_extractor(), TINY_IMAGE_EMBED_DIM

    def image_encoder(self, folder: str, dtype: torch.dtype) -> tuple[Any, Any]:
        """The adapter's image encoder from a local folder, and its processor (CLIP: h94's ViT-H/14)."""
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                                dtype=dtype)
        size = encoder.config.image_size
        return encoder, CLIPImageProcessor(size=size, crop_size=size)

    def set_ip_adapter_scales(self, pipe: Any, scales: list[float]) -> None:
        pipe.set_ip_adapter_scale(scales)

    def load_ip_adapter(self, pipe: Any, weights: list[Any], folders: list[str], names: list[str]) -> None:
        """diffusers' own loader, the image encoder already registered (UNet pipelines' keywords)."""
        pipe.load_ip_adapter(weights, subfolder=folders, weight_name=names, image_encoder_folder=None,
                             local_files_only=True)

    def reference_embeds(self, pipe: Any, images: list[Any], device: str) -> torch.Tensor:
        """One character's photos through the adapter's image encoder as the pipeline encodes them:
        (2, n_images, ...), the negative (unconditional) half first."""
        (embeds,) = pipe.prepare_ip_adapter_image_embeds([images], None, device, 1, True)
        return embeds

    def ip_adapter_kwargs(self, embeds: list[torch.Tensor], cfg: bool) -> dict[str, Any]:
        """The call's arguments for the characters' embeddings (one per adapter), CFG or not."""
        return {"ip_adapter_image_embeds": [e if cfg else e.chunk(2)[1] for e in embeds]}

    def denoisers(self, pipe: Any) -> list[torch.nn.Module]:
        """The networks the denoising steps run (what `observe` times and `compile` compiles)."""
        return [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer", "transformer_2"))
                if isinstance(m, torch.nn.Module)]

    def call(self, pipe: Any, params: Mapping[str, Any], image: np.ndarray | None,
             generator: torch.Generator, output_type: str = "pt",
             extra: Mapping[str, Any] | None = None) -> torch.Tensor:
        """One pipeline call with the mapped parameters; returns (N, C, H, W) floats in [0, 1] where
        the pipeline put them (the keyframe's one image, or the video's frames), or with
        `output_type="latent"` a video call's final latents, as the pipeline returns them."""
        kwargs = {k: v for k, v in params.items() if k != "seed"} | dict(extra or {})
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = kwargs["negative_prompt"] or None
        if image is not None:  # the keyframe (drawn larger) or the last frame, at the call's size, not stretched
            kwargs["image"] = PIL.Image.fromarray(fit_image(image, (int(params["width"]), int(params["height"]))))
        # Some pipelines also draw from the global RNG (I2VGen-XL samples its image latents without the
        # generator): seeded and forked here, so a stage renders the same frames on every run.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(params["seed"]))
            out = pipe(**kwargs, generator=generator, output_type=output_type)
        if self.rules.role == "keyframe":
            return out.images[:1]
        return out.frames if output_type == "latent" else out.frames[0]

    def denoise(self, pipe: Any, params: Mapping[str, Any], image: np.ndarray,
                generator: torch.Generator) -> torch.Tensor:
        """A video call up to its final latents (the decode is a stage of its own)."""
        return self.call(pipe, params, image, generator, output_type="latent")

    def decode(self, pipe: Any, latents: torch.Tensor, params: Mapping[str, Any],
               generator: torch.Generator) -> torch.Tensor:
        """`denoise`'s latents to (N, C, H, W) frames in [0, 1], exactly as the pipeline's own call
        would have decoded them, with the decode parameters (`Family.split_params`)."""
        raise NotImplementedError(f"{self.name} has no decode")

    @staticmethod
    def _on_vae(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(pipe._execution_device, pipe.vae.dtype)
