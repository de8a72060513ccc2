"""A job's fixed facts, worked out once when the job is admitted: the validated manifest, its models,
its plan, its encode settings. Shared by the director, the API, `farm render`, `farm plan` and the
simulator, so they all see a job the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from farm.cache import identity_key, model_identity
from farm.config import current
from farm.contract import IdentityAdapter
from farm.encode import EncodeSettings, default_bitrate
from farm.hashing import file_hash, weights_digest
from farm.manifest import FieldError, Manifest, ManifestError, inside_root, parse_size, validate_data
from farm.models import ModelSpec, companion_vae, missing, resolve_model, with_tiny
from farm.plan import Plan, build_plan, drawn_characters
from farm.presets import QUALITY_TEMPLATES
from farm.qc import Gates, resolve

MODEL_OVERRIDES = ("tiny",)


def resolve_models(manifest: Manifest, root: Path | None, override: str | None = None) -> dict[str, ModelSpec]:
    """The manifest's models, or their tiny stand-ins of the same family (`--models tiny`)."""
    m = manifest.models
    specs = {
        "keyframe": resolve_model("keyframe", m.keyframe, base_dir=root, allow_pickle=m.allow_pickle,
                                  revision=m.keyframe_revision),
        "video": resolve_model("video", m.video, base_dir=root, allow_pickle=m.allow_pickle,
                               revision=m.video_revision),
    }
    if override == "tiny":
        specs = {role: with_tiny(spec) for role, spec in specs.items()}
    elif override is not None:
        raise ValueError(f"--models must be one of {', '.join(MODEL_OVERRIDES)} (or omitted), not {override!r}")
    return specs


def model_errors(manifest: Manifest, root: Path | None, override: str | None = None) -> list[FieldError]:
    """The manifest's models that cannot be loaded here without a download, each naming its field and
    how to fetch it. With `--models tiny` the tiny builds stand in and nothing is checked."""
    if override == "tiny":
        return []
    allow = current().models.allow_download
    specs = resolve_models(manifest, root)
    return [FieldError(("models", role), msg) for role, spec in specs.items()
            if (msg := missing(spec, allow)) is not None] + adapter_errors(manifest, specs["keyframe"])


# --- characters (docs/characters.md) ------------------------------------------------------------

TINY_ADAPTER = "tiny"


@dataclass(frozen=True)
class CharacterRef:
    """A character as the farm draws them: the method, strength and reference images (absolute paths,
    each with the sha256 of its bytes: the identity stage's cache key reads bytes, not names)."""

    name: str
    method: str
    strength: float
    images: tuple[str, ...]
    sha256: tuple[str, ...]
    # The identity stage's cache key, computed once at setup (the adapter's files hashed then), so a
    # request reads no file; None where the adapter is not there yet (the submit check says why).
    key: str | None = None


# What each identity method loads beside the keyframe model, as keys of the farm config's models.paths
# (docs/characters.md lists the downloads): the adapter's .safetensors, then its image encoder's folder
# (IP-Adapter) or the IdentityNet ControlNet's folder (InstantID). InstantID also needs the face model.
METHOD_PATHS = {"ip_adapter": ("ip_adapter", "image_encoder"), "instantid": ("instantid", "identitynet")}


