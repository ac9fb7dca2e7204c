"""Where an output prefix keeps what: the one spelling of the output layout.

    {output.uri}/videos/{stem}.{format}    a row's render (`images/` for a still-image model)
    {output.uri}/posters/{stem}.jpg        its poster (the middle frame)
    {output.uri}/latents/{stem}.safetensors  its final latents and prompt embeddings (`output.latents: true`)
    {output.uri}/manifest/part-*.parquet   the manifest's parts
    {output.uri}/_SUCCESS                  the job's summary, written last
    {output.uri}/_LEASE/{N}.lease, .beat   the lease and heartbeat of the job writing there (`output/lease.py`)
    {output.uri}/scores/part-*.parquet     the scores table's parts (`kandinsky-batch score`, fused scoring)
    {output.uri}/scores/_SUCCESS           every scoring run's counts and metric provenance, rewritten last

A row's stem is its id when the id is safe in a key, else a cleaned and hashed form: keys are deterministic.
"""

from __future__ import annotations

import hashlib
import re

VIDEOS_DIR, IMAGES_DIR, POSTERS_DIR, LATENTS_DIR = "videos", "images", "posters", "latents"
OBJECT_DIRS = (VIDEOS_DIR, IMAGES_DIR, POSTERS_DIR, LATENTS_DIR)
"""The folders of rows' objects: nothing else may lie under them (`verify`)."""
MANIFEST_DIR = "manifest"
SCORES_DIR = "scores"
"""A job output's scores table; a table given elsewhere (`score --out`) holds its parts and `_SUCCESS` at its root."""
SUCCESS_KEY = "_SUCCESS"
LEASE_DIR = "_LEASE"
"""One job per output prefix: its lease generations, their heartbeats and releases."""
SAFE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
"""An id matching this (and holding no `..`) is its own stem."""
_SAFE_ID = re.compile(SAFE_ID)
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_FORMAT = re.compile(r"[a-z0-9]{1,16}")


def stem(row_id: str) -> str:
    """The file name (without extension) of a row's objects: the id itself if safe, else a cleaned, hashed form."""
    if _SAFE_ID.fullmatch(row_id) and ".." not in row_id:
        return row_id
    # The hash keeps distinct ids apart after unsafe characters are folded to '_'.
    cleaned = _UNSAFE_CHARS.sub("_", row_id).lstrip(".")[:80]
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned}-{digest}"


def object_key(row_id: str, fmt: str, folder: str = VIDEOS_DIR) -> str:
    """Deterministic key `{folder}/{safe}.{fmt}` for a row id (`videos/`, or `images/` for a still-image model)."""
    if not _FORMAT.fullmatch(fmt):
        raise ValueError(f"format must match [a-z0-9]{{1,16}}, got {fmt!r}")
    if folder not in (VIDEOS_DIR, IMAGES_DIR):
        raise ValueError(f"object folder must be {VIDEOS_DIR!r} or {IMAGES_DIR!r}, got {folder!r}")
    return f"{folder}/{stem(row_id)}.{fmt}"


def poster_key(row_id: str) -> str:
    """Deterministic key `posters/{safe}.jpg` of a row's poster: the same stem as its video's key."""
    return f"{POSTERS_DIR}/{stem(row_id)}.jpg"


def latents_key(row_id: str) -> str:
    """Deterministic key `latents/{safe}.safetensors` of a row's latents (`pipelines.latents`): its video's stem."""
    return f"{LATENTS_DIR}/{stem(row_id)}.safetensors"


def key_from_uri(uri: str | None) -> str | None:
    """The key of an object recorded by its absolute URI (outputs written before the `key` column): its folder
    and file name, so an output that was moved since still resolves. None if the URI is not in the layout."""
    if not uri:
        return None
    parts = uri.rstrip("/").rsplit("/", 2)
    if len(parts) < 3 or parts[-2] not in OBJECT_DIRS or not parts[-1]:
        return None
    return f"{parts[-2]}/{parts[-1]}"
