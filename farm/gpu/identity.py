"""Characters on the GPU side: the identity adapter a keyframe pipeline loads (IP-Adapter through
diffusers' own `load_ip_adapter`), the identity stage (reference photos -> the adapter's image
embeddings, once per job), the keyframe call's `ip_adapter_image_embeds`, the tiny offline builds,
and the one-time conversion of pickled adapter weights to safetensors. docs/characters.md has the
whole path and what a real render needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from farm.cache import ArtifactCache
from farm.contract import IdentityAdapter
from farm.models import ModelError

TINY_IMAGE_EMBED_DIM = 32  # the tiny CLIP image encoder's projection (ViT-H's is 1024)


def tiny_adapter_state_dict(unet: Any, image_embed_dim: int = TINY_IMAGE_EMBED_DIM) -> dict[str, dict[str, Any]]:
    """An IP-Adapter for `unet` with random weights, laid out as h94/IP-Adapter's files are (the
    "image_proj" projection and one to_k_ip/to_v_ip pair per cross-attention layer, numbered as
    diffusers' converter reads them: 1, 3, 5, ...). Built the way diffusers' own tests build theirs."""
    from diffusers.models.embeddings import ImageProjection

    from farm.gpu.tiny import seeded

    cross = unet.config.cross_attention_dim
    blocks = list(unet.config.block_out_channels)
    layers: dict[str, Any] = {}
    key_id = 1
    with seeded():
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            if name.startswith("mid_block"):
                hidden = blocks[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
            else:
                hidden = blocks[int(name[len("down_blocks.")])]
            layers[f"{key_id}.to_k_ip.weight"] = torch.nn.Linear(cross, hidden, bias=False).weight.detach()
            layers[f"{key_id}.to_v_ip.weight"] = torch.nn.Linear(cross, hidden, bias=False).weight.detach()
            key_id += 2
        proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=image_embed_dim,
                               num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": layers}


def load_identity_adapter(pipe: Any, adapter: IdentityAdapter, dtype: torch.dtype) -> None:
    """`adapter.count` copies of the IP-Adapter side by side (one per character in the shot), and its
    image encoder, into a loaded keyframe pipeline. Local files only; safetensors only."""
    if not hasattr(pipe, "load_ip_adapter"):
        raise ModelError(f"{type(pipe).__name__} takes no IP-Adapter")
    if adapter.tiny:
        from farm.gpu.tiny import feature_extractor, seeded, vision_encoder

        with seeded():
            encoder = vision_encoder(TINY_IMAGE_EMBED_DIM).to(dtype)
        pipe.register_modules(image_encoder=encoder, feature_extractor=feature_extractor())
        weights: Any = [tiny_adapter_state_dict(pipe.unet)] * adapter.count
        names, folders = [""] * adapter.count, [""] * adapter.count
    else:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = Path(adapter.weights)
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"IP-Adapter weights must be .safetensors (convert {path.name} once with "
                             "`farm convert-weights`)")
        try:
            encoder = CLIPVisionModelWithProjection.from_pretrained(adapter.image_encoder, local_files_only=True,
                                                                    use_safetensors=True, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the IP-Adapter's image encoder from {adapter.image_encoder}: {exc}") from exc
        size = encoder.config.image_size
        pipe.register_modules(image_encoder=encoder,
                              feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
        weights, names, folders = [str(path.parent)] * adapter.count, [path.name] * adapter.count, [""] * adapter.count
    try:
        pipe.load_ip_adapter(weights, subfolder=folders, weight_name=names, image_encoder_folder=None,
                             local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the IP-Adapter {adapter.weights}: {exc}") from exc


def encode_references(pipe: Any, paths: Sequence[str], device: str) -> np.ndarray:
    """A character's reference photos through the adapter's image encoder, as the pipeline itself
    would encode them: (2, n_images, ...) float32, the negative (unconditional) half first, ready to
    be passed back as one adapter's `ip_adapter_image_embeds`."""
    import PIL.Image

    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    with torch.no_grad():
        (embeds,) = pipe.prepare_ip_adapter_image_embeds([images], None, device, 1, True)
    return embeds.float().cpu().numpy()


def call_embeds(cache: ArtifactCache, identity: Sequence[tuple[str, float]], pipe: Any,
                params: dict[str, Any], device: str) -> dict[str, Any]:
    """A keyframe call's identity arguments: each character's cached embeddings (the negative half
    dropped where the call runs without classifier-free guidance), and each adapter's scale set."""
    if not identity:
        return {}
    dtype = next(pipe.image_encoder.parameters()).dtype if pipe.image_encoder is not None else torch.float32
    cfg = float(params.get("guidance_scale", 5.0)) > 1.0 and pipe.unet.config.time_cond_proj_dim is None
    embeds = []
    for key, _scale in identity:
        array = torch.from_numpy(cache.get_arrays(key)["embeds"]).to(device=device, dtype=dtype)
        embeds.append(array if cfg else array.chunk(2)[1])
    pipe.set_ip_adapter_scale([scale for _key, scale in identity])
    return {"ip_adapter_image_embeds": embeds}


def convert_pickle(source: Path, dest: Path) -> list[str]:
    """Official weights that ship pickled (h94/IP-Adapter's `.bin`, InstantID's `ip-adapter.bin`) as
    safetensors, once: read with `torch.load(weights_only=True)`, which refuses any object that is not
    a tensor or plain container (the code a pickle could run), then nested dicts flattened to dotted
    keys (`image_proj.proj.weight`), the layout diffusers' loaders read. Returns the keys written."""
    from safetensors.torch import save_file

    from farm.paths import atomic_path

    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError and friends: say what refused it
        raise ModelError(f"{source} is not a plain weights file (torch.load weights_only refused it: {exc})") from exc
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value.contiguous()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            raise ModelError(f"{source}: {prefix or 'the file'} holds a {type(value).__name__}, not tensors")

    walk("", data)
    if not flat:
        raise ModelError(f"{source} holds no tensors")
    with atomic_path(dest) as tmp:
        save_file(flat, str(tmp), metadata={"converted_from": source.name})
    return sorted(flat)