def adapter_paths(keyframe: ModelSpec, method: str) -> tuple[str, str] | str:
    """Where the keyframe family's adapter for `method` and its companion are (the farm config's
    models.paths), or what is missing, in words."""
    paths = current().models.paths
    fam = keyframe.rules.name
    first, second = (f"{name}:{fam}" for name in METHOD_PATHS[method])
    weights, companion = paths.get(first), paths.get(second)
    if not weights or not companion:
        what = "its CLIP image encoder's folder" if method == "ip_adapter" else "the IdentityNet ControlNet's folder"
        return (f"{method} on {keyframe.rules.title} needs models.paths[\"{first}\"] (a .safetensors file) and "
                f"models.paths[\"{second}\"] ({what}) in the farm config (docs/characters.md lists the downloads)")
    if not weights.lower().endswith(".safetensors"):
        return (f"models.paths[\"{first}\"] must be a .safetensors file (convert a .bin once with "
                "`farm convert-weights`)")
    for key, path in ((first, weights), (second, companion)):
        if not Path(path).exists():
            return f"models.paths[\"{key}\"] not found: {path}"
    from farm.faces import faces_spec  # OpenCV: only here, so validating a manifest imports no image library

    if method == "instantid" and faces_spec(False, paths) is None:
        return ("instantid needs the face model: models.paths[\"faces\"] naming insightface's model folder "
                "(with models/antelopev2 in it; docs/characters.md)")
    return weights, companion


def adapter_problem(keyframe: ModelSpec, method: str | None) -> str | None:
    if keyframe.is_tiny or keyframe.rules.identity_problem(method):
        return None  # tiny builds stand in; a method the family lacks is validation's error
    found = adapter_paths(keyframe, keyframe.rules.identity_method(method) or "ip_adapter")
    return found if isinstance(found, str) else None


def adapter_errors(manifest: Manifest, keyframe: ModelSpec) -> list[FieldError]:
    """Each drawn character whose adapter files the farm config does not name, or that are missing:
    `farm validate`/`farm render` and the director's submit refuse them before any GPU work."""
    return [FieldError(("characters", name), why) for name in drawn_characters(manifest)
            if (why := adapter_problem(keyframe, manifest.characters[name].method))]


def identity_adapter(keyframe: ModelSpec, method: str, count: int = 1) -> IdentityAdapter:
    """The adapter a keyframe pipeline loads for `count` characters drawn with `method`."""
    if keyframe.is_tiny:
        return IdentityAdapter(method, TINY_ADAPTER, TINY_ADAPTER if method == "ip_adapter" else "", count,
                               TINY_ADAPTER if method == "instantid" else "")
    found = adapter_paths(keyframe, method)
    if isinstance(found, str):  # refused at submit (adapter_problem); here the worker's load says why
        paths = current().models.paths
        first, second = (paths.get(f"{name}:{keyframe.rules.name}", "") for name in METHOD_PATHS[method])
        found = (first, second)
    if method == "instantid":
        return IdentityAdapter(method, found[0], "", count, controlnet=found[1])
    return IdentityAdapter(method, found[0], found[1], count)


def adapter_identity(adapter: IdentityAdapter, faces: str | None = None) -> dict[str, Any]:
    """What of an adapter decides the embeddings and images it makes: its weights' and its companions'
    contents (a tiny build: its build's version), and for InstantID the face model that embeds."""
    out: dict[str, Any] = {"method": adapter.method}
    if adapter.tiny:
        from farm.models import TINY_VERSION

        out["tiny"] = TINY_VERSION
    else:
        out |= {"weights": weights_digest(adapter.weights),
                "companion": weights_digest(adapter.image_encoder or adapter.controlnet)}
    if adapter.method == "instantid":
        out["faces"] = faces
    return out


def cast(manifest: Manifest, root: Path, keyframe: ModelSpec) -> dict[str, CharacterRef]:
    """The job's characters that some shot draws a keyframe of, with their images read and hashed."""
    out = {}
    for name in drawn_characters(manifest):
        character = manifest.characters[name]
        images, shas = [], []
        for k, image in enumerate(character.images):
            path = inside_root(root, image)
            try:
                shas.append(file_hash(str(path)))
            except OSError as exc:
                raise ManifestError([FieldError(("characters", name, "images", k), f"cannot be read: {exc}")]) from None
            images.append(str(path))
        method = keyframe.rules.identity_method(character.method) or "ip_adapter"
        out[name] = CharacterRef(name, method, character.strength, tuple(images), tuple(shas),
                                 identity_stage_key(keyframe, method, shas))
    return out


