"""The `tiny` preset: a random-weight Kandinsky 5 T2V pipeline built offline, in code.

Every component is the real class the hub checkpoints use (Kandinsky5Transformer3DModel,
AutoencoderKLHunyuanVideo, Qwen2_5_VLForConditionalGeneration + Qwen2VLProcessor, CLIPTextModel +
CLIPTokenizer, FlowMatchEulerDiscreteScheduler), only small. It is saved in diffusers format and
loaded back through `Kandinsky5T2VPipeline.from_pretrained`, the same path real checkpoints take.
Its videos are noise: the weights are random.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Bump when the architecture or the build recipe changes, so cached builds are not reused.
TINY_VERSION = "2"

# The pipeline drops the first 128 tokens of its prompt template (the system prompt) from the
# Qwen embeddings. The real Qwen tokenizer spends exactly those on the template; the tiny
# tokenizer is trained on the template so that it does too, and prompt-length limits mean the same.
TEMPLATE_TOKENS = 128
_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
_CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
_QWEN_VOCAB = 568  # the size at which the template prefix is exactly TEMPLATE_TOKENS
_CLIP_VOCAB = 600
# A little ordinary prompt language besides the template, so prompts tokenize like text, not bytes.
_CORPUS = [
    "a cat dancing in the rain", "a dog running on the beach at sunset",
    "a red car driving through a city street at night", "slow motion waves crashing on rocks",
    "a timelapse of clouds over snowy mountains", "close-up of a flower opening in the morning light",
]

# Transformer dims: 4 heads of 16 so that sequence-parallel degrees 2 and 4 divide the heads, as
# they do for Lite (28 heads) at 2 and 4.
TRANSFORMER = dict(
    in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=32, time_dim=32,
    patch_size=(1, 2, 2), model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2,
    axes_dims=(4, 6, 6), visual_cond=False,
)


def _template_prefix() -> str:
    """The system part of the pipeline's Qwen prompt template (everything before the prompt)."""
    from diffusers import Kandinsky5T2VPipeline

    template = Kandinsky5T2VPipeline(None, None, None, None, None, None, None).prompt_template
    return template.split("{}")[0]


def _train_bpe(tokenizer, vocab_size: int, special: list[str], corpus: list[str]):
    """Train the tokenizer's own backend (its normalizer and pre-tokenizer kept) on `corpus`."""
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer._tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def build_tokenizers():
    """Qwen2VLProcessor and CLIPTokenizer with byte-level BPE vocabularies trained in-process."""
    from transformers import (
        CLIPTokenizer, Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor,
    )

    prefix = _template_prefix()
    qwen = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])
    _train_bpe(qwen, _QWEN_VOCAB, _QWEN_SPECIAL, [prefix] + _CORPUS)
    n = len(qwen(prefix)["input_ids"])
    if n != TEMPLATE_TOKENS:
        raise RuntimeError(f"tiny Qwen tokenizer encodes the template in {n} tokens, expected {TEMPLATE_TOKENS}")
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=qwen, video_processor=Qwen2VLVideoProcessor()
    )
    clip = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    _train_bpe(clip, _CLIP_VOCAB, _CLIP_SPECIAL, [prefix] + _CORPUS)
    return processor, clip


def build_tiny_pipeline():
    """Build the tiny random-weight Kandinsky5T2VPipeline deterministically (seeded per component)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline,
        Kandinsky5Transformer3DModel,
    )
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor, clip_tokenizer = build_tokenizers()
    qwen_tok = processor.tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=16, spatial_compression_ratio=8,
        temporal_compression_ratio=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.476986,
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(qwen_tok), "rope_theta": 1000000.0,
            "bos_token_id": qwen_tok.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": qwen_tok.convert_tokens_to_ids("<|im_end|>"),
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        vocab_size=len(qwen_tok),
        bos_token_id=qwen_tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=qwen_tok.convert_tokens_to_ids("<|im_end|>"),
        image_token_id=qwen_tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=qwen_tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=qwen_tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=qwen_tok.convert_tokens_to_ids("<|vision_end|>"),
    ))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    ))
    torch.manual_seed(0)
    transformer = Kandinsky5Transformer3DModel(**TRANSFORMER)
    _randomize_zero_init(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    return Kandinsky5T2VPipeline(
        transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=processor,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=clip_tokenizer, scheduler=scheduler,
    )


def _randomize_zero_init(model) -> None:
    """Give zero-initialized layers random weights too, so every block really shapes the output.

    Kandinsky 5 zero-initializes its modulation layers (the gates of every attention and feed-forward
    branch), as trained checkpoints start out. Left at zero, each block is the identity and attention
    would not touch a single frame: the tiny model could not tell a right parallel split from a wrong one.
    """
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def save_tiny(directory: str | os.PathLike) -> Path:
    """Build the tiny pipeline and write it to `directory` in diffusers format (safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory


def ensure_tiny(cache_dir: str | os.PathLike) -> Path:
    """Return the cached tiny build under `cache_dir`, building it once per node.

    Several actors on one node may race here; each builds into a private temp dir and renames it
    into place, so a reader never sees a half-written model and the loser just discards its copy.
    """
    target = Path(cache_dir) / f"tiny-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        save_tiny(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
