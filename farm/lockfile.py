"""manifest.lock.json: what a render really used, so it can be reproduced or audited."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any

from farm import __version__
from farm.hashing import canonical_json, content_hash
from farm.manifest import FieldError, Manifest
from farm.models import ModelSpec, model_revision
from farm.plan import Plan, identity_id, take_id
from farm.qc import MAX_RETAKES

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "ray", "numpy", "pydantic", "pyarrow")


@cache
def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "storyfarm": __version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    out["ffmpeg"] = ffmpeg_version()
    return out


@cache
def ffmpeg_version() -> str:
    from farm.encode import ffmpeg_exe

    try:
        first = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"ffmpeg version (\S+)", first)
    return match[1] if match else "unknown"


def model_entry(spec: ModelSpec) -> dict[str, Any]:
    variant = spec.rules.variant(spec.variant)
    return {"source": spec.source, "family": spec.family, "variant": variant.name, "title": variant.title,
            "kind": spec.kind, "location": spec.location, "revision": model_revision(spec), "tiny": spec.kind == "tiny",
            "frames_per_call": spec.frames_per_call, "licence": variant.licence, "commercial": variant.commercial}


def licence_note(models: dict[str, ModelSpec]) -> str:
    restricted = [f"{role}: {spec.rules.variant(spec.variant).title} ({spec.rules.variant(spec.variant).licence})"
                  for role, spec in models.items() if not spec.rules.variant(spec.variant).commercial]
    if not restricted:
        return "every model's licence allows commercial use (check the licences above for their conditions)"
    return "check before any commercial use: " + "; ".join(restricted)


def final_qc(records: dict[str, dict[str, Any]], shot: str) -> dict[str, Any]:
    """The record of a shot's last QC take (the one that chose which take to keep); {} without QC."""
    for take in range(MAX_RETAKES + 1, 0, -1):
        record = records.get(take_id(f"qc:{shot}", take))
        if record is not None and "accepted" in record:
            return record
    return {}


def character_entries(manifest: Manifest, plan: Plan, characters: Mapping[str, Any],
                      adapters: Mapping[str, Any], records: Mapping[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """Shot id -> the characters its keyframe was drawn with: method, strength, each reference image
    (as the manifest names it, and the sha256 of its bytes), the adapter and image encoder, and the
    identity stage's embeddings key. Only shots whose keyframe the farm drew: a shot starting from an
    image or the previous shot has none (its warnings say so). `characters`: jobsetup.CharacterRef by
    name; `adapters`: each method's adapter description (JobSetup.adapter_record)."""
    out: dict[str, list[Any]] = {}
    for sp in plan.shots:
        entries = []
        if sp.first_frame_from == "keyframe":
            for name in sp.shot.characters:
                ref, stage = characters[name], records.get(identity_id(name), {})
                entries.append({
                    "name": name, "method": ref.method, "strength": ref.strength,
                    "references": [{"path": path, "sha256": sha, "file": file} for path, sha, file in
                                   zip(manifest.characters[name].images, ref.sha256, ref.images, strict=True)],
                    "embeddings_key": stage.get("key"), "encoded_by": stage.get("worker"),
                    **adapters.get(ref.method, {})})
        out[sp.shot.id] = entries
    return out


def build_lock(job_id: str, manifest: Manifest, plan: Plan, models: dict[str, ModelSpec],
               records: dict[str, dict[str, Any]], encode: dict[str, Any],
               warnings: list[FieldError] | None = None) -> dict[str, Any]:
    shots = []
    said: dict[int, list[str]] = {}  # shot index -> what it asked for that no model used
    for warning in warnings or []:
        if warning.loc[:1] == ("shots",) and isinstance(warning.loc[1], int):
            said.setdefault(warning.loc[1], []).append(str(warning))
    for sp in plan.shots:
        qc = final_qc(records, sp.shot.id)
        take = qc.get("accepted", 1)
        kf = records.get(take_id(f"keyframe:{sp.shot.id}", take)) or records.get(f"keyframe:{sp.shot.id}")
        segments = [records[take_id(f"video:{sp.shot.id}:{seg.index}", take)] | {
            "index": seg.index, "frames": seg.frames, "drop": seg.drop, "kept": seg.kept,
            "decode": records[take_id(f"decode:{sp.shot.id}:{seg.index}", take)]} for seg in sp.segments]
        calls = [s["params"] | s["decode"]["params"] for s in segments]  # each call's parameters, whole
        first = calls[0]
        tiers = sorted({s["tier"] for s in segments} | {s["decode"]["tier"] for s in segments})
        shots.append({
            "id": sp.shot.id,
            "seed": sp.seed,
            "duration": sp.shot.duration,
            "frames": sp.frames,
            "first_frame_from": sp.first_frame_from,
            "tier": tiers[0] if len(tiers) == 1 else "mixed:" + ",".join(tiers),
            "warnings": said.get(sp.index, []),
            # What was not the same for every call of the shot (a segment on another tier, an OOM retry).
            "differs": {name: sorted({canonical_json(c.get(name)) for c in calls})
                        for name in sorted({n for c in calls for n in c} - {"num_frames", "seed"})
                        if len({canonical_json(c.get(name)) for c in calls}) > 1},
            "keyframe": kf,
            # Quality control: the take kept, whether it passed, the gates, and every take's metrics.
            "qc": {"take": take, "passed": qc.get("accepted_passed", qc.get("passed")), "gates": qc.get("gates"),
                   "takes": qc.get("takes", [])},
            "video": {
                # The effective parameters every segment of the shot shares, then each segment's record.
                **{k: first[k] for k in first if k not in ("num_frames", "seed")},
                "segments": segments,
            },
        })
    tiny = any(spec.kind == "tiny" for spec in models.values())
    return {
        "farm_version": __version__,
        "job": job_id,
        "created": datetime.now(UTC).isoformat(),
        "title": manifest.title,
        "tiny_models": tiny,
        "note": "rendered with tiny random-weight models: the pictures are noise, not a real render" if tiny else "",
        "manifest_sha256": content_hash(manifest.model_dump(mode="json")),
        "manifest": manifest.model_dump(mode="json"),
        "seed": manifest.seed,
        "quality": manifest.quality,
        "fps": plan.film_fps,
        "generation_fps": plan.fps,
        "models": {role: model_entry(spec) for role, spec in models.items()},
        # Licences travel with the film: a non-commercial model (FLUX.1 [dev], ...) is named here.
        "licence_note": licence_note(models),
        "encode": encode,
        "packages": package_versions(),
        "shots": shots,
    }