def identity_stage_key(keyframe: ModelSpec, method: str, shas: Sequence[str]) -> str | None:
    """The cache key of a character's identity stage, taken at setup; None where the adapter is not
    configured or not there (the submit check says which)."""
    if not keyframe.is_tiny and isinstance(adapter_paths(keyframe, method), str):
        return None
    try:
        return hashed_identity_key(keyframe, method, shas)
    except OSError:
        return None


def hashed_identity_key(keyframe: ModelSpec, method: str, shas: Sequence[str]) -> str:
    """An identity stage's key: its references' bytes and what embeds them (the adapter's files are
    hashed; raises OSError where one is missing)."""
    from farm.faces import faces_spec

    faces = faces_spec(keyframe.is_tiny, current().models.paths)
    return identity_key(adapter_identity(identity_adapter(keyframe, method), faces), list(shas))


def encode_settings(manifest: Manifest) -> EncodeSettings:
    template = QUALITY_TEMPLATES[manifest.quality]
    out = manifest.output
    bitrate = out.bitrate
    if bitrate == "auto":
        bitrate = default_bitrate(*(out.final_size or out.size))
    return EncodeSettings(crf=out.crf if out.crf is not None else template.crf,
                          preset=out.preset or template.x264_preset, bitrate=bitrate)


def encode_identity(settings: EncodeSettings) -> dict[str, Any]:
    """What of the encode settings determines the output: cache keys and the lockfile record this."""
    return {"crf": settings.crf, "preset": settings.preset, "bitrate": settings.bitrate}


def merge_options(manifest: Manifest, fps: int) -> dict[str, Any]:
    """How the clips become the film. Each boundary is the manifest's transition, except where a shot
    continues the previous one: one continuous take is never crossfaded."""
    out = manifest.output
    transitions = ["cut" if shot.continue_from == "previous" else out.transition for shot in manifest.shots[1:]]
    return {"fps": fps, "transitions": transitions, "crossfade_seconds": out.crossfade_seconds,
            "final_resolution": out.final_size, "interpolate_fps": out.interpolate_fps}


@dataclass(frozen=True)
class DraftChoice:
    """What a draft render (--preview, quality: draft) of one role runs: the family's distilled path, or
    a few undistilled steps, and why (the lockfile says so)."""

    name: str
    distilled: bool
    note: str
    lora: str | None = None  # a step-distillation LoRA, as an absolute path
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None


def choose_draft(role: str, spec: ModelSpec, manifest: Manifest, root: Path) -> tuple[ModelSpec, DraftChoice]:
    """The draft path of `spec`'s family: its distilled checkpoint or LoRA where one is here (named in
    the manifest's models.<role>_draft, or the farm config's models.paths["draft:<family>"]; a tiny
    render's distilled variant is its tiny build), else today's undistilled draft."""
    from farm.presets import PREVIEW_STEPS

    fam, draft = spec.rules, spec.rules.draft
    fallback = f"undistilled, {PREVIEW_STEPS} steps"
    if draft is None:
        return spec, DraftChoice(fallback, False, f"{fam.title} has no distilled path")
    in_manifest = getattr(manifest.models, f"{role}_draft")
    named = in_manifest or current().models.paths.get(fam.draft_key)
    use = DraftChoice(draft.name, True, "", steps=draft.steps, guidance=draft.guidance, scheduler=draft.scheduler)
    if draft.kind == "variant":
        if spec.variant == draft.variant:
            return spec, replace(use, note=f"{spec.source} is the distilled model")
        if spec.is_tiny:
            candidate = resolve_model(spec.role, f"tiny:{fam.name}:{draft.variant}")
        else:
            source = named or fam.variant(draft.variant).repo
            candidate = resolve_model(spec.role, source, base_dir=root if in_manifest else None,
                                      allow_pickle=manifest.models.allow_pickle)
            why = missing(candidate, current().models.allow_download)
            if candidate.family != fam.name or why is not None:
                return spec, DraftChoice(fallback, False, why or f"{source} is not {fam.title}")
        return candidate, replace(use, note=f"{candidate.source} instead of {spec.source}")
    if not named:
        return spec, DraftChoice(fallback, False, f"no {draft.name} here: name it in models.{role}_draft or in the "
                                                  f"farm config's models.paths[\"{fam.draft_key}\"]")
    path = inside_root(root, named) if in_manifest else Path(named)
    return spec, replace(use, lora=str(path), note=f"LoRA {path}")


