"""The `tiny` preset: a random-weight Kandinsky 5 T2V pipeline built offline, in code.

Every component is the real class the hub checkpoints use (Kandinsky5Transformer3DModel,
AutoencoderKLHunyuanVideo, Qwen2_5_VLForConditionalGeneration + Qwen2VLProcessor, CLIPTextModel +
CLIPTokenizer, FlowMatchEulerDiscreteScheduler), only small. The Qwen tokenizer is the real one (its
vocabulary from the BPE ranks Alibaba's dashscope SDK ships), so prompts count as many tokens as on the
real checkpoints and validation agrees with them. It is saved in diffusers format and loaded back
through `Kandinsky5T2VPipeline.from_pretrained`, the same path real checkpoints take.
Its videos are noise: the weights are random.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the architecture or the build recipe changes, so cached builds are not reused.
# 5: the saved tokenizers' configs list their added tokens (`save_tiny`); 6: a smaller T2I/I2I VAE (`tiny_k5`).
TINY_VERSION = "6"

# The pipeline drops the first 128 tokens of its prompt template (the system prompt) from the
# Qwen embeddings; with the real Qwen tokenizer the template's head is exactly that long (checked at build).
TEMPLATE_TOKENS = 128
# Qwen2.5-VL's special tokens, in id order after the 151,643 BPE tokens (ids 151643-151664).
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
_CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
_CLIP_VOCAB = 600
# A little ordinary prompt language, so the tiny CLIP tokenizer tokenizes like text, not bytes.
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


def _train_bpe(tokenizer, vocab_size: int, special: list[str], corpus: list[str], **options):
    """Train the tokenizer's own backend (its normalizer and pre-tokenizer kept) on `corpus`; `options` go to the
    BpeTrainer."""
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **options,
    )
    tokenizer._tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def qwen_bpe_ranks() -> str:
    """The path of Qwen's byte-level BPE ranks (`qwen.tiktoken`), as Alibaba's dashscope SDK ships them.

    Qwen2 and Qwen2.5 use Qwen's tokenizer unchanged (151,643 BPE tokens; the Qwen2 technical report),
    so these ranks and the Qwen2 pre-tokenizer give the real checkpoints' token ids. Located without
    importing the SDK (only its data file is needed).
    """
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("Qwen's BPE ranks not found: the tiny preset needs the `dashscope` package "
                                "(its resources/qwen.tiktoken)")
    return str(path)


@functools.cache  # ~2.5 CPU-s of pure Python per call, and a process building several presets needs it for each
def _vocab_and_merges(ranks_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE ranks as a vocabulary and one merge per multi-byte token, in rank order (callers copy them).

    A token's merge is the pair that byte-pair encoding of its bytes with the lower ranks ends on: the
    151,387 merges of Qwen2's own merges.txt. (transformers' TikTokenConverter lists every valid split,
    294,166 merges that tokenize the same but make each process load the tokenizer 0.5 s slower.)
    """
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_tiktoken_bpe(ranks_path)
    to_text = bytes_to_unicode()
    text = lambda token: "".join(to_text[byte] for byte in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([byte]) for byte in token]
        while len(parts) > 2:
            merged, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if merged >= rank:  # no lower-ranked pair left: not a token BPE could build (none in Qwen's ranks)
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    return {text(token): rank for token, rank in ranks.items()}, merges


def build_qwen_tokenizer():
    """Qwen2.5-VL's tokenizer, built offline: the real vocabulary, merges, pre-tokenizer, NFC and special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab_and_merges(qwen_bpe_ranks())
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))  # adds <|endoftext|> as id 151643
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL])
    ids = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL)
    if ids != list(range(len(vocab), len(vocab) + len(QWEN_SPECIAL))):
        raise RuntimeError(f"Qwen special tokens got ids {ids}, expected them right after the {len(vocab)} BPE tokens")
    return tokenizer


def build_tokenizers():
    """Qwen2VLProcessor around the real Qwen tokenizer, and a CLIPTokenizer with a BPE trained in-process.

    CLIP's tokens are cut at 77 by the pipeline and never validated, so a small vocabulary does there.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    qwen = build_qwen_tokenizer()
    prefix = _template_prefix()
    n = len(qwen(prefix)["input_ids"])
    if n != TEMPLATE_TOKENS:
        raise RuntimeError(f"the Qwen tokenizer encodes the template in {n} tokens, expected {TEMPLATE_TOKENS}")
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=qwen, video_processor=Qwen2VLVideoProcessor()
    )
    return processor, build_clip_tokenizer([prefix] + _CORPUS, word_ends=False)


