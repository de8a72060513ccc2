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
from typing import Any, Literal, get_args

from farm.families import FAMILIES, Family, by_class, family, for_role

Role = Literal["keyframe", "video"]
Kind = Literal["tiny", "hub", "dir", "file"]
ROLES: tuple[str, ...] = get_args(Role)

# Tiny stand-ins (farm.gpu.tiny) are saved under this name; bump the version when a builder changes,
# so cached folders of the old shape are not reused.
TINY_VERSION = "v3"


def tiny_dir_name(family: str, variant: str | None = None) -> str:
    return f"tiny-{family}-{variant}-{TINY_VERSION}" if variant else f"tiny-{family}-{TINY_VERSION}"


SAFE_SUFFIXES = frozenset({".safetensors"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
# Suffixes that mark a string as a file path rather than a hub id ("org/name-1.0" has suffix ".0").
OTHER_FILE_SUFFIXES = frozenset({".gguf", ".onnx", ".json", ".yaml", ".yml", ".h5", ".msgpack", ".npz",
                                 ".zip", ".tar", ".gz", ".sft", ".model"})

# huggingface_hub's rule for repo ids, restricted to the "org/name" form.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class ModelError(ValueError):
    """A model that cannot be used, with a message meant for the user."""


@dataclass(frozen=True)
class ModelSpec:
    role: Role
    source: str  # as the user wrote it
    family: str  # a farm.families name
    kind: Kind
    location: str  # hub id, absolute dir/file path, or the tiny model's folder name
    frames_per_call: int  # video frames one call makes; 1 for keyframe models
    revision: str | None = None
    allow_pickle: bool = False
    variant: str | None = None  # the family's variant (SVD-XT, FLUX.1 schnell, Wan TI2V-5B, ...)

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"

    @property
    def key(self) -> str:
        """What a worker holds resident: the dispatch policy prefers a worker that has this loaded."""
        return f"{self.family}:{self.location}"

    @property
    def rules(self) -> Family:
        return family(self.family)


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
        return _resolve_tiny(role, source, text.lower())

    path = local_path(text, base_dir)
    if path is not None:
        return _resolve_local(role, source, path, allow_pickle)

    if _is_hub_id(text):
        fam = _hub_family(role, text)
        variant = fam.variant_of(text) or fam.default_variant
        return ModelSpec(role, source, fam.name, "hub", text, _frames(fam, variant), revision=revision,
                         allow_pickle=allow_pickle, variant=variant)

    raise ModelError(f"{source!r} is not a model: expected 'tiny', a Hugging Face id like org/name, "
                     "a local diffusers folder or a single .safetensors file")


def _resolve_tiny(role: Role, source: str, text: str) -> ModelSpec:
    """`tiny` (the role's default family), `tiny:FAMILY` or `tiny:FAMILY:VARIANT`."""
    parts = [p.strip() for p in text.split(":")[1:]]
    if not parts:
        fam = next(f for f in for_role(role) if f.default)
    elif parts[0] in FAMILIES:
        fam = FAMILIES[parts[0]]
    else:
        raise ModelError(f"unknown tiny model {source!r}; expected tiny, or tiny: followed by one of "
                         f"{', '.join(FAMILIES)}")
    _check_role(role, fam, source)
    variant = parts[1] if len(parts) > 1 else fam.default_variant
    if variant not in fam.variants:
        raise ModelError(f"{source!r}: {fam.title} has no variant {variant!r}; expected one of "
                         f"{', '.join(fam.variants)}")
    frames = fam.tiny_frames if role == "video" else 1
    return ModelSpec(role, source, fam.name, "tiny", tiny_dir_name(fam.name, variant), frames, variant=variant)


def companion_vae(spec: ModelSpec, allow_pickle: bool = False) -> Path | None:
    """A VAE saved beside a single-file checkpoint under its name (`model.safetensors` and
    `model.vae.safetensors`: the WebUI convention), which loads with it."""
    if spec.kind != "file":
        return None
    checkpoint = Path(spec.location)
    suffixes = [".safetensors"] + (sorted(PICKLE_SUFFIXES) if allow_pickle else [])
    for suffix in suffixes:
        candidate = checkpoint.with_name(checkpoint.stem + ".vae" + suffix)
        if candidate.is_file():
            return candidate
    return None


def with_tiny(spec: ModelSpec) -> ModelSpec:
    """The tiny stand-in of the same family and variant (`--models tiny`): same pipeline class,
    random weights."""
    return resolve_model(spec.role, f"tiny:{spec.family}:{spec.variant or family(spec.family).default_variant}")


def _check_role(role: str, fam: Family, source: str) -> None:
    if fam.role != role:
        wanted = " or ".join(f.title for f in for_role(role))
        raise ModelError(f"{source!r} is {fam.title}, which cannot be the {role} model; "
                         f"the {role} model must be {wanted}")


def _frames(fam: Family, variant: str | None) -> int:
    """Frames per call of a real model: what its variant was trained to make (1 for keyframe models)."""
    return fam.variant(variant).frames_per_call if fam.role == "video" else 1


def _is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(".git")


def _hub_family(role: str, repo_id: str) -> Family:
    """The family a hub id names: the most specific family pattern that matches its name; a keyframe id
    no family claims is taken as SDXL-class (the fallback family), and loading checks the class."""
    name = repo_id.split("/", 1)[1].lower()
    for fam in sorted(FAMILIES.values(), key=lambda f: f.fallback):
        if fam.variant_of(name) is not None:
            _check_role(role, fam, repo_id)
            return fam
    fallback = [f for f in for_role(role) if f.fallback]
    if fallback:
        return fallback[0]
    examples = ", ".join(f.variant(None).repo for f in for_role(role))
    raise ModelError(f"unknown {role} model {repo_id!r}: no model family recognises it; expected one of "
                     f"{', '.join(f.title for f in for_role(role))} (e.g. {examples})")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system is no file of the user's
        return False


def local_path(text: str, base_dir: Path | None) -> Path | None:
    """The absolute path `text` names if it is meant as a local path, else None (a hub id)."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    path = Path(os.path.abspath(path))  # normalise ".." without following symlinks
    suffix = Path(text).suffix.lower()
    looks_like_path = (
        text.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or suffix in SAFE_SUFFIXES | PICKLE_SUFFIXES | OTHER_FILE_SUFFIXES
        or _exists(path)
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
        fam, index = _dir_family(source, path)
        _check_role(role, fam, source)
        variant = fam.variant_of_folder(index, path) or fam.default_variant
        frames = _dir_frames(fam, variant, path)
        return ModelSpec(role, source, fam.name, "dir", str(path), frames, allow_pickle=allow_pickle, variant=variant)
    if suffix in SAFE_SUFFIXES or suffix in PICKLE_SUFFIXES:
        single = [f for f in for_role(role) if f.single_file]
        if not single:
            raise ModelError(f"{source!r}: {role} models load from a diffusers folder or a hub id, not a single "
                             "checkpoint file (no {role} family here can be loaded from one file)")
        fam = next((f for f in single if f.variant_of(path.stem) is not None), single[0])
        variant = fam.variant_of(path.stem) or fam.default_variant
        return ModelSpec(role, source, fam.name, "file", str(path), _frames(fam, variant), allow_pickle=allow_pickle,
                         variant=variant)
    raise ModelError(f"{source!r}: unsupported model file type {suffix or '(no suffix)'!r}; expected a "
                     "diffusers model folder or a single .safetensors file")


def _dir_family(source: str, path: Path) -> tuple[Family, dict[str, Any]]:
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{source!r} is not a diffusers model folder (no model_index.json in {path})")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        class_name = index.get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{source!r}: cannot read {index_path}: {exc}") from exc
    fam = by_class(str(class_name))
    if fam is None:
        known = ", ".join(sorted(c for f in FAMILIES.values() for c in f.classes))
        raise ModelError(f"{source!r}: unknown model class {class_name!r} in model_index.json; "
                         f"expected one of {known}")
    return fam, index


def _dir_frames(fam: Family, variant: str, path: Path) -> int:
    if fam.role == "keyframe":
        return 1
    # A UNet config may record the frame count the model was trained with (SVD 14, SVD-XT 25, tiny 8).
    try:
        frames = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8")).get("num_frames")
    except (OSError, ValueError, AttributeError):
        frames = None
    if isinstance(frames, int) and frames > 0:
        return frames
    return _frames(fam, variant)


def in_hf_cache(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Path of `filename` in the local HF cache snapshot of `repo_id`, or None; never goes online."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # an id the hub library rejects
        return None
    return found if isinstance(found, str) else None


def missing(spec: ModelSpec, allow_download: bool = False) -> str | None:
    """Why `spec` cannot be loaded on this machine without a download, or None when it can. Reads only
    the local Hugging Face cache's index (never weights, never the network)."""
    if spec.kind != "hub" or allow_download:
        return None  # tiny builds itself; local folders and files were checked when resolved
    if in_hf_cache(spec.location, "model_index.json", revision=spec.revision) is not None:
        return None
    variant = spec.rules.variant(spec.variant)
    note = f"{variant.note}, then " if variant.note and variant.repo == spec.location else ""
    return (f"{spec.location} is not in the local Hugging Face cache and the farm downloads nothing unless told to: "
            f"{note}fetch it with `huggingface-cli download {spec.location}` (about {variant.size_gb:g} GB for "
            f"{variant.title}), or set models.allow_download: true in the farm config (FARM_ALLOW_DOWNLOAD=1), or "
            "render with --models tiny")


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