OUTPUT_SLACK = 16 << 20  # the report, contact sheet, timeline, lockfile and ledger


@dataclass(frozen=True)
class JobSetup:
    manifest: Manifest
    root: Path
    plan: Plan
    specs: dict[str, ModelSpec]  # role -> model
    identity: dict[str, dict[str, Any]]  # role -> model identity (with its revision)
    encode: EncodeSettings
    merge_options: dict[str, Any]
    overrides: KeyframeOverrides  # the keyframe model's LoRAs, VAE and embeddings, as absolute paths
    preview: bool = False
    drafts: dict[str, DraftChoice] = field(default_factory=dict)  # role -> its draft path (previews only)
    step_cache: dict[str, float] = field(default_factory=dict)  # role -> FirstBlockCache threshold
    warnings: list[FieldError] = field(default_factory=list)  # what the job asks for that nothing will use
    qc_defaults: dict[str, Any] = field(default_factory=dict)  # the farm config's `qc:` (under the job's)
    characters: dict[str, CharacterRef] = field(default_factory=dict)  # those a drawn keyframe shows

    @property
    def fps(self) -> int:
        return self.plan.fps

    @property
    def tiny(self) -> bool:
        return all(spec.is_tiny for spec in self.specs.values())

    @property
    def faces(self) -> str | None:
        """The face analyser of the identity QC metric (farm.faces): the stand-in for tiny keyframes,
        insightface where the farm config names its models, else None (the metric is unavailable)."""
        from farm.faces import faces_spec

        return faces_spec(self.specs["keyframe"].is_tiny, current().models.paths)

    def encode_identity(self) -> dict[str, Any]:
        return encode_identity(self.encode)

    def output_bytes(self) -> int:
        """About what the job writes to its output folder, generously: H.264 clips at a tenth of the raw
        frames (each shot's clip and the film), uncompressed keyframes, and room for the report."""
        width, height = parse_size(self.manifest.output.resolution, "resolution")
        frames = sum(shot.frames for shot in self.plan.shots)
        keyframes = len(self.plan.shots) * width * height * 3 * 4  # keyframes are drawn up to 2x each side
        return frames * width * height * 3 // 5 + keyframes + OUTPUT_SLACK

    def adapter_record(self) -> dict[str, Any]:
        """What the lockfile says of the identity adapter: which files (or the tiny build), and how
        several characters share a keyframe."""
        if not self.characters:
            return {}
        tiny = "tiny (random weights built in code: farm/gpu/identity.py)"
        out: dict[str, dict[str, Any]] = {}
        for method in sorted({c.method for c in self.characters.values()}):
            adapter = identity_adapter(self.specs["keyframe"], method)
            companion = adapter.image_encoder or adapter.controlnet
            out[method] = {"adapter": tiny if adapter.tiny else adapter.weights,
                           ("image_encoder" if method == "ip_adapter" else "identitynet"): tiny if adapter.tiny
                           else companion, "adapter_identity": adapter_identity(adapter, self.faces)}
            if method == "instantid":
                out[method]["faces"] = self.faces
                out[method]["faces_note"] = ("the stand-in face analyser of tiny renders (farm/faces.py), not a "
                                             "face model") if self.faces == "stand-in" else "insightface"
            else:
                out[method]["several"] = ("one IP-Adapter per character side by side, each at its strength, over "
                                          "the whole image (no masks)")
        return out

    def gates(self, shot_id: str) -> Gates:
        """The quality gates a shot is judged by: config, then the job's `qc:`, then the shot's; the
        tiny-model thresholds when every model is tiny (docs/qc.md)."""
        shot = next(s for s in self.manifest.shots if s.id == shot_id)
        return resolve(self.manifest.qc, shot.qc, tiny=self.tiny, config=self.qc_defaults)

    def loras(self, role: str) -> tuple[tuple[str, float], ...]:
        """The LoRAs a role's pipeline loads, with their scales: the user's (keyframe), then a draft's."""
        out = list(self.overrides.loras) if role == "keyframe" else []
        draft = self.drafts.get(role)
        if draft is not None and draft.lora:
            out.append((draft.lora, 1.0))
        return tuple(out)

    def pipeline_options(self, role: str) -> dict[str, Any]:
        """What changes a role's pipeline besides the model and its call: LoRAs, VAE, embeddings,
        sampler, step cache, by path (the worker's residency key and what it loads)."""
        draft = self.drafts.get(role)
        keyframe = role == "keyframe"
        return {"loras": [list(x) for x in self.loras(role)],
                "vae": self.overrides.vae if keyframe else None,
                "embeddings": [list(x) for x in self.overrides.embeddings] if keyframe else [],
                "scheduler": draft.scheduler if draft is not None else None,
                "step_cache": self.step_cache.get(role)}

    def key_options(self, role: str) -> dict[str, Any]:
        """`pipeline_options` as the cache key sees them: each weights file by its content, so a LoRA
        retrained in place renders anew and a renamed one is still found."""
        options = self.pipeline_options(role)
        return options | {
            "loras": [[weights_digest(path), scale] for path, scale in options["loras"]],
            "vae": options["vae"] and weights_digest(options["vae"]),
            "embeddings": [[weights_digest(path), token] for path, token in options["embeddings"]],
        }


