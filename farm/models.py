"""Which model a manifest names, and how its diffusers pipeline is loaded: one place for model rules.

`resolve_model` turns what the user wrote ("tiny", a hub id, a local folder or file) into a
`ModelSpec` without touching torch, so `farm validate` can check models cheaply and refuse bad
ones before anything renders. `load_pipeline` and `apply_memory_knobs` are the only code that
builds pipelines; the GPU worker calls them and keeps the result resident.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

Role = Literal["keyframe", "video"]
Family = Literal["sdxl", "svd", "i2vgen"]
Kind = Literal["tiny", "hub", "dir", "file"]

ROLES: tuple[str, ...] = get_args(Role)
FAMILIES: tuple[str, ...] = get_args(Family)
ROLE_FAMILIES: dict[str, tuple[str, ...]] = {"keyframe": ("sdxl",), "video": ("svd", "i2vgen")}
DEFAULT_FAMILY: dict[str, str] = {"keyframe": "sdxl", "video": "svd"}
FAMILY_NAMES = {"sdxl": "SDXL (text-to-image)", "svd": "Stable Video Diffusion (image-to-video)",
                "i2vgen": "I2VGen-XL (image-to-video)"}
PIPELINE_CLASSES = {"sdxl": "StableDiffusionXLPipeline", "svd": "StableVideoDiffusionPipeline",
                    "i2vgen": "I2VGenXLPipeline"}
CLASS_FAMILIES = {cls: fam for fam, cls in PIPELINE_CLASSES.items()}

# Frames one pipeline call produces (what the models were trained on); longer shots are segmented.
FRAMES_SVD_XT, FRAMES_SVD, FRAMES_I2VGEN, FRAMES_TINY = 25, 14, 16, 8

# Diffusers configs that single-file checkpoints are loaded against (they hold weights only).
SINGLE_FILE_CONFIGS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}

SAFE_SUFFIXES = frozenset({".safetensors"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
# Suffixes that mark a string as a file path rather than a hub id ("org/name-1.0" has suffix ".0").
OTHER_FILE_SUFFIXES = frozenset({".gguf", ".onnx", ".json", ".yaml", ".yml", ".h5", ".msgpack", ".npz",
                                 ".zip", ".tar", ".gz", ".sft", ".model"})

# huggingface_hub's rule for repo ids, restricted to the "org/name" form.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_XT = re.compile(r"(^|[-_.])xt([-_.]|$)")


class ModelError(ValueError):
    """A model that cannot be used, with a message meant for the user."""


@dataclass(frozen=True)
class ModelSpec:
    role: Role
    source: str  # as the user wrote it
    family: Family
    kind: Kind
    location: str  # hub id, absolute dir/file path, or the tiny model's folder name
    frames_per_call: int  # video frames one call makes; 1 for keyframe models
    revision: str | None = None
    allow_pickle: bool = False

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"


# --- resolving -----------------------------------------------------------------------------------


def resolve_model(role: Role, source: str, *, base_dir: Path | None = None, allow_pickle: bool = False,
                  revision: str | None = None) -> ModelSpec:
    """What `source` names, for the `role` it is to play. Raises ModelError with a user-facing message."""
    if role not in ROLES:
        raise ModelError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
    text = (source or "").strip()
    if not text:
        raise ModelError(f"no {role} model given")

    if text.lower() == "tiny" or text.lower().startswith("tiny:"):
        family = DEFAULT_FAMILY[role] if text.lower() == "tiny" else text.split(":", 1)[1].strip().lower()
        if family not in FAMILIES:
            raise ModelError(f"unknown tiny model {text!r}; expected tiny, or tiny: followed by one of "
                             f"{', '.join(FAMILIES)}")
        _check_role(role, family, source)
        return ModelSpec(role, source, family, "tiny", _tiny_name(family), _frames(role, family, "tiny", tiny=True))

    path = _local_path(text, base_dir)
    if path is not None:
        return _resolve_local(role, source, path, allow_pickle)

    if _is_hub_id(text):
        family = _hub_family(role, text)
        return ModelSpec(role, source, family, "hub", text, _frames(role, family, text),
                         revision=revision, allow_pickle=allow_pickle)

    raise ModelError(f"{source!r} is not a model: expected 'tiny', a Hugging Face id like org/name, "
                     "a local diffusers folder or a single .safetensors file")


def with_tiny(spec: ModelSpec) -> ModelSpec:
    """The tiny stand-in of the same family (`--models tiny`): same pipeline class, random weights."""
    return resolve_model(spec.role, f"tiny:{spec.family}")


def _tiny_name(family: str) -> str:
    from farm.tiny import tiny_dir_name

    return tiny_dir_name(family)


def _check_role(role: str, family: str, source: str) -> None:
    if family not in ROLE_FAMILIES[role]:
        wanted = " or ".join(FAMILY_NAMES[f] for f in ROLE_FAMILIES[role])
        raise ModelError(f"{source!r} is a {FAMILY_NAMES[family]} model and cannot be the {role} model; "
                         f"the {role} model must be {wanted}")


def _frames(role: str, family: str, name: str, *, tiny: bool = False) -> int:
    """Frames per call; `name` (hub id, folder or file name) tells SVD-XT from SVD by its "xt" token."""
    if role == "keyframe":
        return 1
    if tiny:
        return FRAMES_TINY
    if family == "i2vgen":
        return FRAMES_I2VGEN
    return FRAMES_SVD_XT if _XT.search(name.rsplit("/", 1)[-1].lower()) else FRAMES_SVD


def _is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(".git")


def _hub_family(role: str, repo_id: str) -> str:
    name = repo_id.split("/", 1)[1].lower()
    if "i2vgen" in name:
        family = "i2vgen"
    elif "stable-video-diffusion" in name or "svd" in name:
        family = "svd"
    elif role == "video":
        raise ModelError(f"unknown video model {repo_id!r}: expected SVD/SVD-XT or I2VGen-XL "
                         "(e.g. stabilityai/stable-video-diffusion-img2vid-xt, ali-vilab/i2vgen-xl)")
    else:
        family = "sdxl"  # any other hub id as keyframe model is taken as SDXL-class; loading checks the class
    _check_role(role, family, repo_id)
    return family


def _local_path(text: str, base_dir: Path | None) -> Path | None:
    """The absolute path `text` names if it is meant as a local path, else None (a hub id)."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    path = Path(os.path.abspath(path))  # normalise ".." without following symlinks
    suffix = Path(text).suffix.lower()
    looks_like_path = (
        text.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or suffix in SAFE_SUFFIXES | PICKLE_SUFFIXES | OTHER_FILE_SUFFIXES
        or path.exists()
    )
    return path if looks_like_path else None


