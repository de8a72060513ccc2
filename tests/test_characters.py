"""Characters (issue 19): the manifest's `characters:`, their refusals, the identity stage computed once
per job, its embeddings reaching the keyframe call through diffusers' IP-Adapter, the cache keys, the
pickle converter, the identity QC metric and the lockfile, with the tiny offline builds."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import base_manifest, write_manifest, write_png

from farm import manifest as mf
from farm.contract import StageKind


def noise_png(path, seed, size=(64, 64)):
    """A reference photo with content (a flat colour says nothing to the stand-in face analyser)."""
    import PIL.Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def cast_manifest(root, **over):
    noise_png(root / "refs" / "mira_front.png", 1)
    noise_png(root / "refs" / "mira_side.png", 2)
    noise_png(root / "refs" / "tom.png", 3)
    data = base_manifest(
        characters={"mira": {"images": ["refs/mira_front.png", "refs/mira_side.png"], "strength": 0.8},
                    "tom": {"images": ["refs/tom.png"], "strength": 0.5}},
        shots=[{"id": "a", "prompt": "mira at the window", "duration": 0.5, "characters": ["mira"]},
               {"id": "b", "prompt": "an empty street", "duration": 0.5},
               {"id": "c", "prompt": "mira and tom talk", "duration": 0.5, "characters": ["mira", "tom"]}])
    data.update(over)
    write_manifest(root, data)
    return data


def errors_of(data, root):
    with pytest.raises(mf.ManifestError) as info:
        mf.validate_data(data, root)
    return {e.path: e.msg for e in info.value.errors}


# --- the manifest -------------------------------------------------------------------------------

def test_a_cast_validates_and_the_schema_documents_it(tmp_path):
    data = cast_manifest(tmp_path)
    manifest = mf.validate_data(data, tmp_path)
    assert manifest.characters["mira"].method is None and manifest.shots[2].characters == ["mira", "tom"]
    schema = mf.json_schema()
    assert "characters" in schema["properties"]
    assert "strength" in json.dumps(schema["$defs"]["Character"])


@pytest.mark.parametrize(("change", "field", "words"), [
    (lambda d, r: d["shots"][0].update(characters=["mria"]), "shots[0].characters[0]", "unknown character 'mria'"),
    (lambda d, r: d["shots"][2].update(characters=["mira", "mira"]), "shots[2].characters[1]", "listed twice"),
    (lambda d, r: d["characters"]["mira"].update(images=["refs/gone.png"]), "characters.mira.images[0]",
     "file not found"),
    (lambda d, r: d["characters"]["mira"].update(images=[]), "characters.mira.images", "at least 1"),
    (lambda d, r: d["characters"]["mira"].update(images=["../outside.png"]), "characters.mira.images[0]", ""),
    (lambda d, r: ((r / "refs" / "fake.png").write_bytes(b"not a picture at all"),  # named .png, not one
                   d["characters"]["tom"].update(images=["refs/fake.png"])),
     "characters.tom.images[0]", "is not a PNG, JPEG or WebP image"),
])
def test_bad_characters_are_refused_naming_the_field(tmp_path, change, field, words):
    data = cast_manifest(tmp_path)
    change(data, tmp_path)
    errors = errors_of(data, tmp_path)
    assert field in errors, errors
    assert words in errors[field]


def test_a_reference_too_large_and_a_method_the_family_lacks_are_refused(tmp_path):
    data = cast_manifest(tmp_path)
    big = tmp_path / "refs" / "huge.png"
    with big.open("wb") as f:  # a PNG header, then a sparse 21 MB
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(mf.MAX_REFERENCE_BYTES + (1 << 20))
    data["characters"]["tom"]["images"] = ["refs/huge.png"]
    errors = errors_of(data, tmp_path)
    assert list(errors) == ["characters.tom.images[0]"] and "at most 20 MB" in errors["characters.tom.images[0]"]
    flux = cast_manifest(tmp_path, models={"keyframe": "tiny:flux:schnell", "video": "tiny"})
    flux["characters"]["mira"]["method"] = "instantid"
    errors = errors_of(flux, tmp_path)
    assert list(errors) == ["characters.mira.method"] and "FLUX.1" in errors["characters.mira.method"]
    sd3 = cast_manifest(tmp_path, models={"keyframe": "tiny:sd3", "video": "tiny"})  # one adapter per call
    errors = errors_of(sd3, tmp_path)
    assert list(errors) == ["shots[2].characters"] and "at most 1 character per" in errors["shots[2].characters"]
    from farm.families import family

    assert "takes no identity references" in family("svd").identity_problem(None)  # a family without any


def test_farm_validate_names_an_unknown_character_and_a_missing_reference(tmp_path):
    data = cast_manifest(tmp_path)
    data["shots"][0]["characters"] = ["nobody"]
    data["characters"]["tom"]["images"] = ["refs/missing.png"]
    path = write_manifest(tmp_path, data, "bad.yaml")
    result = subprocess.run([sys.executable, "-m", "farm.cli", "validate", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("shots[0].characters[0]: unknown character 'nobody'") for line in lines), lines
    assert any(line.startswith("characters.tom.images[0]: file not found") for line in lines), lines


def test_identity_from_a_frame_and_unused_characters_are_warned(tmp_path):
    from farm.jobsetup import setup_job

    data = cast_manifest(tmp_path)
    write_png(tmp_path / "own.png")
    data["shots"][1].update(characters=["tom"], keyframe="own.png")
    data["shots"].append({"id": "d", "prompt": "later", "duration": 0.5, "continue_from": "previous",
                          "characters": ["mira"]})
    data["characters"]["ghost"] = {"images": ["refs/tom.png"]}
    setup = setup_job(data, tmp_path)
    warned = {e.path: e.msg for e in setup.warnings}
    assert "its own keyframe image" in warned["shots[1].characters"]
    assert "previous shot's last frame" in warned["shots[3].characters"]
    assert "no shot lists this character" in warned["characters.ghost"]


def test_the_example_storyboard_with_a_character_plans_one_identity_stage():
    from pathlib import Path

    from farm.jobsetup import setup_job

    examples = Path(__file__).resolve().parent.parent / "examples"
    setup = setup_job(mf.load(examples / "characters.yaml"), examples, {"models": "tiny", "preview": True})
    assert setup.warnings == []
    plan = setup.plan
    assert [s.id for s in plan.stages.values() if s.kind == StageKind.IDENTITY] == ["identity:mira"]
    assert [s.shot for s in plan.stages.values() if s.deps == ("identity:mira",)] == ["s01-station", "s03-door"]


# --- the plan, the keys ---------------------------------------------------------------------------

def test_each_character_is_one_identity_stage_before_the_keyframes_that_show_them(tmp_path):
    from farm.jobsetup import setup_job

    plan = setup_job(cast_manifest(tmp_path), tmp_path).plan
    identity = [s for s in plan.stages.values() if s.kind == StageKind.IDENTITY]
    assert [s.id for s in identity] == ["identity:mira", "identity:tom"] and all(s.gpu for s in identity)
    assert plan.stages["keyframe:a"].deps == ("identity:mira",)
    assert plan.stages["keyframe:b"].deps == ()
    assert plan.stages["keyframe:c"].deps == ("identity:mira", "identity:tom")


def finished(book, stage_id, key):
    from farm.jobbook import Done

    book.done[stage_id] = Done(key, {})


def test_cache_keys_follow_the_reference_bytes_not_their_names(tmp_path):
    from farm.jobbook import JobBook
    from farm.jobsetup import setup_job

    def keys(data):
        book = JobBook("j", setup_job(data, tmp_path), str(tmp_path / "out"))
        identity = book.request("identity:mira", "cpu").output_key
        finished(book, "identity:mira", identity)
        finished(book, "identity:tom", book.request("identity:tom", "cpu").output_key)
        return identity, book.request("keyframe:a", "cpu").output_key, book.request("keyframe:b", "cpu").output_key

    data = cast_manifest(tmp_path)
    first = keys(data)
    (tmp_path / "refs" / "mira_front.png").rename(tmp_path / "refs" / "renamed.png")
    data["characters"]["mira"]["images"][0] = "refs/renamed.png"
    assert keys(data) == first  # renamed: the same bytes, the same embeddings and keyframe
    noise_png(tmp_path / "refs" / "renamed.png", 99)  # new bytes under the same name
    changed = keys(data)
    assert changed[0] != first[0] and changed[1] != first[1]
    assert changed[2] == first[2]  # a shot without characters is not touched
    plain = base_manifest(shots=[{"id": "a", "prompt": "x", "duration": 0.5},
                                 {"id": "b", "prompt": "an empty street", "duration": 0.5}])
    book = JobBook("p", setup_job(plain, tmp_path), str(tmp_path / "out"))
    assert book.request("keyframe:b", "cpu").output_key == first[2]  # and keys as it did before characters


# --- on the worker (tiny SDXL, its tiny IP-Adapter and image encoder) ------------------------------

@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Identity stages, then the three keyframes, on one CPU worker; every pipeline call recorded."""
    from farm.cache import ArtifactCache
    from farm.gpu.worker import StageWorker
    from farm.jobbook import JobBook
    from farm.jobsetup import setup_job

    root = tmp_path_factory.mktemp("cast")
    cache_dir = str(root / "cache")
    book = JobBook("j", setup_job(cast_manifest(root), root), str(root / "out"))
    worker = StageWorker("w", tier="cpu")
    encoder_calls, requests, spied = [], {}, {}
    for sid in ("identity:mira", "identity:tom", "keyframe:a", "keyframe:b", "keyframe:c"):
        req = requests[sid] = book.request(sid, "cpu", cache_dir)
        worker.run(req)
        pipe = worker.resident(req)
        if id(pipe) not in spied:  # each pipeline once: count its image encoder, record its calls
            if pipe.image_encoder is not None:
                pipe.image_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
            spied[id(pipe)] = spy_on(pipe)
            if req.kind == StageKind.KEYFRAME:  # its first call happened before the spy: run it again
                worker.run(replace(req, output_key=req.output_key + "-again"))
        if req.kind == StageKind.IDENTITY:
            finished(book, sid, req.output_key)
    calls = [call for seen in spied.values() for call in seen]
    return book, worker, ArtifactCache(cache_dir), requests, encoder_calls, calls


