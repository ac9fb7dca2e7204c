"""Qwen's vocabulary and merges computed once for several tiny builds (the test process's presets, the console's
fresh processes): deriving them from the BPE ranks is most of a tiny build's CPU, and the result is pure data."""

from __future__ import annotations

import functools
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def vocab_once(saved: str | Path | None = None) -> Iterator[None]:
    """Builds inside reuse one `pipelines.tiny._vocab_and_merges` result, each getting its own copy; with `saved`,
    that result is read from that pickle when it exists (written by another process's first build) or written there."""
    import pipelines.tiny as tiny

    derive, saved = tiny._vocab_and_merges, Path(saved) if saved else None

    @functools.cache
    def once(ranks_path: str) -> tuple[dict, list]:
        if saved is not None and saved.exists():
            return pickle.loads(saved.read_bytes())
        result = derive(ranks_path)
        if saved is not None:
            saved.write_bytes(pickle.dumps(result))
        return result

    def copied(ranks_path: str) -> tuple[dict, list]:
        vocab, merges = once(ranks_path)
        return dict(vocab), list(merges)  # the tokenizer a build makes may keep or change what it is given

    tiny._vocab_and_merges = copied
    try:
        yield
    finally:
        tiny._vocab_and_merges = derive