def setup_job(manifest_data: dict[str, Any] | Manifest, root: Path | str, options: dict[str, Any] | None = None,
              *, check_files: bool = True) -> JobSetup:
    """Validate and plan a job. Raises ManifestError (field paths) or ModelError/ValueError for models.

    `options`: {"models": "tiny" | None, "preview": bool}. Reads model folders' metadata (revisions),
    never weights."""
    from farm.preview import preview

    options = options or {}
    root = Path(root)
    if isinstance(manifest_data, Manifest):
        manifest = manifest_data
    else:
        manifest = validate_data(manifest_data, root if check_files else None)
    specs = resolve_models(manifest, root, options.get("models"))
    drafting = bool(options.get("preview")) or manifest.quality == "draft"
    drafts: dict[str, DraftChoice] = {}
    if drafting:
        manifest = preview(manifest, math.lcm(*(s.rules.variant(s.variant).multiple for s in specs.values())))
        for role in list(specs):
            specs[role], drafts[role] = choose_draft(role, specs[role], manifest, root)
    # The step cache where the family takes it, never on top of a distilled draft.
    step_cache = {role: manifest.speed.step_cache_threshold for role, spec in specs.items()
                  if manifest.speed.step_cache and spec.rules.step_cache
                  and not (role in drafts and drafts[role].distilled)}
    plan = build_plan(manifest, specs["video"])
    overrides = keyframe_overrides(manifest, root, specs["keyframe"])
    characters = cast(manifest, root, specs["keyframe"]) if check_files else {}
    return JobSetup(manifest, root, plan, specs, {role: model_identity(s) for role, s in specs.items()},
                    encode_settings(manifest), merge_options(manifest, plan.film_fps), overrides,
                    preview=drafting, drafts=drafts, step_cache=step_cache,
                    warnings=unused_input_warnings(manifest, plan, specs) + long_prompt_warnings(plan, specs),
                    qc_defaults=current().qc.model_dump(exclude_none=True), characters=characters)


@dataclass(frozen=True)
class KeyframeOverrides:
    """What the manifest changes in the keyframe model's pipeline, as absolute paths."""

    loras: tuple[tuple[str, float], ...] = ()
    vae: str | None = None
    embeddings: tuple[tuple[str, str], ...] = ()  # (file, trigger token)


