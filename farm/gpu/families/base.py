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
