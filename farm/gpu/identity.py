"""Characters on the GPU side: the identity adapter a keyframe pipeline loads (IP-Adapter through
diffusers' own `load_ip_adapter`; InstantID as IdentityNet on SDXL's ControlNet pipeline plus its face
adapter), the identity stage (reference photos -> the adapter's embeddings, once per job), the
keyframe call's `ip_adapter_image_embeds` (and InstantID's keypoint image and face tokens), the tiny
offline builds, and the one-time conversion of pickled weights to safetensors. docs/characters.md has
the whole path and what a real render needs.
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

TINY_IMAGE_EMBED_DIM = 32  # what the tiny image encoders hand on (ViT-H: 1024): GpuFamily.tiny_image_encoder


def _ip_layers(unet: Any) -> dict[str, Any]:
    """Random to_k_ip/to_v_ip weights for each cross-attention layer of `unet`, numbered as diffusers'
    converter reads h94's files (1, 3, 5, ...). Call inside `seeded()`."""
    cross = unet.config.cross_attention_dim
    blocks = list(unet.config.block_out_channels)
    layers: dict[str, Any] = {}
    key_id = 1
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
    return layers


def tiny_adapter_state_dict(unet: Any, image_embed_dim: int = TINY_IMAGE_EMBED_DIM) -> dict[str, dict[str, Any]]:
    """An IP-Adapter for `unet` with random weights, laid out as h94/IP-Adapter's files are (the
    "image_proj" projection and the cross-attention layers). Built the way diffusers' own tests
    build theirs."""
    from diffusers.models.embeddings import ImageProjection

    from farm.gpu.tiny import seeded

    with seeded():
        layers = _ip_layers(unet)
        proj = ImageProjection(cross_attention_dim=unet.config.cross_attention_dim, image_embed_dim=image_embed_dim,
                               num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": layers}


# InstantID's face adapter: IP-Adapter-Plus's Resampler (perceiver) from the 512-d face embedding to 16
# tokens, then IP-Adapter cross-attention layers (InstantID's ip-adapter.bin has this layout, so
# diffusers' IP-Adapter-Plus loader reads it). Its converter takes 64-wide heads and 4 layers.
FACE_DIM = 512
FACE_TOKENS = 16


def tiny_instantid_state_dict(unet: Any, hidden: int = 64) -> dict[str, dict[str, Any]]:
    """InstantID's face adapter for `unet` with random weights, in its original (IP-Adapter) key layout."""
    from farm.gpu.tiny import seeded

    cross, ff = unet.config.cross_attention_dim, hidden * 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape) / shape[-1] ** 0.5

    with seeded():
        proj: dict[str, Any] = {
            "latents": rand(1, FACE_TOKENS, hidden), "proj_in.weight": rand(hidden, FACE_DIM),
            "proj_in.bias": torch.zeros(hidden), "proj_out.weight": rand(cross, hidden),
            "proj_out.bias": torch.zeros(cross), "norm_out.weight": torch.ones(cross),
            "norm_out.bias": torch.zeros(cross)}
        for i in range(4):
            at = f"layers.{i}."
            for norm in ("0.norm1", "0.norm2", "1.0"):
                proj[f"{at}{norm}.weight"], proj[f"{at}{norm}.bias"] = torch.ones(hidden), torch.zeros(hidden)
            proj |= {f"{at}0.to_q.weight": rand(hidden, hidden), f"{at}0.to_kv.weight": rand(2 * hidden, hidden),
                     f"{at}0.to_out.weight": rand(hidden, hidden), f"{at}1.1.weight": rand(ff, hidden),
                     f"{at}1.3.weight": rand(hidden, ff)}
        layers = _ip_layers(unet)
    return {"image_proj": proj, "ip_adapter": layers}


def tiny_identitynet(unet: Any) -> Any:
    """A tiny IdentityNet: a ControlNet copied from the tiny UNet, its zero convolutions given random
    weights (zeros would make the keypoints change nothing, and a test could not see them act)."""
    from diffusers import ControlNetModel

    from farm.gpu.tiny import seeded

    net = ControlNetModel.from_unet(unet)
    with seeded():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.05)
    return net


