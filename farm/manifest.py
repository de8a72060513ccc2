"""Manifest v1: the storyboard a user writes, validated before anything renders.

Every error carries a field path (`shots[2].duration`) so `farm validate`, the CLI and the HTTP
API can all point at the exact line to fix.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from farm.egress import MAX_URL
from farm.presets import MotionLevel, Quality, Scene
from farm.qc import QcRules

SHOT_ID = r"^[A-Za-z0-9_-]{1,64}$"
# docs/sources.md section 1: keyframes at 1920x1080, video at 1024x576.
KEYFRAME_SCALE = 1920 / 1024
DEFAULT_KEYFRAME_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_VIDEO_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML reads `yes` as true, and pydantic would take true as 1
        raise ValueError("must be a number, not true or false")
    return value


NoBool = BeforeValidator(_not_bool)


class Strict(BaseModel):
    # Unknown fields are refused: a typo like `durration` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


@lru_cache(maxsize=256)  # sizes are few (32 characters at most) and asked for on every stage a director prices
def parse_size(value: str, field: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
    if not match:
        raise ValueError(f"{field} must look like WIDTHxHEIGHT, e.g. 1024x576")
    width, height = int(match[1]), int(match[2])
    if width <= 0 or height <= 0:
        raise ValueError(f"{field} sides must be positive")
    if width % 8 or height % 8:
        raise ValueError(f"{field} {width}x{height}: both sides must be multiples of 8")
    return width, height


class Steps(Strict):
    keyframe: Annotated[int, Field(ge=1, le=500), NoBool] | None = None
    video: Annotated[int, Field(ge=1, le=500), NoBool] | None = None


# Lengths every string of a manifest stays within (here, and MAX_URL in farm/egress.py; docs/security.md).
MAX_DEPTH = 32  # nesting of mappings and lists; a real manifest needs 6
MAX_NODES = 200_000  # YAML nodes composed, aliases counted as often as they are used
MAX_STRING = 4000  # any string not given a tighter limit below
MAX_PROMPT = 2000
MAX_PATH = 1024
PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH)]


class Lora(Strict):
    path: PathText
    scale: Annotated[float, Field(ge=-4.0, le=4.0), NoBool] = 1.0


class Embedding(Strict):
    """A textual-inversion embedding (safetensors only) and the token a prompt names it by."""

    path: PathText
    token: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^\S+$")]


class Models(Strict):
    keyframe: PathText = DEFAULT_KEYFRAME_MODEL
    video: PathText = DEFAULT_VIDEO_MODEL
    keyframe_revision: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    video_revision: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    lora: PathText | None = None  # one LoRA at scale 1 on the keyframe model (`loras` takes several, with scales)
    loras: list[Lora] = []  # applied to the keyframe model, in order, each at its scale
    embeddings: list[Embedding] = []  # textual inversions for the keyframe model (SDXL)
    # VAE override for the keyframe model. Without one, a single-file keyframe checkpoint picks up a
    # VAE saved beside it under its own name (`model.safetensors` + `model.vae.safetensors`, as in the WebUI).
    vae: PathText | None = None
    allow_pickle: bool = False
    # Drafts (--preview, quality: draft): the family's distilled path, where it is on disk: a
    # step-distillation LoRA (SDXL's LCM-LoRA, a Wan LoRA) or a distilled model (FLUX.1 schnell, LTX
    # distilled). Without one the farm config's models.paths["draft:<family>"] is used.
    keyframe_draft: PathText | None = None
    video_draft: PathText | None = None


class Speed(Strict):
    """Per-job speed options. `step_cache: first_block` reuses the denoiser's output while its first
    block's changes stay under `step_cache_threshold` (diffusers' FirstBlockCache), on the families
    whose denoiser takes it (FLUX, Wan, LTX); never combined with a distilled draft."""

    step_cache: Literal["first_block"] | None = None
    step_cache_threshold: Annotated[float, Field(gt=0, le=1), NoBool] = 0.05


SizeText = Annotated[str, Field(min_length=1, max_length=32)]  # WIDTHxHEIGHT: parse_size reads it


class Output(Strict):
    fps: Annotated[int, Field(ge=1, le=120), NoBool] | None = None  # None: the quality template's fps
    resolution: SizeText = "1024x576"
    # The keyframes' own size; None: the seed's ratio (1920x1080 keyframes for 1024x576 video: 1.875x
    # the video size), rounded to what the keyframe family can make. Written full size as PNGs, and
    # resized to the video size for the video stage.
    keyframe_resolution: SizeText | None = None
    keyframe_fit: Literal["crop", "pad"] = "crop"  # user keyframe images of another aspect ratio
    final_resolution: SizeText | None = None
    crf: Annotated[int, Field(ge=0, le=51), NoBool] | None = None
    preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] | None = None
    # Bitrate mode instead of CRF: `10000k` or `10M` (the unit is required), or `auto` for the seed's
    # fallback by size (10000k at 1080p, 6500k at 720p).
    bitrate: Annotated[str, Field(max_length=16)] | None = None
    transition: Literal["cut", "crossfade"] = "cut"
    crossfade_seconds: Annotated[float, Field(ge=0.01, le=5), NoBool] = 0.5
    interpolate_fps: Annotated[int, Field(ge=1, le=120), NoBool] | None = None

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str) -> str:
        parse_size(value, "resolution")
        return value

    @field_validator("bitrate")
    @classmethod
    def _bitrate(cls, value: str | None) -> str | None:
        from farm.encode import bitrate_bits

        if value is not None and value != "auto":
            bitrate_bits(value)
        return value

    @field_validator("final_resolution", "keyframe_resolution")
    @classmethod
    def _optional_size(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_size(value, str(info.field_name))
        return value

    @property
    def size(self) -> tuple[int, int]:
        return parse_size(self.resolution, "resolution")

    @property
    def keyframe_size(self) -> tuple[int, int]:
        """What the keyframe is drawn at (before the family's rounding): as given, else the seed's ratio."""
        if self.keyframe_resolution:
            return parse_size(self.keyframe_resolution, "keyframe_resolution")
        width, height = self.size
        return round(width * KEYFRAME_SCALE / 8) * 8, round(height * KEYFRAME_SCALE / 8) * 8

    @property
    def final_size(self) -> tuple[int, int] | None:
        return parse_size(self.final_resolution, "final_resolution") if self.final_resolution else None


Guidance = Annotated[float, Field(ge=0, le=30), NoBool]
VideoPreset = Annotated[str, Field(min_length=1, max_length=40)]


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]


class Defaults(Strict):
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT)] = "blurry, distorted"
    guidance_scale: Guidance | None = None  # the keyframe model's CFG; None: the family's (SDXL 7.5)
    guidance_rescale: Annotated[float, Field(ge=0, le=1), NoBool] = 0.7
    video_guidance_scale: Guidance | None = None  # the video model's; None: its preset, rule or default
    video_preset: VideoPreset | None = None  # a preset of the video family (I2VGen-XL: preview, standard, ...)


CHARACTER_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MAX_REFERENCE_BYTES = 20 << 20  # a reference photo; the image encoder sees it at 224 px anyway
MAX_REFERENCES = 8  # per character
MAX_CHARACTERS = 16  # per job
MAX_SHOT_CHARACTERS = 4  # one IP-Adapter each, side by side, in one keyframe call


class Character(Strict):
    """A person (or creature, or object) who must look the same in every shot that names them: their
    reference photos condition each keyframe through the keyframe family's identity adapter."""

    images: Annotated[list[PathText], Field(min_length=1, max_length=MAX_REFERENCES)]
    # None: the best the keyframe family supports (farm.families: Family.identity_methods, first first)
    method: Literal["ip_adapter", "instantid"] | None = None
    strength: Annotated[float, Field(ge=0, le=2), NoBool] = 0.8  # IP-Adapter scale


class Shot(Strict):
    id: Annotated[str, Field(pattern=SHOT_ID)]
    prompt: Prompt
    # at least a frame at the fastest frame rate (1/120 s), at most ten minutes
    duration: Annotated[float, Field(ge=0.01, le=600), NoBool]
    motion: MotionLevel | None = None
    motion_bucket_id: Annotated[int, Field(ge=1, le=255), NoBool] | None = None
    scene: Scene | None = None  # None: the quality template's motion and noise (see farm presets)
    noise_aug_strength: Annotated[float, Field(ge=0, le=1), NoBool] | None = None  # SVD only
    seed: Annotated[int, Field(ge=0, le=2**32 - 1), NoBool] | None = None
    keyframe: PathText | None = None
    continue_from: Literal["previous"] | None = None
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT)] | None = None
    guidance_scale: Guidance | None = None  # the keyframe's CFG (drives the keyframe model only)
    video_guidance_scale: Guidance | None = None  # the video model's guidance
    video_preset: VideoPreset | None = None
    subjects: Annotated[int, Field(ge=1, le=3), NoBool] = 1  # I2VGen-XL adaptive guidance
    steps: Steps | None = None
    keyframe_fit: Literal["crop", "pad"] | None = None  # a user keyframe image of another aspect ratio
    qc: QcRules | None = None  # this shot's quality gates, over the job's (farm.qc)
    # who appears in the shot (names from the job's `characters:`), one identity adapter each
    characters: Annotated[list[Annotated[str, Field(pattern=CHARACTER_NAME)]],
                          Field(max_length=MAX_SHOT_CHARACTERS)] = []

    @model_validator(mode="after")
    def _one_motion(self) -> Shot:
        if self.motion is not None and self.motion_bucket_id is not None:
            raise ValueError("give either motion (low|medium|high) or motion_bucket_id (1-255), not both")
        if self.keyframe is not None and self.continue_from is not None:
            raise ValueError("a shot takes its first frame from either keyframe or continue_from, not both")
        return self