def test_references_are_encoded_once_for_every_shot_that_shows_them(rendered):
    _, worker, cache, requests, encoder_calls, _ = rendered
    mira = cache.get_arrays(requests["identity:mira"].output_key)["embeds"]
    assert mira.shape == (2, 2, 32)  # [negative, positive] x two reference images x the tiny ViT's 32
    assert np.all(mira[0] == 0) and np.abs(mira[1]).sum() > 0  # diffusers' unconditional half is zeros
    # the image encoder ran for the identity stages only (hooked after the first one): tom's, not
    # once more per keyframe: keyframe:a and keyframe:c read mira's from the cache
    assert len(encoder_calls) == 1
    assert requests["keyframe:a"].identity == ((requests["identity:mira"].output_key, 0.8),)


def test_the_embeddings_reach_the_keyframe_call(rendered):
    _, worker, cache, requests, _, calls = rendered
    with_cast = [c for c in calls if "ip_adapter_image_embeds" in c]
    assert len(with_cast) >= 2 and not [c for c in calls if c.get("prompt") == "an empty street"
                                        and "ip_adapter_image_embeds" in c]
    mira = cache.get_arrays(requests["identity:mira"].output_key)["embeds"]
    one = next(c for c in with_cast if c["prompt"] == "mira at the window")
    (embeds,) = one["ip_adapter_image_embeds"]
    assert torch.equal(embeds, torch.from_numpy(mira))