def _resolve_local(role: Role, source: str, path: Path, allow_pickle: bool) -> ModelSpec:
    suffix = path.suffix.lower()
    # Refused before looking at the disk: the file is unusable whether or not it is there.
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(f"{source!r} is a pickle checkpoint ({suffix}): loading a pickle can run arbitrary "
                         "code hidden in the file. Use a .safetensors file, or set models.allow_pickle: true "
                         "if you trust where it came from")
    if not path.exists():
        raise ModelError(f"model path {source!r} does not exist (looked at {path})")
    if path.is_dir():
        family = _dir_family(source, path)
        _check_role(role, family, source)
        frames = _dir_frames(role, family, path)
        return ModelSpec(role, source, family, "dir", str(path), frames, allow_pickle=allow_pickle)
    if suffix in SAFE_SUFFIXES or suffix in PICKLE_SUFFIXES:
        if role == "video":
            # diffusers has no single-file loader for SVD or I2VGen-XL: refuse now, not mid-render.
            raise ModelError(f"{source!r}: video models load from a diffusers folder or a hub id, not a single "
                             "checkpoint file (diffusers cannot load SVD/I2VGen-XL from one file)")
        family = DEFAULT_FAMILY[role]
        return ModelSpec(role, source, family, "file", str(path), _frames(role, family, path.stem),
                         allow_pickle=allow_pickle)
    raise ModelError(f"{source!r}: unsupported model file type {suffix or '(no suffix)'!r}; expected a "
                     "diffusers model folder or a single .safetensors file")