class Manifest(Strict):
    version: Literal[1]
    title: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\r\n]+$")]  # one line
    seed: Annotated[int, Field(ge=0, le=2**32 - 1), NoBool] = 0
    quality: Quality = "balanced"
    steps: Steps = Steps()
    models: Models = Models()
    output: Output = Output()
    defaults: Defaults = Defaults()
    speed: Speed = Speed()
    webhook: Annotated[str, Field(max_length=MAX_URL)] | None = None  # http(s), delivered to public addresses only
    qc: QcRules | None = None  # quality gates and retakes for every shot (farm.qc, docs/qc.md)
    # finish within this long of submission (5400, 90m, 2h): `farm plan --simulate` sizes the cluster for it
    deadline: Annotated[str, Field(max_length=32)] | float | None = None
    characters: Annotated[dict[Annotated[str, Field(pattern=CHARACTER_NAME)], Character],
                          Field(max_length=MAX_CHARACTERS)] = {}
    shots: Annotated[list[Shot], Field(min_length=1, max_length=10_000)]

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        from farm.egress import url_problem

        problem = url_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            from farm.sim.sizing import parse_duration

            parse_duration(value)  # refuses what is not a duration, naming it
        return value

    @property
    def deadline_s(self) -> float | None:
        from farm.sim.sizing import parse_duration

        return None if self.deadline is None else parse_duration(self.deadline)