def _face_tokens(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """IdentityNet reads the face, not the prompt: its cross-attention gets the face adapter's tokens
    (InstantID's design), which the keyframe call leaves on the module."""
    tokens = getattr(module, "farm_face_tokens", None)
    if tokens is not None:
        kwargs["encoder_hidden_states"] = tokens.to(kwargs["encoder_hidden_states"].dtype)
    return args, kwargs


def load_identity_adapter(pipe: Any, adapter: IdentityAdapter, dtype: torch.dtype, family: str) -> Any:
    """The keyframe pipeline with its identity adapter: for IP-Adapter, `adapter.count` copies side by
    side (one per character in the shot) and its image encoder; for InstantID, SDXL's ControlNet
    pipeline over the same components with IdentityNet, and the face adapter. Local files only;
    safetensors only. Returns the pipeline to use (InstantID's is a new one)."""
    if not hasattr(pipe, "load_ip_adapter"):
        raise ModelError(f"{type(pipe).__name__} takes no IP-Adapter")
    if adapter.method == "instantid":
        return _load_instantid(pipe, adapter, dtype, family)
    from farm.gpu.families import gpu_family

    fam = gpu_family(family)
    if adapter.tiny:
        encoder, processor, width = fam.tiny_image_encoder()
        pipe.register_modules(image_encoder=encoder.to(dtype), feature_extractor=processor)
        weights: Any = [fam.tiny_ip_adapter(pipe, width)] * adapter.count
        names, folders = [""] * adapter.count, [""] * adapter.count
    else:
        path = _safetensors(adapter)
        try:
            encoder, processor = fam.image_encoder(adapter.image_encoder, dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the IP-Adapter's image encoder from {adapter.image_encoder}: {exc}") from exc
        pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
        weights, names, folders = [str(path.parent)] * adapter.count, [path.name] * adapter.count, [""] * adapter.count
    _load_ip(pipe, weights, folders, names, adapter, family)
    return pipe


def _safetensors(adapter: IdentityAdapter) -> Path:
    """The adapter's weights file, which must be safetensors: the render path never loads a pickle."""
    path = Path(adapter.weights)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"the {adapter.method} adapter must be .safetensors (convert {path.name} once with "
                         "`farm convert-weights`)")
    return path


def _load_ip(pipe: Any, weights: Any, folders: list[str], names: list[str], adapter: IdentityAdapter,
             family: str) -> None:
    from farm.gpu.families import gpu_family

    try:
        gpu_family(family).load_ip_adapter(pipe, weights, folders, names)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load the {adapter.method} adapter {adapter.weights}: {exc}") from exc


def _load_instantid(pipe: Any, adapter: IdentityAdapter, dtype: torch.dtype, family: str) -> Any:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    if not isinstance(pipe, StableDiffusionXLPipeline):
        raise ModelError("InstantID is built on SDXL's ControlNet pipeline: the keyframe model must be SDXL")
    unet: Any = getattr(pipe, "unet")  # noqa: B009 - diffusers registers it at run time
    if adapter.tiny:
        controlnet = tiny_identitynet(unet).to(dtype)
        weights: Any = [tiny_instantid_state_dict(unet)]
        names = [""]
    else:
        path = _safetensors(adapter)
        try:
            controlnet = ControlNetModel.from_pretrained(adapter.controlnet, local_files_only=True,
                                                         use_safetensors=True, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load IdentityNet from {adapter.controlnet}: {exc}") from exc
        weights, names = [str(path.parent)], [path.name]
    controlnet.register_forward_pre_hook(_face_tokens, with_kwargs=True)
    out = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    _load_ip(out, weights, [""], names, adapter, family)
    return out


def encode_references(pipe: Any, family: str, paths: Sequence[str], device: str) -> np.ndarray:
    """A character's reference photos through the adapter's image encoder, as the family's pipeline
    itself would encode them: (2, n_images, ...) float32, the negative (unconditional) half first."""
    import PIL.Image

    from farm.gpu.families import gpu_family

    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    with torch.no_grad():
        embeds = gpu_family(family).reference_embeds(pipe, images, device)
    return embeds.float().cpu().numpy()


def encode_faces(analyser: Any, paths: Sequence[str]) -> dict[str, np.ndarray]:
    """InstantID's identity of a character: the mean of the references' face embeddings (each the
    largest face in its photo), as one adapter's embeddings with the unconditional zeros first, and
    the first reference's five keypoints as fractions of its size (drawn again at the keyframe's)."""
    from farm.faces import load_rgb

    embeddings, points = [], None
    for path in paths:
        image = load_rgb(path)
        found = analyser.faces(image)
        if not found:
            raise ModelError(f"no face found in {path}: InstantID needs a face in every reference photo")
        embeddings.append(found[0].embedding / max(float(np.linalg.norm(found[0].embedding)), 1e-12))
        if points is None:
            points = np.asarray(found[0].points, np.float64) / [image.shape[1], image.shape[0]]
    face = np.mean(embeddings, axis=0)
    face = face / max(float(np.linalg.norm(face)), 1e-12)
    embeds = np.stack([np.zeros_like(face), face]).reshape(2, 1, 1, FACE_DIM).astype(np.float32)
    return {"embeds": embeds, "points": np.asarray(points, np.float32)}


# InstantID's keypoint image: limbs from each eye and mouth corner to the nose, each in its point's
# colour at 60 %, then a dot on every point, on black (points: right eye, left eye, nose, mouth corners).
POINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))