def keyframe_overrides(manifest: Manifest, root: Path, keyframe: ModelSpec) -> KeyframeOverrides:
    models = manifest.models
    loras = ([(str(inside_root(root, models.lora)), 1.0)] if models.lora else []) + [
        (str(inside_root(root, lora.path)), lora.scale) for lora in models.loras]
    vae = str(inside_root(root, models.vae)) if models.vae else None
    if vae is None and (beside := companion_vae(keyframe, models.allow_pickle)) is not None:
        vae = str(beside)
    embeddings = tuple((str(inside_root(root, e.path)), e.token) for e in models.embeddings)
    return KeyframeOverrides(tuple(loras), vae, embeddings)


def long_prompt_warnings(plan: Plan, specs: dict[str, ModelSpec]) -> list[FieldError]:
    """Prompts longer than a model that reads them keeps (77 CLIP tokens for SDXL): diffusers cuts
    the rest off silently, so the writer hears it here, and the lockfile records the exact count."""
    out = []
    for sp in plan.shots:
        readers = ([specs["keyframe"].rules] if sp.first_frame_from == "keyframe" else []) + (
            [specs["video"].rules] if specs["video"].rules.takes_prompt else [])
        for rules in readers:
            warning = rules.prompt_warning(sp.shot.prompt)
            if warning:
                out.append(FieldError(("shots", sp.index, "prompt"), warning))
                break
    return out


def unused_input_warnings(manifest: Manifest, plan: Plan, specs: dict[str, ModelSpec]) -> list[FieldError]:
    """Prompts no model will read: a shot that starts from the previous shot or from its own picture
    draws no keyframe, so its prompt reaches a model only if the video family takes one (Wan, LTX and
    I2VGen-XL do; SVD does not). Not errors (the render is still what was asked for), but a writer
    should know their words went nowhere: `farm validate`, the job's status and the lockfile say so."""
    video = specs["video"].rules
    keyframe = specs["keyframe"].rules
    out = []
    for sp in plan.shots:
        draws_keyframe = sp.first_frame_from == "keyframe"
        start = {"previous": "continues the previous shot", "image": "starts from its own keyframe image",
                 "keyframe": ""}[sp.first_frame_from]
        if not draws_keyframe and not video.takes_prompt:
            out.append(FieldError(("shots", sp.index, "prompt"),
                                  f"not used: the shot {start} and {video.title} takes no prompt "
                                  "(pick a video model that does, such as Wan or LTX-Video, "
                                  "or give the shot a keyframe)"))
        if sp.shot.negative_prompt is not None:
            readers = ([keyframe] if draws_keyframe else []) + [video]
            if not any(f.takes_negative_prompt for f in readers):
                names = " and ".join(f.title for f in readers)
                out.append(FieldError(("shots", sp.index, "negative_prompt"),
                                      f"not used: {names} take{'s' if len(readers) == 1 else ''} no negative prompt"))
    for sp in plan.shots:
        if sp.shot.characters and sp.first_frame_from != "keyframe":
            start = "its own keyframe image" if sp.first_frame_from == "image" else "the previous shot's last frame"
            out.append(FieldError(("shots", sp.index, "characters"),
                                  f"identity comes from {start}: the characters' references are not used here"))
    for name in manifest.characters:
        if not any(name in shot.characters for shot in manifest.shots):
            out.append(FieldError(("characters", name), "no shot lists this character: their references are unused"))
    drawn = [sp.shot.prompt for sp in plan.shots if sp.first_frame_from == "keyframe"]
    for i, emb in enumerate(manifest.models.embeddings):
        if not any(emb.token in prompt for prompt in drawn):
            out.append(FieldError(("models", "embeddings", i, "token"),
                                  f"no prompt of a shot that draws a keyframe names {emb.token!r}: the embedding "
                                  "is loaded and never used"))
    return out
