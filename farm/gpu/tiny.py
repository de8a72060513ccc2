"""Tiny stand-ins of the real pipelines: the same diffusers classes with tiny random weights.

They are built locally (no download), deterministically (same weights on every build), and saved
once to the farm's state dir, so loading a tiny model goes through the same `from_pretrained`
folder path as a real one. Their output is noise; their purpose is that every line of the real
render path runs in tests and the offline demo in a second or two on a laptop CPU.

Each family's builder lives in its GPU half (farm/gpu/families/<family>.py); this module holds what
they share: offline tokenizers (a byte-level CLIP BPE, a character-level T5), tiny text and vision
encoders, a tiny image VAE, seeded construction, and the saved folder under the state dir. Shapes
follow the real models where the pipelines depend on them (latent channels, the VAE's compression,
text encoder layouts, SVD's 224x224 CLIP vision input) and are shrunk everywhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.models import tiny_dir_name
from farm.paths import state_dir

if TYPE_CHECKING:  # the heavy imports stay lazy so `import farm.gpu.tiny` is cheap
    from transformers import CLIPTokenizer, T5Tokenizer

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


T5_VOCAB_SIZE = 256  # embedding rows; the tokenizer uses the first 192 ids


def build_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A T5/UMT5 tokenizer without sentencepiece: a Unigram model over single ASCII characters, built
    in memory (transformers 5's T5Tokenizer is backed by the `tokenizers` library). Layout as T5's:
    <pad>=0, </s>=1, <unk>=2; other characters become <unk>."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def t5_encoder(d_model: int = 32, umt5: bool = False) -> Any:
    """A tiny T5 v1.1 / UMT5 encoder (gated-gelu), in eval mode with no dropout: deterministic."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs: dict[str, Any] = {
        "vocab_size": T5_VOCAB_SIZE, "d_model": d_model, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0}
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


def in_eval(pipe: Any) -> Any:
    """eval() every sub-model, as from_pretrained returns them (fresh modules are in training mode)."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def text_config(**extra: Any) -> Any:
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


def vision_encoder(projection_dim: int) -> Any:
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


def feature_extractor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=CLIP_IMAGE_SIZE, size=CLIP_IMAGE_SIZE)


def image_vae(scaling_factor: float) -> Any:
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


def flow_vae(scaling_factor: float, shift_factor: float) -> Any:
    """A tiny 16-channel image VAE like FLUX's and SD3's (x8, no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor)


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """Fix the RNG for weight init without disturbing the caller's global RNG stream."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def _is_complete(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def tiny_dir(family: str, variant: str | None = None) -> Path:
    """The saved tiny model of `family` (and variant), built on first use under the state dir by the
    family's GPU half (farm/gpu/families/<family>.py).

    The folder is written beside its final place and renamed in, so a reader never sees a half-saved
    model; when several processes race, the first rename wins and the others drop their copy.
    """
    from farm.gpu.families import gpu_family

    gpu = gpu_family(family)
    variant = variant or gpu.rules.default_variant
    final = state_dir() / "models" / tiny_dir_name(family, variant)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        gpu.build_tiny(variant).save_pretrained(tmp)
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