def test_a_shot_with_two_characters_loads_an_adapter_each_at_its_strength(rendered):
    _, worker, cache, requests, _, calls = rendered
    req = requests["keyframe:c"]
    assert req.adapter is not None and req.adapter.count == 2 and [s for _, s in req.identity] == [0.8, 0.5]
    pipe = worker.resident(req)
    assert len(pipe.unet.encoder_hid_proj.image_projection_layers) == 2
    processor = next(p for p in pipe.unet.attn_processors.values() if hasattr(p, "scale"))
    assert list(processor.scale) == [0.8, 0.5]
    call = next(c for c in calls if c["prompt"] == "mira and tom talk")
    assert len(call["ip_adapter_image_embeds"]) == 2
    # one adapter pipeline per count, and the keyframe model without one for shot b
    assert worker.resident(requests["keyframe:a"]) is not pipe
    assert worker.resident(requests["keyframe:b"]).unet.encoder_hid_proj is None


def test_the_character_changes_the_picture(rendered):
    _, worker, cache, requests, _, _ = rendered
    req = requests["keyframe:a"]
    tom = requests["identity:tom"].output_key
    worker.run(replace(req, identity=((tom, 0.8),), output_key="as-tom"))
    worker.run(replace(req, identity=((req.identity[0][0], 0.0),), output_key="strength-0"))
    mira = cache.last_frame(req.output_key)
    assert not np.array_equal(mira, cache.last_frame("as-tom"))
    assert not np.array_equal(mira, cache.last_frame("strength-0"))