def _dir_family(source: str, path: Path) -> str:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{source!r} is not a diffusers model folder (no model_index.json in {path})")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{source!r}: cannot read {index}: {exc}") from exc
    family = CLASS_FAMILIES.get(class_name)
    if family is None:
        known = ", ".join(sorted(CLASS_FAMILIES))
        raise ModelError(f"{source!r}: unknown model class {class_name!r} in model_index.json; "
                         f"expected one of {known}")
    return family


def _dir_frames(role: str, family: str, path: Path) -> int:
    if role == "keyframe":
        return 1
    # The unet config records the frame count the model was trained with (SVD 14, SVD-XT 25, tiny 8).
    try:
        frames = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8")).get("num_frames")
    except (OSError, ValueError, AttributeError):
        frames = None
    if isinstance(frames, int) and frames > 0:
        return frames
    return _frames(role, family, path.name)


# --- loading -------------------------------------------------------------------------------------


def _pipeline_class(family: str) -> type[DiffusionPipeline]:
    import diffusers

    return getattr(diffusers, PIPELINE_CLASSES[family])


def _downloads_allowed() -> bool:
    return os.environ.get("FARM_ALLOW_DOWNLOAD", "") == "1"


def _not_found_offline(spec: ModelSpec, exc: BaseException) -> ModelError:
    return ModelError(
        f"model {spec.location!r} ({spec.role}) is not available offline: {exc}. Pre-download it into the "
        f"Hugging Face cache (huggingface-cli download {spec.location}) or into a local folder and name "
        "that folder, set FARM_ALLOW_DOWNLOAD=1 to let the farm download it, or render with `--models tiny`"
    )


