"""Upscaling as a second stage: another job's output as the input of a super-resolution job.

A Kandinsky 6 SR job's `input.path` is a finished job's `output.uri` (one with `_SUCCESS`). Its manifest is the
dataset: one row per source row, streamed a window at a time like any Parquet input, with the source's outcome
and video in `source_*` columns. Rows the source did not render `ok` are recorded `invalid` naming the source's
status; the rest upscale their video, keep their id (so the upscaled object sits under the same key in the new
output) and record `source_uri` and `source_sha256`. A replica reads the video again, checks its sha256 and
decodes it (frames, and the sound of a Kandinsky 6 clip, which goes onto the upscaled frames as it was: an mp4's
AAC stream copied packet for packet, an npz's waveform bit for bit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.intake.dataset import Dataset, InputError
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.layout import MANIFEST_DIR, SUCCESS_KEY, key_from_uri
from kandinsky_batch.output.manifest import SCHEMA as MANIFEST
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.video import decode_av, decode_mp4, decode_npy, decode_npz, encode, encode_av_copy
from pipelines.kinds import Clip

# Source manifest column -> the SR dataset's column.
RENAMED = {"id": "id", "prompt": "prompt", "seed": "seed", "sha256": "source_sha256", "status": "source_status",
           "error": "source_error", "height": "source_height", "width": "source_width",
           "num_frames": "source_frames", "fps": "source_fps", "format": "source_format",
           "audio_sample_rate": "source_audio_rate", "model": "source_model"}
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("source_uri", pa.string()),
                    ("source_sha256", pa.string()), ("source_status", pa.string()), ("source_error", pa.string()),
                    ("source_height", pa.int64()), ("source_width", pa.int64()), ("source_frames", pa.int64()),
                    ("source_fps", pa.int64()), ("source_format", pa.string()), ("source_audio_rate", pa.int64()),
                    ("source_model", pa.string())])


def is_job_output(path: str, storage_options: dict | None = None) -> bool:
    """Whether `path` is a job's output prefix (it holds a `manifest/` folder) rather than a prompt dataset."""
    try:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return fs.isdir(f"{root.rstrip('/')}/{MANIFEST_DIR}")
    except Exception:  # noqa: BLE001 - not listable: Dataset reports why
        return False


class SourceManifest:
    """A finished job's manifest read as a dataset of clips to upscale (the `Dataset` interface, mapped columns)."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.path, self.storage_options = path, storage_options
        if read_success(Storage(path, storage_options)) is None:
            raise InputError(f"input.path={path!r}: the job writing there has not finished (no {SUCCESS_KEY}); "
                             "an sr job upscales a finished job's videos: run or resume that job first")
        self._storage = Storage(path, storage_options)
        self._manifest = Dataset(f"{path.rstrip('/')}/{MANIFEST_DIR}", storage_options)
        names = self._manifest.schema.names
        # Outputs record their objects by key (relative to the prefix); older ones by absolute URI.
        self._located = [c for c in ("key", "uri") if c in names]
        missing = [c for c in RENAMED if c not in names] + ([] if self._located else ["key"])
        if missing:
            raise InputError(f"input.path={path!r}: its manifest lacks columns {missing} (not a kandinsky-batch output)")
        # The columns the source job carried through from its own input go on through this stage too.
        self.carried = pa.schema([f for f in self._manifest.schema if f.name not in MANIFEST.names])
        self.schema, self.num_rows = pa.schema([*SCHEMA, *self.carried]), self._manifest.num_rows
        rates = self._manifest.column("audio_sample_rate")
        self.sound = rates.null_count < len(rates)
        """Whether the source's clips have sound (Kandinsky 6): the upscaled clips keep it."""

    def batches(self, columns: list[str] | None = None, batch_size: int = 8192) -> Iterator[pa.Table]:
        for raw in self._manifest.batches([*self._located, *RENAMED, *self.carried.names], batch_size=batch_size):
            ok = pc.fill_null(pc.equal(raw["status"], "ok"), False).to_pylist()
            keys = raw["key"].to_pylist() if "key" in raw.column_names else [None] * raw.num_rows
            uris = raw["uri"].to_pylist() if "uri" in raw.column_names else [None] * raw.num_rows
            keys = [k if k is not None else key_from_uri(u) for k, u in zip(keys, uris)]
            table = pa.table({
                **{new: raw[old] for old, new in RENAMED.items()},
                # Where the clip is now: the source prefix may have been moved since its job wrote it.
                "source_uri": pa.array([self._storage.url(k) if good and k else None for k, good in zip(keys, ok)],
                                       pa.string()),
            })
            table = pa.Table.from_arrays([table[f.name].cast(f.type) for f in SCHEMA]
                                         + [raw[name] for name in self.carried.names], schema=self.schema)
            yield table if columns is None else table.select(columns)

    def column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([t.column(0) for t in self.batches([name], batch_size=1 << 20)],
                                self.schema.field(name).type)

    def read(self) -> pa.Table:
        return pa.concat_tables(self.batches())


@dataclass(frozen=True)
class SourceClip(Clip):
    """A source clip with sound, and the mp4 it came from: its audio stream is copied into the upscaled mp4."""

    mp4: bytes | None = field(default=None, repr=False)


def encode_upscaled(rendered, source, fmt: str, fps: int) -> bytes:
    """The upscaled clip's bytes: an mp4 source's sound is copied packet for packet (no second AAC encode, so it
    decodes exactly as the source's); otherwise as any render (`kandinsky_batch.output.video.encode`)."""
    if fmt == "mp4" and getattr(source, "mp4", None) is not None:
        return encode_av_copy(getattr(rendered, "frames", rendered), fps, source.mp4)
    return encode(rendered, fmt, fps)


def read_source(uri: str, sha256: str, storage_options: dict | None = None):
    """The source clip at `uri` as the SR renderer takes it (uint8 frames, or a `Clip` with its sound), after
    checking it still holds what the source job committed."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"source {uri} changed since its job committed it (sha256 differs from its manifest's)")
    ext = uri.rsplit(".", 1)[-1]
    if ext == "npz":
        frames, audio, rate = decode_npz(data)
        return Clip(frames=frames, audio=audio, sample_rate=rate)
    if ext == "npy":
        return decode_npy(data)
    if ext != "mp4":
        raise ValueError(f"source {uri}: a .{ext} object is not a video (sr upscales mp4, npy or npz clips)")
    try:
        frames, audio, rate = decode_av(data)
    except ValueError:  # no audio stream: frames alone
        return decode_mp4(data)
    return SourceClip(frames=frames, audio=audio, sample_rate=rate, mp4=data)