@dataclass(frozen=True)
class FieldError:
    loc: tuple[str | int, ...]
    msg: str

    @property
    def path(self) -> str:
        return format_loc(self.loc)

    def __str__(self) -> str:
        return f"{self.path}: {self.msg}"


class ManifestError(ValueError):
    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __reduce__(self) -> tuple[type, tuple[list[FieldError]]]:  # across Ray with its field errors
        return ManifestError, (self.errors,)

    def as_json(self) -> list[dict[str, Any]]:
        """The HTTP API's 422 body shape: [{"loc": [...], "msg": ...}]."""
        return [{"loc": list(e.loc), "msg": e.msg} for e in self.errors]


def format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "manifest"


def _from_pydantic(exc: ValidationError) -> list[FieldError]:
    errors = []
    for err in exc.errors():
        # Field names are identifiers; pydantic's union tags ('function-after[...]') are not.
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or p.isidentifier())
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        errors.append(FieldError(loc, msg))
    return errors


def inside_root(root: Path, relative: str) -> Path:
    """Resolve `relative` against `root`, refusing absolute paths and anything that lands outside
    the root once `..` and symlinks are followed."""
    if os.path.isabs(relative) or relative.startswith("~"):
        raise ValueError("must be a path relative to the manifest's folder, not an absolute path")
    root = root.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise ValueError("escapes the manifest's folder (.. or a symlink pointing outside)")
    return target