@pytest.mark.parametrize(("model", "cast"), [("tiny:flux:schnell", ["mira", "tom"]), ("tiny:sd3", ["tom"])])
def test_flux_and_sd3_draw_characters_with_their_own_ip_adapters(tmp_path, model, cast):
    """XLabs' FLUX adapter (CLIP image encoder, several side by side) and InstantX's SD 3.5 adapter
    (SigLIP, one per call), through diffusers' own mixins, with the tiny builds."""
    from farm.cache import ArtifactCache
    from farm.gpu.worker import StageWorker
    from farm.jobbook import JobBook
    from farm.jobsetup import setup_job

    data = cast_manifest(tmp_path, models={"keyframe": model, "video": "tiny"})
    data["shots"][0]["characters"], data["shots"][2]["characters"] = cast, cast
    book = JobBook("j", setup_job(data, tmp_path), str(tmp_path / "out"))
    worker, cache = StageWorker("w", tier="cpu"), ArtifactCache(tmp_path / "cache")
    for name in cast:
        req = book.request(f"identity:{name}", "cpu", str(tmp_path / "cache"))
        worker.run(req)
        finished(book, req.stage, req.output_key)
    keyframe = book.request("keyframe:a", "cpu", str(tmp_path / "cache"))
    worker.run(keyframe)
    pipe = worker.resident(keyframe)
    assert len(pipe.transformer.encoder_hid_proj.image_projection_layers if model.startswith("tiny:flux")
               else [pipe.transformer.image_proj]) == len(cast)
    calls = spy_on(pipe)
    worker.run(replace(keyframe, output_key="again"))
    (call,) = calls
    cached = [torch.from_numpy(cache.get_arrays(key)["embeds"]) for key, _ in keyframe.identity]
    if model.startswith("tiny:flux"):  # FLUX: positive and negative (a black image's) embeddings apart
        assert [torch.equal(a, b[1:2]) for a, b in zip(call["ip_adapter_image_embeds"], cached, strict=True)] == \
            [True] * len(cast)
        assert all(torch.equal(a, b[0:1]) for a, b in zip(call["negative_ip_adapter_image_embeds"], cached,
                                                           strict=True))
    else:  # SD 3.5: one tensor, the unconditional zeros first under CFG
        assert torch.equal(call["ip_adapter_image_embeds"], cached[0]) and torch.all(cached[0][0] == 0)
    assert np.array_equal(cache.last_frame("again"), cache.last_frame(keyframe.output_key))  # deterministic
    worker.run(replace(keyframe, identity=tuple((key, 0.0) for key, _ in keyframe.identity), output_key="none"))
    assert not np.array_equal(cache.last_frame("none"), cache.last_frame(keyframe.output_key))