def draw_keypoints(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The IdentityNet's conditioning image at `size` (w, h) for keypoints in pixels."""
    import cv2

    w, h = size
    scale = max(min(w, h) / 1024, 1 / 16)  # InstantID's widths are for ~1024 px images
    limbs = np.zeros((h, w, 3), np.float64)
    for a, b in LIMBS:
        (xa, ya), (xb, yb) = points[a], points[b]
        length = float(np.hypot(xa - xb, ya - yb))
        angle = int(np.degrees(np.arctan2(ya - yb, xa - xb)))
        polygon = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)),
                                   (int(length / 2), max(1, int(4 * scale))), angle, 0, 360, 1)
        cv2.fillConvexPoly(limbs, np.asarray(polygon, np.int32), POINT_COLOURS[a])
    out = (limbs * 0.6).astype(np.uint8)
    for (x, y), colour in zip(points, POINT_COLOURS, strict=True):
        cv2.circle(out, (int(x), int(y)), max(1, int(10 * scale)), colour, -1)
    return out


def call_embeds(cache: ArtifactCache, identity: Sequence[tuple[str, float]], pipe: Any,
                params: dict[str, Any], device: str, adapter: IdentityAdapter | None, family: str) -> dict[str, Any]:
    """A keyframe call's identity arguments: each character's cached embeddings (the negative half
    dropped where the call runs without classifier-free guidance), and each adapter's scale set. For
    InstantID also the keypoint image, IdentityNet's conditioning scale, and its face tokens."""
    if not identity:
        return {}
    from farm.gpu.families import gpu_family

    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    distilled = getattr(denoiser.config, "time_cond_proj_dim", None) is not None  # LCM-style: no CFG
    cfg = float(params.get("guidance_scale", 5.0)) > 1.0 and not distilled
    arrays = [cache.get_arrays(key) for key, _scale in identity]
    embeds = [torch.from_numpy(a["embeds"]).to(device=device, dtype=denoiser.dtype) for a in arrays]
    fam = gpu_family(family)
    fam.set_ip_adapter_scales(pipe, [scale for _key, scale in identity])
    extra = fam.ip_adapter_kwargs(embeds, cfg)
    if adapter is not None and adapter.method == "instantid":
        import PIL.Image

        face, strength = embeds[0], identity[0][1]
        with torch.no_grad():
            tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](face.reshape(face.shape[0], 1, FACE_DIM))
        pipe.controlnet.farm_face_tokens = tokens
        size = (int(params["width"]), int(params["height"]))
        extra |= {"image": PIL.Image.fromarray(draw_keypoints(arrays[0]["points"] * size, size)),
                  "controlnet_conditioning_scale": strength}
    return extra


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