OUTSIDE_ROOT = "must name a model inside the farm's input root (or a hub id)"


def outside_root(text: str, root: Path) -> bool:
    """Whether a model the manifest names as a local path lies outside `root`: decided on the text
    first (no disk access, so the answer says nothing about what exists out there), then with the
    symlinks inside the root followed."""
    path = Path(os.path.expanduser(text)) if text.startswith("~") else Path(text)
    path = Path(os.path.abspath(path if path.is_absolute() else root / path))
    base = Path(os.path.abspath(root))
    if path != base and base not in path.parents:
        return True
    # Only a symlink between the root and the path can lead out of it; looking for one costs an lstat
    # per part below the root (what a full resolve of both would cost many times over, at every submit).
    probe = base
    for part in path.relative_to(base).parts:
        probe = probe / part
        try:
            if stat.S_ISLNK(os.lstat(probe).st_mode):
                break
        except OSError:  # not there (nor is anything below it): what the text says stands
            return False
    else:
        return False
    try:
        real, real_base = path.resolve(), base.resolve()
    except (OSError, RuntimeError):  # a name too long, a symlink loop: not a model inside the root either
        return True
    return real != real_base and real_base not in real.parents


def _semantic_errors(manifest: Manifest, root: Path | None, confine: bool = False) -> list[FieldError]:
    """Checks that need the whole manifest or the filesystem. `confine`: every model path must lie
    inside `root` (the API's rule), refused with one message before the disk is read."""
    from farm.models import ModelError, local_path, resolve_model

    errors: list[FieldError] = []
    seen: dict[str, int] = {}
    for i, shot in enumerate(manifest.shots):
        if shot.id in seen:
            errors.append(FieldError(("shots", i, "id"),
                                     f"duplicate shot id {shot.id!r} (also shots[{seen[shot.id]}])"))
        seen.setdefault(shot.id, i)
        if shot.continue_from and i == 0:
            errors.append(FieldError(("shots", 0, "continue_from"), "the first shot has no previous shot"))
        if shot.keyframe is not None:
            errors.extend(_keyframe_errors(shot.keyframe, root, ("shots", i, "keyframe")))
        errors.extend(_cast_errors(manifest, i))
    for who, character in manifest.characters.items():
        for k, image in enumerate(character.images):
            errors.extend(_reference_errors(image, root, ("characters", who, "images", k)))
    width, height = manifest.output.size
    specs = {}
    for role in ("keyframe", "video"):
        if confine and root is not None and outside_root(getattr(manifest.models, role), root):
            errors.append(FieldError(("models", role), OUTSIDE_ROOT))
            continue
        try:
            spec = specs[role] = resolve_model(role, getattr(manifest.models, role), base_dir=root,
                                               allow_pickle=manifest.models.allow_pickle)
        except ModelError as exc:
            errors.append(FieldError(("models", role), str(exc)))
            continue
        # What the model family can render (its pure half says): minimum side, multiples of 8/16/32. The
        # keyframe is drawn at its size rounded up to the family's multiple and cropped back.
        if role == "keyframe":
            field, size = "keyframe_resolution", spec.rules.render_size(*manifest.output.keyframe_size, spec.variant)
        else:
            field, size = "resolution", (width, height)
        problem = spec.rules.size_error(*size, spec.variant)
        if problem is not None:
            errors.append(FieldError(("output", field), f"{problem} (models.{role})"))
    video_family = specs["video"].rules if "video" in specs else None
    choices = sorted(video_family.presets) if video_family is not None else []
    for loc, name in [(("defaults", "video_preset"), manifest.defaults.video_preset)] + [
            (("shots", i, "video_preset"), shot.video_preset) for i, shot in enumerate(manifest.shots)]:
        if name is not None and video_family is not None and name not in video_family.presets:
            have = f"one of {', '.join(choices)}" if choices else "none: it has no presets"
            errors.append(FieldError(loc, f"{video_family.title} has no preset {name!r} ({have})"))
    for field in ("lora", "vae"):
        value = getattr(manifest.models, field)
        if value is not None:
            errors.extend(_weights_file_errors(value, root, manifest.models.allow_pickle, ("models", field)))
    for i, lora in enumerate(manifest.models.loras):
        errors.extend(_weights_file_errors(lora.path, root, manifest.models.allow_pickle,
                                           ("models", "loras", i, "path")))
    keyframe_family = specs["keyframe"].rules if "keyframe" in specs else None
    if keyframe_family is not None:
        for who, character in manifest.characters.items():
            problem = keyframe_family.identity_problem(character.method)
            if problem:
                errors.append(FieldError(("characters", who, "method") if character.method else ("characters", who),
                                         problem))
        for i, shot in enumerate(manifest.shots):
            known = [manifest.characters[n].method for n in shot.characters if n in manifest.characters]
            methods = [keyframe_family.identity_method(m) for m in known if not keyframe_family.identity_problem(m)]
            if len(known) > keyframe_family.identity_per_shot:
                errors.append(FieldError(("shots", i, "characters"),
                                         f"{keyframe_family.title} draws at most {keyframe_family.identity_per_shot} "
                                         f"character{'s' if keyframe_family.identity_per_shot > 1 else ''} per "
                                         "keyframe (one identity adapter each)"))
            elif "instantid" in methods and len(methods) > 1:
                errors.append(FieldError(("shots", i, "characters"),
                                         "InstantID draws one face per keyframe: a shot with an instantid character "
                                         "lists no other (draw them all with ip_adapter instead)"))
    tokens: set[str] = set()
    for i, emb in enumerate(manifest.models.embeddings):
        at: tuple[str | int, ...] = ("models", "embeddings", i)
        if not emb.path.lower().endswith(".safetensors"):
            errors.append(FieldError((*at, "path"), "embeddings load from .safetensors files only"))
        else:
            errors.extend(_weights_file_errors(emb.path, root, False, (*at, "path")))
        if emb.token in tokens:
            errors.append(FieldError((*at, "token"), f"{emb.token!r} names two embeddings"))
        tokens.add(emb.token)
        if keyframe_family is not None and not keyframe_family.embeddings:
            errors.append(FieldError(at, f"{keyframe_family.title} takes no textual-inversion embeddings (SDXL does)"))
    for role in ("keyframe", "video"):
        draft = getattr(manifest.models, f"{role}_draft")
        if draft is not None and confine and root is not None and outside_root(draft, root):
            errors.append(FieldError(("models", f"{role}_draft"), OUTSIDE_ROOT))
        elif draft is not None and local_path(draft, root) is not None:  # a LoRA or model on disk (else a hub id)
            errors.extend(_weights_file_errors(draft, root, manifest.models.allow_pickle, ("models", f"{role}_draft")))
    if manifest.speed.step_cache and not any(s.rules.step_cache for s in specs.values()):
        errors.append(FieldError(("speed", "step_cache"), "none of the job's model families takes a step cache "
                                 "(FLUX.1, Wan and LTX-Video do)"))
    fps = manifest.output.interpolate_fps
    if fps is not None:
        from farm.plan import output_fps  # the film's rate: output.fps, else the model's, else the template's

        film = output_fps(manifest, specs.get("video"))
        if fps < film:
            errors.append(FieldError(("output", "interpolate_fps"), f"must not be below the film's rate ({film} fps)"))
    if manifest.output.transition == "crossfade":
        xfade = manifest.output.crossfade_seconds
        for i, shot in enumerate(manifest.shots):
            if len(manifest.shots) > 1 and shot.duration <= xfade:
                errors.append(FieldError(("shots", i, "duration"),
                                         f"must be longer than output.crossfade_seconds ({xfade})"))
    return errors