# --- pickled official weights -------------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_adapter_weights_are_converted_once_and_load_as_safetensors(tmp_path):
    from safetensors import safe_open

    from farm.contract import IdentityAdapter
    from farm.gpu.identity import load_identity_adapter, tiny_adapter_state_dict
    from farm.gpu.loading import load_pipeline
    from farm.gpu.tiny import vision_encoder
    from farm.models import resolve_model

    pipe = load_pipeline(resolve_model("keyframe", "tiny:sdxl"))
    state = tiny_adapter_state_dict(pipe.unet)
    torch.save(state, tmp_path / "ip-adapter.bin")  # the nested layout h94's .bin files have
    vision_encoder(32).save_pretrained(tmp_path / "image_encoder")
    run = [sys.executable, "-m", "farm.cli", "convert-weights", str(tmp_path / "ip-adapter.bin")]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "ip-adapter.safetensors"
    with safe_open(str(out), "pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("image_proj.proj.weight"), state["image_proj"]["proj.weight"])
    assert names == {f"{group}.{k}" for group, inner in state.items() for k in inner}
    from farm.models import ModelError

    with pytest.raises(ModelError, match="must be .safetensors"):  # the render path never loads the pickle
        load_identity_adapter(pipe, IdentityAdapter("ip_adapter", str(tmp_path / "ip-adapter.bin"),
                                                    str(tmp_path / "image_encoder")), torch.float32, "sdxl")
    # the real (non-tiny) loading path reads it: diffusers' load_ip_adapter from a local safetensors file
    load_identity_adapter(pipe, IdentityAdapter("ip_adapter", str(out), str(tmp_path / "image_encoder")),
                          torch.float32, "sdxl")
    assert len(pipe.unet.encoder_hid_proj.image_projection_layers) == 1
    assert subprocess.run(run, capture_output=True, text=True, timeout=120).returncode == 2  # exists: --force
    torch.save({"image_proj": {"w": torch.ones(1)}, "evil": Payload()}, tmp_path / "evil.bin")
    evil = subprocess.run([sys.executable, "-m", "farm.cli", "convert-weights", str(tmp_path / "evil.bin")],
                          capture_output=True, text=True, timeout=120)
    assert evil.returncode == 2 and "weights_only refused" in evil.stderr and "pwned" not in evil.stdout
    assert not (tmp_path / "evil.safetensors").exists()


# --- QC and faces ---------------------------------------------------------------------------------

def test_the_stand_in_face_metric_is_computed_labelled_and_never_gates(tmp_path):
    from farm.faces import identity_metrics, load_rgb
    from farm.qc import resolve

    ref = noise_png(tmp_path / "ref.png", 5)
    image = load_rgb(str(ref))
    same = identity_metrics(image, {"faces": "stand-in", "characters": {"mira": [str(ref)]}})
    other = identity_metrics(load_rgb(str(noise_png(tmp_path / "x.png", 6))),
                             {"faces": "stand-in", "characters": {"mira": [str(ref)]}})
    assert same["identity"] == pytest.approx(1.0) and abs(other["identity"]) < 0.5
    assert same["identity_by"] == "stand-in"
    assert "identity" not in resolve(None, None, tiny=True).thresholds  # never gates on tiny renders
    assert resolve(None, None).thresholds["identity"] == 0.35  # gates with a real face model
    unavailable = identity_metrics(image, {"faces": None, "characters": {"mira": [str(ref)]}})
    assert unavailable["identity"] is None and "unavailable" in unavailable["identity_by"]
    assert identity_metrics(image, {"faces": "stand-in", "characters": {}}) == {}


# --- InstantID (SDXL, as the seeds draw keyframes) ---------------------------------------------------

def test_instantid_draws_one_face_per_keyframe(tmp_path):
    data = cast_manifest(tmp_path)
    data["characters"]["mira"]["method"] = "instantid"
    errors = errors_of(data, tmp_path)
    assert list(errors) == ["shots[2].characters"] and "one face per keyframe" in errors["shots[2].characters"]
    data["shots"][2]["characters"] = ["mira"]
    assert mf.validate_data(data, tmp_path).characters["mira"].method == "instantid"
    from farm.jobsetup import setup_job

    data["shots"][1]["characters"] = ["tom"]
    record = setup_job(data, tmp_path).adapter_record()  # what the lockfile says of each method's files
    assert record["instantid"]["faces"] == "stand-in" and record["instantid"]["identitynet"].startswith("tiny")
    assert record["ip_adapter"]["image_encoder"].startswith("tiny")  # tom, in shot b, is drawn with IP-Adapter


def test_real_adapters_are_named_in_the_farm_config(tmp_path):
    from farm.config import FarmConfig, current, install
    from farm.jobsetup import adapter_problem, identity_adapter
    from farm.models import resolve_model

    sdxl = resolve_model("keyframe", "stabilityai/stable-diffusion-xl-base-1.0")
    before = current()
    try:
        install(FarmConfig())
        assert 'models.paths["ip_adapter:sdxl"]' in adapter_problem(sdxl, None)
        assert 'models.paths["instantid:sdxl"]' in adapter_problem(sdxl, "instantid")
        (tmp_path / "ip.safetensors").write_bytes(b"x")
        (tmp_path / "encoder").mkdir()
        (tmp_path / "identitynet").mkdir()
        paths = {"ip_adapter:sdxl": str(tmp_path / "ip.safetensors"), "image_encoder:sdxl": str(tmp_path / "encoder"),
                 "instantid:sdxl": str(tmp_path / "ip.safetensors"), "identitynet:sdxl": str(tmp_path / "identitynet")}
        install(FarmConfig.model_validate({"models": {"paths": paths}}))
        assert adapter_problem(sdxl, None) is None
        assert "face model" in adapter_problem(sdxl, "instantid")  # InstantID embeds faces: insightface's folder
        (tmp_path / "faces").mkdir()
        install(FarmConfig.model_validate({"models": {"paths": paths | {"faces": str(tmp_path / "faces")}}}))
        adapter = identity_adapter(sdxl, "instantid")
        assert adapter.controlnet == str(tmp_path / "identitynet") and not adapter.tiny
    finally:
        install(before)


def test_the_identity_key_is_taken_at_setup_from_the_adapter_bytes(tmp_path):
    """An identity request reads no file: the key is computed once at setup (a deleted adapter made the
    director's dispatch raise on every pass). It follows the adapter's bytes, not its name."""
    from farm.config import FarmConfig, current, install
    from farm.jobbook import JobBook
    from farm.jobsetup import identity_stage_key, setup_job
    from farm.models import resolve_model

    sdxl = resolve_model("keyframe", "stabilityai/stable-diffusion-xl-base-1.0")
    weights, encoder = tmp_path / "ip.safetensors", tmp_path / "encoder"
    weights.write_bytes(b"one")
    encoder.mkdir()
    (encoder / "model.safetensors").write_bytes(b"enc")
    from farm.hashing import weights_digest

    before = current()
    try:
        install(FarmConfig())  # nothing configured: no key (an unset path once hashed the working directory)
        assert identity_stage_key(sdxl, "ip_adapter", ["a" * 64]) is None
        with pytest.raises(FileNotFoundError):
            weights_digest("")
        install(FarmConfig.model_validate({"models": {"paths": {"ip_adapter:sdxl": str(weights),
                                                                  "image_encoder:sdxl": str(encoder)}}}))
        first = identity_stage_key(sdxl, "ip_adapter", ["a" * 64])
        assert first is not None and first == identity_stage_key(sdxl, "ip_adapter", ["a" * 64])
        assert identity_stage_key(sdxl, "ip_adapter", ["b" * 64]) != first
        weights.write_bytes(b"two")
        assert identity_stage_key(sdxl, "ip_adapter", ["a" * 64]) not in (None, first)
        weights.unlink()
        assert identity_stage_key(sdxl, "ip_adapter", ["a" * 64]) is None  # the submit check names the file
    finally:
        install(before)
    root = tmp_path / "job"
    root.mkdir()
    book = JobBook("j", setup_job(cast_manifest(root), root), str(root / "out"))
    mira = book.setup.characters["mira"]
    assert mira.key and book.request("identity:mira", "cpu").output_key == mira.key


@pytest.fixture(scope="module")
def instantid(tmp_path_factory):
    from farm.cache import ArtifactCache
    from farm.gpu.worker import StageWorker
    from farm.jobbook import JobBook
    from farm.jobsetup import setup_job

    root = tmp_path_factory.mktemp("instantid")
    data = cast_manifest(root)
    data["characters"]["mira"]["method"] = "instantid"
    data["shots"][2]["characters"] = ["mira"]
    book = JobBook("j", setup_job(data, root), str(root / "out"))
    worker, cache_dir = StageWorker("w", tier="cpu"), str(root / "cache")
    identity = book.request("identity:mira", "cpu", cache_dir)
    worker.run(identity)
    finished(book, "identity:mira", identity.output_key)
    keyframe = book.request("keyframe:a", "cpu", cache_dir)
    worker.run(keyframe)
    pipe = worker.resident(keyframe)
    calls, seen = spy_on(pipe), []
    pipe.controlnet.register_forward_pre_hook(  # after the farm's hook: sees what IdentityNet really reads
        lambda _m, _a, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    worker.run(replace(keyframe, output_key="again"))
    return identity, keyframe, worker, ArtifactCache(cache_dir), calls, seen


def spy_on(pipe):
    calls = []
    original = type(pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    pipe.__class__ = type(f"Spied{type(pipe).__name__}", (type(pipe),), {"__call__": spy})
    return calls


def test_instantid_identity_is_a_face_embedding_and_keypoints(instantid):
    identity, _, _, cache, _, _ = instantid
    assert identity.params["faces"] == "stand-in" and identity.adapter.method == "instantid"
    arrays = cache.get_arrays(identity.output_key)
    assert arrays["embeds"].shape == (2, 1, 1, 512) and np.all(arrays["embeds"][0] == 0)
    assert np.linalg.norm(arrays["embeds"][1]) == pytest.approx(1.0, abs=1e-5)
    assert arrays["points"].shape == (5, 2) and np.all((arrays["points"] > 0) & (arrays["points"] < 1))


def test_instantid_keyframe_gets_identitynet_the_keypoints_and_the_face(instantid):
    identity, keyframe, worker, cache, calls, seen = instantid
    pipe = worker.resident(keyframe)
    assert type(pipe).__name__.endswith("StableDiffusionXLControlNetPipeline")
    (call,) = calls
    assert call["controlnet_conditioning_scale"] == 0.8
    (embeds,) = call["ip_adapter_image_embeds"]
    assert torch.equal(embeds, torch.from_numpy(cache.get_arrays(identity.output_key)["embeds"]))
    kps = np.asarray(call["image"])  # the keypoints drawn at the keyframe's size: dots on black
    assert kps.shape[:2] == (keyframe.params["height"], keyframe.params["width"])
    points = cache.get_arrays(identity.output_key)["points"] * [kps.shape[1], kps.shape[0]]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]  # eyes, nose, mouth corners
    for (x, y), colour in zip(points, colours, strict=True):
        assert tuple(kps[int(y), int(x)]) == colour
    assert kps[0, 0].tolist() == [0, 0, 0]
    # IdentityNet cross-attends to the 16 face tokens, not the prompt (unconditional and conditional)
    assert seen and all(t.shape == (2, 16, pipe.unet.config.cross_attention_dim) for t in seen)
    assert cache.last_frame("again").shape == cache.last_frame(keyframe.output_key).shape


def test_instantid_without_a_face_model_says_so(instantid):
    from farm.models import ModelError

    identity, _, worker, _, _, _ = instantid
    with pytest.raises(ModelError, match="needs a face model"):
        worker.run(replace(identity, params={**identity.params, "faces": None}, output_key="none"))


def test_instantid_weights_load_from_files_like_the_official_ones(tmp_path):
    from farm.contract import IdentityAdapter
    from farm.gpu.identity import convert_pickle, load_identity_adapter, tiny_identitynet, tiny_instantid_state_dict
    from farm.gpu.loading import load_pipeline
    from farm.models import resolve_model

    pipe = load_pipeline(resolve_model("keyframe", "tiny:sdxl"))
    torch.save(tiny_instantid_state_dict(pipe.unet), tmp_path / "ip-adapter.bin")  # InstantID ships a .bin
    convert_pickle(tmp_path / "ip-adapter.bin", tmp_path / "ip-adapter.safetensors")
    tiny_identitynet(pipe.unet).save_pretrained(tmp_path / "ControlNetModel")
    out = load_identity_adapter(pipe, IdentityAdapter("instantid", str(tmp_path / "ip-adapter.safetensors"), "",
                                                      controlnet=str(tmp_path / "ControlNetModel")), torch.float32,
                                "sdxl")
    assert type(out).__name__ == "StableDiffusionXLControlNetPipeline"
    assert type(out.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterPlusImageProjection"


# --- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_render_draws_the_character_in_the_shots_that_list_them(ray_session, tiny_models, tmp_path):
    import pyarrow.parquet as pq

    from farm import cli
    from farm.hashing import file_hash

    root = tmp_path / "story"
    data = cast_manifest(root)
    data["shots"][2]["characters"] = ["mira"]  # the character in two of three shots
    data["characters"].pop("tom")
    path = write_manifest(root, data)
    out = tmp_path / "out"
    assert cli.main(["render", str(path), "-o", str(out), "--models", "tiny", "--workers", "2", "--tier", "low",
                     "--quiet"]) == 0
    lock = json.loads((out / "manifest.lock.json").read_text())
    cast = {shot["id"]: shot["characters"] for shot in lock["shots"]}
    assert [c["name"] for c in cast["a"]] == [c["name"] for c in cast["c"]] == ["mira"] and cast["b"] == []
    refs = cast["a"][0]["references"]
    assert [r["path"] for r in refs] == ["refs/mira_front.png", "refs/mira_side.png"]
    assert [r["sha256"] for r in refs] == [file_hash(str(root / r["path"])) for r in refs]
    assert cast["a"][0]["method"] == "ip_adapter" and cast["a"][0]["strength"] == 0.8
    assert cast["a"][0]["adapter"].startswith("tiny") and cast["a"][0]["embeddings_key"]
    rows = pq.read_table(out / "ledger.parquet").to_pylist()
    identity = [r for r in rows if r["stage"] == "identity:mira" and r["outcome"] == "succeeded"]
    assert len(identity) == 1  # once for both shots
    qc = {shot["id"]: shot["qc"]["takes"][-1]["metrics"] for shot in lock["shots"]}
    assert qc["a"]["identity_by"] == "stand-in" and isinstance(qc["a"]["identity"], float)
    assert "identity" not in qc["b"]
    assert "identity" not in lock["shots"][0]["qc"]["gates"]["thresholds"]  # the stand-in never gates
    report = (out / "report.html").read_text()
    assert report.count("<div class='character'>") == 2  # shots a and c, their references beside them
    assert "title='refs/mira_side.png' src='data:image/png" in report and "by stand-in" in report