def build_clip_tokenizer(corpus: list[str] | None = None, word_ends: bool = True):
    """A CLIPTokenizer whose small BPE is trained in-process on `corpus` (a little prompt language by default).

    With `word_ends` the trainer learns CLIP's word-final tokens (`cat</w>`), the form in which a CLIPTokenizer loaded
    from disk looks up a word's last piece, and the result is put in a canonical order. Without, as the Kandinsky
    presets are built (since TINY_VERSION 4), a saved and reloaded tokenizer finds no word's last piece (<|endoftext|>).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    corpus = _CORPUS if corpus is None else corpus
    if not word_ends:
        return _train_bpe(clip, _CLIP_VOCAB, _CLIP_SPECIAL, corpus)
    suffix = clip._tokenizer.model.end_of_word_suffix
    trained = _train_bpe(clip, _CLIP_VOCAB, _CLIP_SPECIAL, corpus, end_of_word_suffix=suffix)
    # The trainer numbers word-final characters, and so breaks ties between merges, in hash-map order: another
    # order per process. Sorted by length then text, tokens and merges are the same in every build. Every byte is
    # a token word-final too, as in CLIP's own vocabulary (a comma is a word of its own).
    model = json.loads(trained._tokenizer.to_str())["model"]
    rank = {token: i for i, token in enumerate(_CLIP_SPECIAL)}
    vocab = set(model["vocab"]) | {char + suffix for char in pre_tokenizers.ByteLevel.alphabet()}
    tokens = sorted(vocab, key=lambda token: (rank.get(token, len(rank)), len(token), token))
    merges = sorted((tuple(pair) for pair in model["merges"]), key=lambda pair: (len(pair[0]) + len(pair[1]), pair))
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny random-weight Kandinsky5T2VPipeline deterministically (seeded per component).

    `seed` picks another draw of the transformer's weights (the text encoders and VAE stay the same): a second
    tiny model to sweep against the first (`tiny:1`).
    """
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
    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(**TRANSFORMER)
    _randomize_zero_init(transformer, 1 + seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    return Kandinsky5T2VPipeline(
        transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=processor,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=clip_tokenizer, scheduler=scheduler,
    )


def _randomize_zero_init(model, seed: int) -> None:
    """Give zero-initialized layers random weights too, so every block really shapes the output.

    Kandinsky 5 zero-initializes its modulation layers (the gates of every attention and feed-forward
    branch), as trained checkpoints start out. Left at zero, each block is the identity and attention
    would not touch a single frame: the tiny model could not tell a right parallel split from a wrong one.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def save_tiny(directory: str | os.PathLike, seed: int = 0, builder: str = "pipelines.tiny:build_tiny_pipeline") -> Path:
    """Build a tiny pipeline (`builder`: "module:function(seed)", the T2V one by default) and write it to
    `directory` in diffusers format (safetensors)."""
    import importlib

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        # transformers' save_pretrained writes weights on rank 0 only: this build would lack its text encoders'.
        raise RuntimeError(f"building a tiny preset on rank {dist.get_rank()} of a process group would save it "
                           "without weights; resolve the model before joining the gang")
    module, function = builder.split(":")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = getattr(importlib.import_module(module), function)(seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    write_added_tokens(directory, pipe.components)
    return directory


def write_added_tokens(directory: Path, components: dict) -> None:
    """Each saved tokenizer's `added_tokens_decoder` in its `tokenizer_config.json`, as the hub's checkpoints carry
    it (Qwen2.5-VL's lists ids 151643-151664). transformers 5's `save_pretrained` leaves it out, and a tokenizer
    loaded without it parses its whole `tokenizer.json` once more just for those tokens: for the real Qwen
    vocabulary (11 MB) that is half of every load (~0.6 of 1.3 CPU-s on AMD EPYC), in every replica and oracle.
    The tokenizer loaded is the same either way (tests/test_tokenizer.py)."""
    for name, component in components.items():
        tokenizer = getattr(component, "tokenizer", component)  # a processor holds its tokenizer
        config = directory / name / "tokenizer_config.json"
        added = getattr(tokenizer, "added_tokens_decoder", None)
        if not added or not config.is_file():
            continue
        fields = json.loads(config.read_text(encoding="utf-8"))
        fields["added_tokens_decoder"] = {str(i): token.__getstate__() for i, token in sorted(added.items())}
        config.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def ensure_tiny(cache_dir: str | os.PathLike, seed: int = 0, name: str = "tiny",
                builder: str = "pipelines.tiny:build_tiny_pipeline") -> Path:
    """Return the cached tiny build under `cache_dir`, building it once per node.

    Several actors on one node may race here; each builds into a private temp dir and renames it
    into place, so a reader never sees a half-written model and the loser just discards its copy.
    """
    target = Path(cache_dir) / (f"{name}-v{TINY_VERSION}" + (f"-seed{seed}" if seed else ""))
    return publish_once(target, ".tiny-build-", lambda tmp: save_tiny(tmp, seed, builder))


def publish_once(target: Path, prefix: str, fill, marker: str = "model_index.json") -> Path:
    """A model directory at `target`, made once per node: `fill(tmp)` writes it into a private temp dir that is then
    renamed into place, so a reader never sees a half-written model and a racing loser just discards its copy.
    `marker` is a file every finished directory holds (diffusers' model_index.json, transformers' config.json)."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
