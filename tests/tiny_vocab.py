"""Qwen's vocabulary and merges shared between fresh processes that each build tiny presets (the console test's):
deriving them from the BPE ranks is most of a tiny build's CPU, and the result is pure data. Within one process
`pipelines.tiny._vocab_and_merges` is already cached; this carries it to the next process through a pickle."""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def vocab_once(saved: str | Path) -> Iterator[None]:
    """Builds inside read the vocabulary from `saved` when another process wrote it there, else derive it and write it."""
    import pipelines.tiny as tiny

    derive, saved = tiny._vocab_and_merges, Path(saved)

    def shared(ranks_path: str) -> tuple[dict, list]:
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        result = derive(ranks_path)
        saved.write_bytes(pickle.dumps(result))
        return result

    tiny._vocab_and_merges = shared  # callers copy what they get (pipelines.tiny.build_qwen_tokenizer)
    try:
        yield
    finally:
        tiny._vocab_and_merges = derive
