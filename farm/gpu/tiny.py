"""Tiny stand-ins of the real pipelines: the same diffusers classes with tiny random weights.

They are built locally (no download), deterministically (same weights on every build), and saved
once to the farm's state dir, so loading a tiny model goes through the same `from_pretrained`
folder path as a real one. Their output is noise; their purpose is that every line of the real
render path runs in tests and the offline demo in a second or two on a laptop CPU.

Shapes follow the real models where the pipelines depend on them (4 latent channels, a VAE that
downsamples by 8, SDXL's two text encoders and micro-conditioning, SVD's 224x224 CLIP vision
input) and are shrunk everywhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.models import tiny_dir_name
from farm.paths import state_dir

if TYPE_CHECKING:  # the heavy imports stay lazy so `import farm.tiny` is cheap
    from diffusers import I2VGenXLPipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline
    from transformers import CLIPTokenizer

FAMILIES = ("sdxl", "svd", "i2vgen")
SEED = 0

# Byte-level CLIP vocab: 256 byte symbols, their end-of-word forms, then the two specials, in the
# same order as the real CLIP vocab (whose specials are its last two ids).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 2 * 256 + 2
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
MAX_TOKENS = 77  # CLIP's context length; the pipelines pad prompts to tokenizer.model_max_length
CLIP_IMAGE_SIZE = 224  # SVD resizes its conditioning image to 224x224 whatever the output size
TEXT_DIM = 32
# The default output size when a caller passes none: unet sample_size * vae scale factor (8).
SAMPLE_SIZE = 8


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (so BPE never sees whitespace/control)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def byte_level_vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab[BOS] = BOS_ID
    vocab[EOS] = EOS_ID
    assert len(vocab) == VOCAB_SIZE
    return vocab


def build_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer from a local byte-level vocab and an empty merges file.

    Without merges every word tokenizes to its bytes, which is all a random text encoder needs;
    going through vocab.json/merges.txt keeps the real tokenizer's loading path.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="farm-tiny-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(byte_level_vocab()), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)


def _text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        # The pooled output is read at the first eos id; with the real id (not the legacy 2) CLIP
        # finds it in the input instead of taking argmax over token ids.
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        **extra,
    )


def _vision_encoder(projection_dim: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=14,  # 16x16 patches at 224 px keeps the encoder small
    )
    return CLIPVisionModelWithProjection(config)


def _feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=CLIP_IMAGE_SIZE, size=CLIP_IMAGE_SIZE)


def _image_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    # Four levels so the latent is 1/8 of the image like the real VAEs; thin channels for speed.
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=SAMPLE_SIZE * 8,
        scaling_factor=scaling_factor,
    )


@contextlib.contextmanager
def _seeded():
    """Fix the RNG for weight init without disturbing the caller's global RNG stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    add_time_dim = 8
    with _seeded():
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=add_time_dim,
            # 6 micro-conditioning ids (original size, crop, target size) + text_encoder_2's pooled embeds
            projection_class_embeddings_input_dim=6 * add_time_dim + TEXT_DIM,
            # the two encoders' hidden states are concatenated
            cross_attention_dim=2 * TEXT_DIM,
            norm_num_groups=32,
        )
        vae = _image_vae(scaling_factor=0.13025)  # SDXL's VAE scale
        text_encoder = CLIPTextModel(_text_config())
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_DIM))
    # SDXL base ships an Euler scheduler; load_pipeline swaps in DPM++ 2M Karras for real and tiny alike.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )
    tokenizer = build_tokenizer()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def svd_xt_scheduler():
    """EulerDiscreteScheduler configured as in SVD-XT's scheduler_config.json."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )


def build_tiny_svd() -> StableVideoDiffusionPipeline:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )

    add_time_dim = 32
    cross_dim = 32
    with _seeded():
        unet = UNetSpatioTemporalConditionModel(
            sample_size=SAMPLE_SIZE,
            in_channels=8,  # noisy latents + the conditioning image's latents
            out_channels=4,
            # the spatio-temporal blocks hard-code 32 norm groups, so channels are multiples of 32
            # Attention only at the deepest (1/4) level: spatial self-attention is quadratic in pixels,
            # and at full latent size it made a 1024x576 tiny render take minutes per segment.
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlockSpatioTemporal", "DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
            up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
            cross_attention_dim=cross_dim,
            num_attention_heads=(2, 2, 4),
            addition_time_embed_dim=add_time_dim,
            projection_class_embeddings_input_dim=3 * add_time_dim,  # fps, motion bucket, noise aug
            num_frames=8,
        )
        # The temporal decoder also hard-codes 32 norm groups.
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 32, 32, 32),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            sample_size=SAMPLE_SIZE * 8,
        )
        image_encoder = _vision_encoder(projection_dim=cross_dim)
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=svd_xt_scheduler(),
        feature_extractor=_feature_extractor(),
    )


def build_tiny_i2vgen() -> I2VGenXLPipeline:
    from diffusers import DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet
    from transformers import CLIPTextModel

    cross_dim = TEXT_DIM  # text embeddings and the image embedding both feed cross-attention
    with _seeded():
        unet = I2VGenXLUNet(
            sample_size=SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64),  # attention only at the 1/4 level, as for tiny SVD
            layers_per_block=1,
            down_block_types=("DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D"),
            up_block_types=("CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"),
            cross_attention_dim=cross_dim,
            attention_head_dim=4,
            norm_num_groups=32,
        )
        vae = _image_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_text_config())
        image_encoder = _vision_encoder(projection_dim=cross_dim)
    # I2VGen-XL samples with DDIM on a v-prediction, zero-terminal-SNR cosine schedule.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    return I2VGenXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        image_encoder=image_encoder,
        feature_extractor=_feature_extractor(),
        unet=unet,
        scheduler=scheduler,
    )


BUILDERS: dict[str, Callable[[], Any]] = {"sdxl": build_tiny_sdxl, "svd": build_tiny_svd, "i2vgen": build_tiny_i2vgen}


def _is_complete(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def tiny_dir(family: str) -> Path:
    """The saved tiny model of `family`, built on first use under the state dir.

    The folder is written beside its final place and renamed in, so a reader never sees a half-saved
    model; when several processes race, the first rename wins and the others drop their copy.
    """
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {', '.join(FAMILIES)}")
    final = state_dir() / "models" / tiny_dir_name(family)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        BUILDERS[family]().save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process got there first (the rename target is a non-empty dir): use theirs.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
