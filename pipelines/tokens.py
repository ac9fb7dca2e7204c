"""Counting a prompt's Qwen tokens as the pipelines do, through the tokenizer's Rust core: no torch, no diffusers.

Loading transformers or diffusers would import torch (~700 MB in the driver); the `tokenizers` core reads the same
`tokenizer.json` as transformers' fast tokenizer.
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path


def clean_prompt(text: str) -> str:
    """diffusers' Kandinsky 5 `prompt_clean` (ftfy if installed, HTML unescaped twice, whitespace folded), here
    so that the driver need not import diffusers, and with it torch, for four lines. tests/test_tokenizer.py
    checks that both agree."""
    ftfy = _ftfy()
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def _ftfy():
    """ftfy if installed (diffusers uses it only then), looked up once: a failed import is slow."""
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


@functools.lru_cache(maxsize=4)
def fast_tokenizer(folder: str):
    """The tokenizer's Rust core from its `tokenizer.json` (the file transformers' fast tokenizer loads)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def k5_count_tokens(tokenizer_dir: str, prompts: list[str]) -> list[int]:
    """Qwen tokens each prompt takes of a Kandinsky 5 T2V, I2V or T2I pipeline's `max_sequence_length` window.

    The template's head ends in a newline and its tail is the special `<|im_end|>`, and a cleaned prompt
    starts and ends with non-space: Qwen's pre-tokenizer splits at both seams, so the prompt's own tokens
    plus one are the count. tests/test_tokenizer.py checks it against `ModelSpec.prompt_tokens` on tricky
    prompts and at the limit.
    """
    encoded = fast_tokenizer(str(tokenizer_dir)).encode_batch([clean_prompt(p) for p in prompts],
                                                              add_special_tokens=False)
    return [len(e.ids) + 1 for e in encoded]