def load_pipeline(spec: ModelSpec, *, device: str = "cpu", dtype: torch.dtype | None = None,
                  lora: str | None = None, vae: str | None = None, cpu_offload: bool = False) -> DiffusionPipeline:
    """Load the pipeline `spec` names, ready to call.

    With `cpu_offload` on a CUDA device the pipeline stays on the CPU, for `apply_memory_knobs` to
    offload (moving a large model to a small GPU first could run out of memory before offload starts).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    cls = _pipeline_class(spec.family)
    if spec.kind in ("tiny", "dir"):
        if spec.kind == "tiny":
            from farm.tiny import tiny_dir

            location = str(tiny_dir(spec.family))
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
    if lora is not None:
        _load_lora(spec, pipe, lora)
    if not (cpu_offload and str(device).startswith("cuda")):
        pipe.to(device)
    return pipe


def prepare_pipeline(pipe: Any, family: str) -> Any:
    """What the farm changes on any freshly built pipeline of `family`, however it was built."""
    if family == "sdxl":
        # DPM++ 2M Karras: the documents' sampler (40 steps ~ 60 Euler steps), for real and tiny alike.
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
            use_karras_sigmas=True,
        )
    if family == "i2vgen":
        _patch_i2vgen_text_encoder(pipe)
    return pipe


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
    if not hasattr(cls, "from_single_file") or spec.family not in SINGLE_FILE_CONFIGS:
        raise ModelError(f"{spec.source!r}: diffusers cannot load {FAMILY_NAMES[spec.family]} from a single "
                         "checkpoint file; use a diffusers model folder (with model_index.json) or a hub id")
    config = SINGLE_FILE_CONFIGS[spec.family]
    # A single file holds weights only; the component configs come from the base model's repo. Checked
    # here because diffusers silently goes online for them when they are missing from the cache.
    if not _downloads_allowed() and not _in_hf_cache(config, "model_index.json"):
        raise ModelError(f"{spec.source!r}: loading a single-file {spec.family} checkpoint needs the configs "
                         f"of {config} in the Hugging Face cache, which are not there. Download them once "
                         f"(huggingface-cli download {config} --include '*.json' '*.txt'), set "
                         "FARM_ALLOW_DOWNLOAD=1, or render with `--models tiny`")
    try:
        return cls.from_single_file(spec.location, config=config, dtype=dtype,
                                    local_files_only=not _downloads_allowed())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {spec.source!r} as a single-file {spec.family} checkpoint: {exc}") from exc


def _in_hf_cache(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Path of `filename` in the local HF cache snapshot of `repo_id`, or None; never goes online."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # an id the hub library rejects
        return None
    return found if isinstance(found, str) else None


def _patch_i2vgen_text_encoder(pipe: Any) -> None:
    """Let the (deprecated) I2VGen-XL pipeline run against transformers 5's CLIPTextModel.

    With its default clip_skip=1 the pipeline calls `text_encoder.text_model.final_layer_norm`; in
    transformers 5 CLIPTextModel no longer wraps a `text_model`, its final layer norm is a direct
    child. A plain namespace (not a Module, so state dicts and `.to()` are unaffected) restores the
    old path to the same layer.
    """
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
        object.__setattr__(encoder, "text_model", types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm))


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


def _load_lora(spec: ModelSpec, pipe: Any, lora: str) -> None:
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelError(f"LoRA weights are not supported for {FAMILY_NAMES[spec.family]} models")
    path = _local_weights(lora, "LoRA", spec)
    kwargs: dict[str, Any] = {"local_files_only": True}
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


# --- memory knobs --------------------------------------------------------------------------------


def apply_memory_knobs(pipe: Any, *, device: str, cpu_offload: bool, forward_chunking: bool,
                       vae_slicing: bool) -> dict[str, bool]:
    """Apply the low-VRAM knobs a preset asks for; return which ones actually took effect.

    A knob a pipeline or device does not support is reported False rather than raised, so one preset
    table serves every model family (SVD's temporal VAE has no slicing: decode_chunk_size does that job).
    """
    applied = {"cpu_offload": False, "forward_chunking": False, "vae_slicing": False}

    if cpu_offload and str(device).startswith("cuda"):
        try:
            pipe.enable_model_cpu_offload(device=device)
            applied["cpu_offload"] = True
        except (ValueError, ImportError, NotImplementedError, AttributeError):
            pass
    if not applied["cpu_offload"]:
        # load_pipeline leaves the pipeline on the CPU when offload was planned; without offload it
        # must sit on its device.
        _move(pipe, device)

    if forward_chunking:
        applied["forward_chunking"] = _enable_forward_chunking(getattr(pipe, "unet", None))

    if vae_slicing:
        applied["vae_slicing"] = _enable_vae_slicing(getattr(pipe, "vae", None))
    return applied


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


def _enable_vae_slicing(vae: Any) -> bool:
    # diffusers 0.42 removed pipe.enable_vae_slicing(); the switch lives on the VAE, which raises
    # NotImplementedError where it has no sliced path (AutoencoderKLTemporalDecoder).
    if vae is None or not hasattr(vae, "enable_slicing") or not hasattr(vae, "use_slicing"):
        return False
    try:
        vae.enable_slicing()
    except NotImplementedError:
        return False
    return bool(vae.use_slicing)


# --- revisions -----------------------------------------------------------------------------------

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def model_revision(spec: ModelSpec) -> str:
    """What the lockfile records as the model's version; cheap (stats files, never hashes weights).

    tiny: "tiny-<TINY_VERSION>". hub: the commit of the cached snapshot when it can be found offline, else the
    requested revision or "unknown". dir/file: "local-" + a digest of file names, sizes and mtimes,
    which changes when the weights are replaced.
    """
    if spec.kind == "tiny":
        from farm.tiny import TINY_VERSION

        return f"tiny-{TINY_VERSION}"
    if spec.kind == "hub":
        if spec.revision and _COMMIT.match(spec.revision):
            return spec.revision
        found = _in_hf_cache(spec.location, "model_index.json", revision=spec.revision)
        if found is not None:
            commit = Path(found).parent.name  # .../snapshots/<commit>/model_index.json
            if _COMMIT.match(commit):
                return commit
        return spec.revision or "unknown"
    return "local-" + _stat_digest(Path(spec.location))


def _stat_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            st = file.stat()
            rel = file.relative_to(path) if path.is_dir() else file.name
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return "missing"
    return digest.hexdigest()[:12]