def _in_root(value: str, root: Path | None, loc: tuple[str | int, ...]) -> Path | FieldError:
    """The path a manifest names, resolved inside its folder, or the error that says why not."""
    if root is None:
        return FieldError(loc, "needs a manifest file (paths are relative to its folder)")
    try:
        return inside_root(root, value)
    except ValueError as exc:
        return FieldError(loc, str(exc))
    except (OSError, RuntimeError):  # a name too long, a symlink loop
        return FieldError(loc, UNUSABLE_PATH)


UNUSABLE_PATH = "is not a usable path (a name too long for the file system, or one that cannot be read)"


def _keyframe_errors(value: str, root: Path | None, loc: tuple[str | int, ...]) -> list[FieldError]:
    path = _in_root(value, root, loc)
    if isinstance(path, FieldError):
        return [path]
    try:
        found = path.is_file()
    except OSError:  # ENAMETOOLONG and friends: Path.is_file lets them through
        return [FieldError(loc, UNUSABLE_PATH)]
    if not found:
        return [FieldError(loc, f"file not found: {value}")]
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        return [FieldError(loc, "must be a .png, .jpg or .webp image")]
    return []


def _cast_errors(manifest: Manifest, i: int) -> list[FieldError]:
    """A shot's `characters`: each one the job defines, each once."""
    out, seen = [], set()
    known = ", ".join(manifest.characters) or "none: the job has no characters: mapping"
    for j, name in enumerate(manifest.shots[i].characters):
        if name not in manifest.characters:
            out.append(FieldError(("shots", i, "characters", j), f"unknown character {name!r} (the job's: {known})"))
        elif name in seen:
            out.append(FieldError(("shots", i, "characters", j), f"{name!r} is listed twice"))
        seen.add(name)
    return out


