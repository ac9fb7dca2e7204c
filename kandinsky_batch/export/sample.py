"""One exported sample and one unit of export work: the shapes every format reads and writes.

The driver turns each selected manifest row (joined with its scores) into a `Sample`, groups samples into `Unit`s
(a WebDataset shard, a batch of a folder's files) and runs one task per unit; a format's writer turns a unit into
objects under the destination, whole and create-only, and returns one `IndexRow` per sample it wrote.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(row_id: str) -> str:
    """A sample's key: dot-free (WebDataset and HF split a file name at its first dot), unique and deterministic.

    An id of only `[A-Za-z0-9_-]` is its own key; any other is folded to those characters and suffixed with a hash of
    the id, so distinct ids keep distinct keys. The id itself travels in the sample's metadata."""
    if row_id and not _KEY_UNSAFE.search(row_id) and len(row_id) <= 128:
        return row_id
    cleaned = _KEY_UNSAFE.sub("_", row_id)[:80]
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned}-{digest}"


def split_of(row_id: str, fractions: dict[str, float], default: str = "train") -> str:
    """The split of a sample by a hash of its id: stable across re-runs and as rows are added.

    `fractions` maps split names to shares of [0, 1) taken in name order (`{"val": 0.02}`); the rest is `default`."""
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    start = 0.0
    for name in sorted(fractions):
        start += fractions[name]
        if point < start:
            return name
    return default


@dataclass(frozen=True)
class Sample:
    """One committed row as a format writes it."""

    key: str
    """`sample_key(id)`: the sample's file stem in every format."""
    id: str
    split: str
    caption: str
    meta: dict
    """JSON values: id, prompt, expanded prompt, seed, model, every render parameter, the sweep cell, the carried input
    columns, scores (null when unscored), the source sha256. Every sample of one export has the same keys, each
    always of one JSON type (floats stay floats)."""
    media: dict[str, str]
    """File extension -> the object's key relative to the source output: {"mp4": "videos/a.mp4", "jpg": "posters/a.jpg"}.
    Every sample of one export has the same extensions."""
    sha256: str
    """The video's sha256 as the manifest recorded it: the exported bytes hash to it."""
    bytes: int
    """The video's size (planning shards by bytes)."""
    scores: tuple[str, ...] = ()
    """The keys of `meta` that are score columns (the csv format lists them by name)."""


@dataclass(frozen=True)
class Unit:
    """One task's worth of export work: samples of one split written as one whole (a shard) or file by file."""

    name: str
    """Deterministic and unique in the export, e.g. `train-000123`: a WebDataset shard is `{name}.tar`."""
    split: str
    samples: tuple[Sample, ...] = field(default=())


@dataclass(frozen=True)
class IndexRow:
    """Where one exported sample is: what a loader or a later export needs to find it."""

    key: str
    id: str
    split: str
    unit: str
    path: str
    """The object holding the sample, relative to the destination (`train-000123.tar`, `train/a.mp4`)."""
    offset: int
    """Byte offset of the sample's first member inside `path` (0 for a file of its own)."""
    sha256: str
    bytes: int
