"""Which model a manifest names: one place for model rules, free of torch.

`resolve_model` turns what the user wrote ("tiny", a hub id, a local folder or file) into a
`ModelSpec` without touching torch, so `farm validate` can check models cheaply and refuse bad
ones before anything renders. Loading a spec into a pipeline is the GPU package's
(`farm.gpu.loading`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

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

# Tiny stand-ins (farm.gpu.tiny) are saved under this name; bump the version when a builder changes,
# so cached folders of the old shape are not reused.
TINY_VERSION = "v2"


def tiny_dir_name(family: str) -> str:
    return f"tiny-{family}-{TINY_VERSION}"


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
    family: str  # one of FAMILIES
    kind: Kind
    location: str  # hub id, absolute dir/file path, or the tiny model's folder name
    frames_per_call: int  # video frames one call makes; 1 for keyframe models
    revision: str | None = None
    allow_pickle: bool = False

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"

    @property
    def key(self) -> str:
        """What a worker holds resident: the dispatch policy prefers a worker that has this loaded."""
        return f"{self.family}:{self.location}"


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
        return ModelSpec(role, source, family, "tiny", tiny_dir_name(family), _frames(role, family, "tiny", tiny=True))

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


def in_hf_cache(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Path of `filename` in the local HF cache snapshot of `repo_id`, or None; never goes online."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # an id the hub library rejects
        return None
    return found if isinstance(found, str) else None


# --- revisions -----------------------------------------------------------------------------------

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def model_revision(spec: ModelSpec) -> str:
    """What the lockfile records as the model's version; cheap (stats files, never hashes weights).

    tiny: "tiny-<TINY_VERSION>". hub: the commit of the cached snapshot when it can be found offline, else the
    requested revision or "unknown". dir/file: "local-" + a digest of file names, sizes and mtimes,
    which changes when the weights are replaced.
    """
    if spec.kind == "tiny":
        return f"tiny-{TINY_VERSION}"
    if spec.kind == "hub":
        if spec.revision and _COMMIT.match(spec.revision):
            return spec.revision
        found = in_hf_cache(spec.location, "model_index.json", revision=spec.revision)
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