# What a reference photo's first bytes must be: the formats the image encoders' processors read.
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"RIFF", "WEBP"))


def _reference_errors(value: str, root: Path | None, loc: tuple[str | int, ...]) -> list[FieldError]:
    """A character's reference image: inside the root, there, an image by its bytes (not its name), and
    not larger than MAX_REFERENCE_BYTES."""
    errors = _keyframe_errors(value, root, loc)
    if errors:
        return errors
    path = inside_root(root, value)  # type: ignore[arg-type]  # _keyframe_errors refused a missing root
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return [FieldError(loc, UNUSABLE_PATH)]
    if size > MAX_REFERENCE_BYTES:
        return [FieldError(loc, f"is {size >> 20} MB; a reference image may be at most {MAX_REFERENCE_BYTES >> 20} MB")]
    if not any(head.startswith(magic) and (kind != "WEBP" or head[8:12] == b"WEBP") for magic, kind in IMAGE_MAGIC):
        return [FieldError(loc, "is not a PNG, JPEG or WebP image (its bytes say otherwise)")]
    return []


def _weights_file_errors(value: str, root: Path | None, allow_pickle: bool,
                         loc: tuple[str | int, ...]) -> list[FieldError]:
    from farm.models import PICKLE_SUFFIXES  # one list of pickle formats, for models, LoRAs and VAEs alike

    if value.lower().endswith(tuple(PICKLE_SUFFIXES)) and not allow_pickle:
        return [FieldError(loc, "pickle checkpoints can run code when loaded; use .safetensors "
                                "or set models.allow_pickle: true")]
    path = _in_root(value, root, loc)
    if isinstance(path, FieldError):
        return [path]
    try:
        found = path.exists()
    except OSError:
        return [FieldError(loc, UNUSABLE_PATH)]
    if not found:
        return [FieldError(loc, f"not found: {value}")]
    return []


class _Bounds:
    """The nesting and the node count bounded while a YAML loader composes: a 10,000-deep document or
    a billion-laughs of aliases is refused before it can exhaust the stack or the memory of whoever
    validates it. Mixed into a loader ahead of PyYAML's Composer, whose compose_node it wraps."""

    _depth: int
    _nodes: int
    _sizes: dict[int, int]

    def _init_bounds(self) -> None:
        self._depth = 0
        self._nodes = 0
        self._sizes = {}

    def _size(self, node: yaml.Node) -> int:
        """Nodes under `node`, aliases counted at every use (memoized: aliases of aliases stay cheap)."""
        if id(node) not in self._sizes:
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            else:
                children = []
            self._sizes[id(node)] = 1 + sum(self._size(c) for c in children)
        return self._sizes[id(node)]

    def _count(self, n: int) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise ManifestError([FieldError((), f"more than {MAX_NODES} values (aliases counted where used)")])

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):  # type: ignore[attr-defined]
            node = super().compose_node(parent, index)  # type: ignore[misc]
            self._count(self._size(node) if node is not None else 1)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ManifestError([FieldError((), f"nested deeper than {MAX_DEPTH} levels")])
        try:
            node = super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._depth -= 1
        self._count(1)
        return node


