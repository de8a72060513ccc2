"""SDXL base, SVD-XT, I2VGen-XL, FLUX.1 schnell, Wan 2.2 TI2V-5B and LTX-Video at their real
architecture sizes, with random weights.

The architectures come from the component configs in bench/configs/ (copied from the models'
published config.json files); nothing is downloaded. Random weights render noise, but every
matmul, convolution and attention has the real shape, which is what speed and memory depend on.
Tokenizers are the farm's offline ones (farm.gpu.tiny: byte-level CLIP, character-level T5): prompts
are padded to the real sequence lengths either way, so the text encoders see real shapes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from farm.families import FAMILIES, family
from farm.gpu.loading import prepare_pipeline
from farm.models import ModelSpec

CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_FILES = {"sdxl": "sdxl.json", "svd": "svd_xt.json", "i2vgen": "i2vgen_xl.json", "flux": "flux1_schnell.json",
                "wan": "wan22_ti2v_5b.json", "ltx": "ltx_video.json"}
VARIANTS = {"svd": "xt", "flux": "schnell", "wan": "ti2v-5b", "ltx": "dev"}  # the variant each config holds
ROLES = {name: fam.role for name, fam in FAMILIES.items()}
FRAMES = {name: family(name).variant(VARIANTS.get(name)).frames_per_call if ROLES[name] == "video" else 1
          for name in CONFIG_FILES}
SEED = 0


def config(family: str) -> dict[str, dict[str, Any]]:
    data = json.loads((CONFIGS / CONFIG_FILES[family]).read_text(encoding="utf-8"))
    return {name: part for name, part in data.items() if not name.startswith("_")}


def pipeline_settings(family: str) -> dict[str, Any]:
    """Pipeline-level settings a config carries (`_pipeline`, e.g. Wan TI2V's expand_timesteps)."""
    data = json.loads((CONFIGS / CONFIG_FILES[family]).read_text(encoding="utf-8"))
    return dict(data.get("_pipeline", {}))


def spec(family: str) -> ModelSpec:
    """The ModelSpec a worker keys its resident pipeline on; `location` names the config file."""
    return ModelSpec(ROLES[family], f"realsize:{family}", family, "dir", str(CONFIGS / CONFIG_FILES[family]),
                     FRAMES[family], variant=VARIANTS.get(family) or family_default(family))


def family_default(name: str) -> str:
    return family(name).default_variant


@contextlib.contextmanager
def _building(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on `device` in `dtype` (no fp32 copy on the host first) from a fixed
    seed, without disturbing the caller's default dtype or RNG."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(SEED)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def component(name: str, cfg: dict[str, Any]) -> Any:
    """One model component from its config (call inside `_building`)."""
    params = {k: v for k, v in cfg.items() if not k.startswith("_")}
    class_name = cfg["_class_name"]
    if class_name in ("T5EncoderModel", "UMT5EncoderModel"):
        import transformers

        config_class = transformers.UMT5Config if class_name.startswith("UMT5") else transformers.T5Config
        return getattr(transformers, class_name)(config_class(**params))
    if class_name.startswith("CLIP"):
        import transformers

        if "Vision" in class_name:
            return getattr(transformers, class_name)(transformers.CLIPVisionConfig(**params))
        from farm.gpu.tiny import BOS_ID, EOS_ID

        # The special ids of the offline tokenizer; the pooled output is read at the eos token.
        text = transformers.CLIPTextConfig(**params, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
        return getattr(transformers, class_name)(text)
    import diffusers

    return getattr(diffusers, class_name).from_config(params)


def components(family: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The family's neural components (no tokenizer, scheduler or feature extractor). On the "meta"
    device nothing is allocated, which is how tests check sizes without gigabytes of weights."""
    cfg = config(family)
    with _building(device, dtype):
        built = {name: component(name, part).eval() for name, part in cfg.items() if name != "scheduler"}
    # A few diffusers buffers are made with the legacy torch.Tensor(...), which ignores the device context.
    return {name: module.to(device) for name, module in built.items()}


def build(family: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The whole pipeline at real size, random weights, prepared as the farm prepares a loaded one."""
    import diffusers

    from farm.gpu.tiny import build_t5_tokenizer, build_tokenizer, feature_extractor

    cfg = config(family)
    parts = components(family, device, dtype)
    parts["scheduler"] = getattr(diffusers, cfg["scheduler"]["_class_name"]).from_config(cfg["scheduler"])
    if family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**parts, tokenizer=build_tokenizer(),
                                                   tokenizer_2=build_tokenizer(), add_watermarker=False)
    elif family == "svd":
        pipe = diffusers.StableVideoDiffusionPipeline(**parts, feature_extractor=feature_extractor())
    elif family == "i2vgen":
        pipe = diffusers.I2VGenXLPipeline(**parts, tokenizer=build_tokenizer(), feature_extractor=feature_extractor())
    elif family == "flux":
        pipe = diffusers.FluxPipeline(**parts, tokenizer=build_tokenizer(), tokenizer_2=build_t5_tokenizer())
    elif family == "wan":
        pipe = diffusers.WanImageToVideoPipeline(**parts, tokenizer=build_t5_tokenizer(), image_processor=None,
                                                 image_encoder=None, **pipeline_settings(family))
    else:
        pipe = diffusers.LTXImageToVideoPipeline(**parts, tokenizer=build_t5_tokenizer())
    return prepare_pipeline(pipe, family)


def loader(spec: ModelSpec, *, device: str = "cpu", dtype: torch.dtype | None = None,
           loras: tuple[tuple[str, float], ...] = (), vae: str | None = None, cpu_offload: bool = False) -> Any:
    """A farm.gpu.worker Loader: builds the real-size pipeline where load_pipeline would have put it
    (on the host when it is to be offloaded)."""
    if loras or vae:
        raise ValueError("real-size random models take no LoRA or VAE override")
    if cpu_offload and str(device).startswith("cuda"):
        return built_on_card_for_host(spec.family, device, dtype or torch.float32)
    return build(spec.family, device if str(device).startswith("cuda") else "cpu", dtype or torch.float32)


def built_on_card_for_host(family: str, device: str, dtype: torch.dtype) -> Any:
    """An offloaded pipeline's random weights, drawn on the card and moved to the host: drawing 3-17B
    parameters on the host took 90 s for SDXL and outlasted FLUX.1's 70 s box on the first H200 lease
    (docs/gpu.md); on the card it takes seconds. The tier's memory cap is lifted while drawing and put
    back before the stage runs, so what the stage may use is unchanged."""
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is None:  # an older torch: no way to put the cap back, so draw on the host
        return build(family, "cpu", dtype)
    cap = fraction()
    torch.cuda.set_per_process_memory_fraction(1.0)
    try:
        pipe = build(family, device, dtype)
        pipe.to("cpu")
    except torch.OutOfMemoryError:  # a card smaller than the model: the slow way
        pipe = None
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap)
    return pipe if pipe is not None else build(family, "cpu", dtype)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
