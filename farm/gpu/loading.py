"""Loading a model family's diffusers pipeline and applying memory knobs: the GPU half of
`farm.models`, which decides what a manifest names without importing torch.

`load_pipeline` and `apply_memory_knobs` are the only code that builds pipelines; the GPU worker
calls them and keeps the result resident.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.config import current
from farm.contract import IdentityAdapter
from farm.gpu.families import gpu_family
from farm.models import PICKLE_SUFFIXES, SAFE_SUFFIXES, ModelError, ModelSpec, in_hf_cache

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


def _downloads_allowed() -> bool:
    return current().models.allow_download


def _not_found_offline(spec: ModelSpec, exc: BaseException) -> ModelError:
    return ModelError(
        f"model {spec.location!r} ({spec.role}) is not available offline: {exc}. Pre-download it into the "
        f"Hugging Face cache (huggingface-cli download {spec.location}) or into a local folder and name "
        "that folder, set FARM_ALLOW_DOWNLOAD=1 to let the farm download it, or render with `--models tiny`"
    )


def load_pipeline(spec: ModelSpec, *, device: str = "cpu", dtype: torch.dtype | None = None,
                  loras: tuple[tuple[str, float], ...] = (), vae: str | None = None,
                  cpu_offload: bool = False, embeddings: tuple[tuple[str, str], ...] = (),
                  adapter: IdentityAdapter | None = None) -> DiffusionPipeline:
    """Load the pipeline `spec` names, ready to call.

    With `cpu_offload` on a CUDA device the pipeline stays on the CPU, for `apply_memory_knobs` to
    offload (moving a large model to a small GPU first could run out of memory before offload starts).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    cls = gpu_family(spec.family).pipeline_class()
    if spec.kind in ("tiny", "dir"):
        if spec.kind == "tiny":
            from farm.gpu.tiny import tiny_dir

            location = str(tiny_dir(spec.family, spec.variant))
        else:
            location = spec.location
        try:
            pipe = _from_pretrained(cls, location, spec, dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load {spec.family} model from {location}: {exc}") from exc
    elif spec.kind == "hub":
        try:
            pipe = _from_pretrained(cls, spec.location, spec, dtype, local_files_only=not _downloads_allowed())
        except (OSError, ValueError) as exc:
            raise _not_found_offline(spec, exc) from exc
    else:
        pipe = _from_single_file(cls, spec, dtype)

    pipe = prepare_pipeline(pipe, spec.family)
    if vae is not None:
        pipe.vae = _load_vae(spec, pipe, vae, dtype)
    if loras:
        _load_loras(spec, pipe, loras)
    for path, token in embeddings:
        _load_embedding(spec, pipe, path, token)
    if adapter is not None:  # characters: the identity adapter beside the model (farm/gpu/identity.py)
        from farm.gpu.identity import load_identity_adapter

        pipe = load_identity_adapter(pipe, adapter, dtype, spec.family)
    if not (cpu_offload and str(device).startswith("cuda")):
        pipe.to(device)
    return pipe


def prepare_pipeline(pipe: Any, family: str) -> Any:
    """What the farm changes on any freshly built pipeline of `family` (its GPU half says)."""
    return gpu_family(family).prepare(pipe)


def _from_pretrained(cls: Any, location: str, spec: ModelSpec, dtype: torch.dtype, *,
                     local_files_only: bool) -> DiffusionPipeline:
    import torch

    kwargs: dict[str, Any] = {
        "dtype": dtype,  # diffusers 0.42 deprecates `torch_dtype` in favour of `dtype`
        "local_files_only": local_files_only,
        # Without allow_pickle only safetensors weights are read (a .bin in a folder is a pickle too).
        "use_safetensors": None if spec.allow_pickle else True,
    }
    if spec.kind == "hub" and spec.revision:
        kwargs["revision"] = spec.revision
    if dtype in (torch.float16, torch.bfloat16) and spec.kind in ("hub", "dir"):
        # Half the download and disk where the repo publishes fp16 weights (cast to bf16 as needed);
        # fall back to the full-precision ones.
        try:
            return cls.from_pretrained(location, variant="fp16", **kwargs)
        except (OSError, ValueError):
            pass
    return cls.from_pretrained(location, **kwargs)


def _from_single_file(cls: Any, spec: ModelSpec, dtype: torch.dtype) -> DiffusionPipeline:
    config = spec.rules.single_file
    if not hasattr(cls, "from_single_file") or config is None:
        raise ModelError(f"{spec.source!r}: diffusers cannot load {spec.rules.title} from a single "
                         "checkpoint file; use a diffusers model folder (with model_index.json) or a hub id")
    # A single file holds weights only; the component configs come from the base model's repo. Checked
    # here because diffusers silently goes online for them when they are missing from the cache.
    if not _downloads_allowed() and not in_hf_cache(config, "model_index.json"):
        raise ModelError(f"{spec.source!r}: loading a single-file {spec.family} checkpoint needs the configs "
                         f"of {config} in the Hugging Face cache, which are not there. Download them once "
                         f"(huggingface-cli download {config} --include '*.json' '*.txt'), set "
                         "FARM_ALLOW_DOWNLOAD=1, or render with `--models tiny`")
    try:
        return cls.from_single_file(spec.location, config=config, dtype=dtype,
                                    local_files_only=not _downloads_allowed())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {spec.source!r} as a single-file {spec.family} checkpoint: {exc}") from exc


def _local_weights(path_text: str, what: str, spec: ModelSpec) -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise ModelError(f"{what} {path_text!r} does not exist")
    if path.is_file() and path.suffix.lower() not in SAFE_SUFFIXES:
        if path.suffix.lower() in PICKLE_SUFFIXES and not spec.allow_pickle:
            raise ModelError(f"{what} {path_text!r} is a pickle file: loading it can run arbitrary code. "
                             "Use .safetensors, or set models.allow_pickle: true if you trust it")
        if path.suffix.lower() not in PICKLE_SUFFIXES:
            raise ModelError(f"{what} {path_text!r}: expected a .safetensors file or a folder")
    return path.resolve()


def _load_loras(spec: ModelSpec, pipe: Any, loras: tuple[tuple[str, float], ...]) -> None:
    """Every LoRA under its own adapter name, then all of them active with their scales."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelError(f"LoRA weights are not supported for {spec.rules.title} models")
    names = []
    for i, (lora, _scale) in enumerate(loras):
        names.append(f"farm{i}")
        _load_lora(spec, pipe, lora, names[-1])
    if hasattr(pipe, "set_adapters"):
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])


def _load_lora(spec: ModelSpec, pipe: Any, lora: str, adapter: str) -> None:
    path = _local_weights(lora, "LoRA", spec)
    kwargs: dict[str, Any] = {"local_files_only": True, "adapter_name": adapter}
    if path.is_file():
        kwargs["weight_name"] = path.name
        folder = str(path.parent)
    else:
        folder = str(path)
    # use_safetensors=True stops diffusers from falling back to a pickled .bin in a folder.
    kwargs["use_safetensors"] = path.suffix.lower() in SAFE_SUFFIXES or (path.is_dir() and not spec.allow_pickle)
    try:
        pipe.load_lora_weights(folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load LoRA {lora!r} into the {spec.family} pipeline: {exc}") from exc


def _load_embedding(spec: ModelSpec, pipe: Any, path: str, token: str) -> None:
    """A textual inversion under its trigger token. SDXL's files hold one vector set per text
    encoder (`clip_l` for the first, `clip_g` for the second); a one-encoder file goes to the first."""
    from safetensors.torch import load_file

    if not hasattr(pipe, "load_textual_inversion"):
        raise ModelError(f"textual-inversion embeddings are not supported for {spec.rules.title} models")
    try:
        tensors = load_file(path)
        pairs = [("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2")]
        if any(name in tensors for name, _, _ in pairs):
            for name, encoder, tokenizer in pairs:
                if name in tensors and getattr(pipe, encoder, None) is not None:
                    pipe.load_textual_inversion(tensors[name], token=token, text_encoder=getattr(pipe, encoder),
                                                tokenizer=getattr(pipe, tokenizer))
        else:
            vectors = next(iter(tensors.values()))
            pipe.load_textual_inversion(vectors, token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    except (OSError, ValueError, KeyError, StopIteration, RuntimeError) as exc:
        raise ModelError(f"cannot load embedding {path!r} ({token}) into the {spec.family} pipeline: {exc}") from exc


@contextlib.contextmanager
def _config_folder(model: Any) -> Iterator[str]:
    """A temp folder holding `model`'s config.json, for loaders that want a config path."""
    with tempfile.TemporaryDirectory(prefix="farm-config-") as tmp:
        model.save_config(tmp)
        yield tmp


def _load_vae(spec: ModelSpec, pipe: Any, vae: str, dtype: torch.dtype) -> Any:
    """A replacement VAE of the pipeline's VAE class, from a diffusers folder or one .safetensors file."""
    path = _local_weights(vae, "VAE", spec)
    vae_cls = type(pipe.vae)
    if path.is_file() and not hasattr(vae_cls, "from_single_file"):
        raise ModelError(f"a {vae_cls.__name__} ({spec.family}) cannot be loaded from a single file; give a "
                         "diffusers VAE folder (with config.json) instead")
    try:
        if path.is_dir():
            # A whole pipeline folder works too: take its vae/ subfolder.
            subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
            return vae_cls.from_pretrained(str(path), subfolder=subfolder, dtype=dtype, local_files_only=True,
                                           use_safetensors=None if spec.allow_pickle else True)
        # The file holds weights only: its architecture is that of the VAE it replaces.
        with _config_folder(pipe.vae) as config_dir:
            return vae_cls.from_single_file(str(path), config=config_dir, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load VAE {vae!r}: {exc}") from exc


def use_sampler(pipe: Any, scheduler: str | None) -> Any:
    """Swap in a sampler a draft needs (an LCM-LoRA samples with LCMScheduler), on the pipeline's
    own scheduler config."""
    if scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def use_step_cache(pipe: Any, threshold: float | None) -> bool:
    """diffusers' FirstBlockCache on every denoiser that takes it: later blocks are skipped while the
    first block's output changes less than `threshold` between steps."""
    if threshold is None:
        return False
    from diffusers.hooks import FirstBlockCacheConfig

    nets = [m for m in (getattr(pipe, n, None) for n in ("transformer", "transformer_2")) if m is not None]
    for net in nets:
        net.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return bool(nets)


# --- memory knobs --------------------------------------------------------------------------------


def apply_memory_knobs(pipe: Any, *, device: str, cpu_offload: bool = False, forward_chunking: bool = False,
                       vae_slicing: bool = False, group_offload: bool = False, vae_tiling: bool = False,
                       fp8_storage: bool = False) -> dict[str, bool]:
    """Apply the low-VRAM knobs a preset asks for (farm.presets.MemoryKnobs); return which took effect.

    A knob a pipeline or device does not support is reported False rather than raised, so one preset
    table serves every model family (SVD's temporal VAE has no slicing: decode_chunk_size does that job).
    Offloading needs an accelerator: on a CPU both offloads report False. Group offload (leaf level,
    on CUDA streams) wins over whole-model offload when a preset asks for both.
    """
    applied = dict.fromkeys(("cpu_offload", "forward_chunking", "vae_slicing", "group_offload", "vae_tiling",
                             "fp8_storage"), False)
    cuda = str(device).startswith("cuda")
    denoisers = [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer", "transformer_2")) if m is not None]
    if fp8_storage:
        # Before any offload hook is attached: the weights are stored in fp8 where they live.
        applied["fp8_storage"] = _enable_fp8_storage(denoisers, pipe)
    if group_offload and cuda:
        try:
            pipe.enable_group_offload(onload_device=device, offload_device="cpu", offload_type="leaf_level",
                                      use_stream=True)
            applied["group_offload"] = True
        except (ValueError, ImportError, NotImplementedError, AttributeError, TypeError):
            pass
    if cpu_offload and cuda and not applied["group_offload"]:
        try:
            pipe.enable_model_cpu_offload(device=device)
            applied["cpu_offload"] = True
        except (ValueError, ImportError, NotImplementedError, AttributeError):
            pass
    if not (applied["cpu_offload"] or applied["group_offload"]):
        # load_pipeline leaves the pipeline on the CPU when offload was planned; without offload it
        # must sit on its device.
        _move(pipe, device)
    if forward_chunking:
        applied["forward_chunking"] = any([_enable_forward_chunking(m) for m in denoisers])
    if vae_slicing:
        applied["vae_slicing"] = _enable_vae(getattr(pipe, "vae", None), "slicing")
    if vae_tiling:
        applied["vae_tiling"] = _enable_vae(getattr(pipe, "vae", None), "tiling")
    return applied


def _enable_fp8_storage(denoisers: list[Any], pipe: Any) -> bool:
    """Layerwise casting: weights stored in float8_e4m3fn, each layer cast up to the pipeline's dtype
    as it runs (diffusers 0.42 `enable_layerwise_casting`), about half the denoiser's bf16 memory."""
    import torch

    done = False
    for module in denoisers:
        if hasattr(module, "enable_layerwise_casting"):
            try:
                module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=pipe.dtype)
                done = True
            except (ValueError, NotImplementedError, RuntimeError, TypeError):
                pass
    return done


def _move(pipe: Any, device: str) -> None:
    import torch

    current, wanted = getattr(pipe, "device", None), torch.device(device)
    if current is None or current.type != wanted.type or (wanted.index is not None and current != wanted):
        pipe.to(device)  # a CUDA OOM here propagates: the OOM ladder needs to see it


def _enable_forward_chunking(unet: Any) -> bool:
    """Chunk every transformer block's feed-forward over the batch*frames dim, one slice at a time.

    dim 0 (not the sequence dim 1) because chunking SDXL's thousands of tokens one by one would be
    very slow, while SVD's batch is 2 x frames: that is where its feed-forward peak memory is.
    """
    if unet is None:
        return False
    if hasattr(unet, "enable_forward_chunking"):
        try:
            unet.enable_forward_chunking(chunk_size=1, dim=0)
            return True
        except (ValueError, NotImplementedError, AttributeError):
            return False
    # UNet2DConditionModel (SDXL) has no switch, but its transformer blocks support chunking.
    blocks = [m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward")]
    for block in blocks:
        block.set_chunk_feed_forward(chunk_size=1, dim=0)
    return bool(blocks)


def _enable_vae(vae: Any, how: str) -> bool:
    """VAE slicing or tiling. diffusers 0.42 moved the switches from the pipeline to the VAE, which
    raises NotImplementedError where it has no such path (SVD's AutoencoderKLTemporalDecoder slices
    nothing: its decode_chunk_size does that job)."""
    if vae is None or not hasattr(vae, f"enable_{how}") or not hasattr(vae, f"use_{how}"):
        return False
    try:
        getattr(vae, f"enable_{how}")()
    except NotImplementedError:
        return False
    return bool(getattr(vae, f"use_{how}"))