class _PyBoundedLoader(_Bounds, yaml.SafeLoader):
    """PyYAML's safe loader, bounded: all in Python (where PyYAML was built without libyaml)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._init_bounds()


_BoundedLoader: type = _PyBoundedLoader
if yaml.__with_libyaml__:
    from yaml.composer import Composer
    from yaml.constructor import SafeConstructor
    from yaml.cyaml import CParser  # type: ignore[attr-defined]
    from yaml.resolver import Resolver

    class _CBoundedLoader(_Bounds, Composer, CParser, SafeConstructor, Resolver):
        """The same, with libyaml scanning and parsing (4x faster on a storyboard: a submit's parse was
        ~1.2 ms of the API's CPU): libyaml only makes the events; composing stays in Python, under
        the bounds, since libyaml's own composer would recurse without them."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._init_bounds()

    _BoundedLoader = _CBoundedLoader


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests deeper than `limit`, read without parsing it (json recurses per level)."""
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > limit:
            return True
    return False


def parse_text(text: str) -> Any:
    """YAML or JSON (JSON is YAML, but json gives better messages for JSON-looking input); the
    nesting and size are bounded before anything recurses over them."""
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")):
            if json_too_deep(text):
                raise ManifestError([FieldError((), f"nested deeper than {MAX_DEPTH} levels")])
            return json.loads(text)
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader, bounded
    except json.JSONDecodeError as exc:
        raise ManifestError([FieldError((), f"invalid JSON at line {exc.lineno}: {exc.msg}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ManifestError([FieldError((), f"invalid YAML{where}: {getattr(exc, 'problem', exc)}")]) from None
    except UnicodeEncodeError as exc:  # a lone surrogate in text handed over as a str (libyaml reads UTF-8)
        raise ManifestError([FieldError((), f"is not valid Unicode text (character {exc.start})")]) from None
    except RecursionError:  # a belt under the braces above: never a server error
        raise ManifestError([FieldError((), f"nested deeper than {MAX_DEPTH} levels")]) from None


# Characters with no meaning in a storyboard that hide or disguise text: C0/C1 controls (tab and
# newlines excepted), DEL, and the bidirectional overrides and isolates (a "Trojan Source" prompt).
_HIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def text_errors(data: Any, loc: tuple[str | int, ...] = ()) -> list[FieldError]:
    """Every string of parsed manifest data that no field may hold: not Unicode text (a lone
    surrogate from a JSON escape), hidden control characters, or longer than MAX_STRING."""
    errors: list[FieldError] = []
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return [FieldError(loc, "is not valid Unicode text")]
        if _HIDDEN.search(data):
            errors.append(FieldError(loc, "contains control or bidirectional-override characters"))
        if len(data) > MAX_STRING:
            errors.append(FieldError(loc, f"at most {MAX_STRING} characters"))
    elif isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                errors.append(FieldError(loc, f"field names must be text, not {type(key).__name__}"))
                continue
            if len(key) > 64 or _HIDDEN.search(key):  # not echoed: the error names where it is
                errors.append(FieldError(loc, "a field name is over 64 characters or holds control characters"))
                continue
            errors += text_errors(value, (*loc, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            errors += text_errors(value, (*loc, i))
    return errors


def validate_data(data: Any, root: Path | None = None, confine: bool = False) -> Manifest:
    """Validate parsed manifest data; `root` is the folder relative paths are confined to, and with
    `confine` (manifests from the API) the models' local paths too."""
    if not isinstance(data, dict):
        raise ManifestError([FieldError((), "must be a mapping with version, title and shots")])
    hostile = text_errors(data)
    if hostile:
        raise ManifestError(hostile)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_from_pydantic(exc)) from None
    errors = _semantic_errors(manifest, root, confine)
    if errors:
        raise ManifestError(errors)
    return manifest


def load(path: Path | str) -> Manifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError([FieldError((), f"cannot read {path}: {exc.strerror}")]) from None
    return validate_data(parse_text(text), root=path.parent)


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "farm storyboard manifest v1"
    return schema
