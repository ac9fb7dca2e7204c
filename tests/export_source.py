"""A fake job output for the export format tests: real tiny mp4s and posters under a Storage, and their Samples."""

from __future__ import annotations

import hashlib

import numpy as np

from kandinsky_batch.export.sample import Sample, sample_key
from kandinsky_batch.output.layout import object_key, poster_key
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.video import encode_image, encode_mp4

FRAMES, SIZE, FPS = 9, 32, 8


def clip(seed: int) -> bytes:
    """A real H.264 mp4 of random frames: distinct bytes per seed."""
    frames = np.random.default_rng(seed).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    return encode_mp4(frames, FPS)


def poster(seed: int) -> bytes:
    """A JPEG poster of random pixels."""
    frame = np.random.default_rng(10_000 + seed).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    return encode_image(frame, "jpeg")


def put_sample(source: Storage, row_id: str, seed: int, meta: dict, caption: str | None = None,
               split: str = "train", extra: dict[str, bytes] | None = None) -> Sample:
    """Write one row's video, poster and extra media under `source` as a render job lays them out; its Sample."""
    video, image = clip(seed), poster(seed)
    media = {"mp4": object_key(row_id, "mp4"), "jpg": poster_key(row_id)}
    source.put_bytes(media["mp4"], video)
    source.put_bytes(media["jpg"], image)
    for ext, data in (extra or {}).items():
        media[ext] = f"latents/{sample_key(row_id)}.{ext}"
        source.put_bytes(media[ext], data)
    sha = hashlib.sha256(video).hexdigest()
    caption = meta.get("prompt", row_id) if caption is None else caption
    return Sample(key=sample_key(row_id), id=row_id, split=split, caption=caption,
                  meta={**meta, "id": row_id, "video_sha256": sha}, media=media, sha256=sha, bytes=len(video))
