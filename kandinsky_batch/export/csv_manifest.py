"""`--format csv`: one Open-Sora-style manifest of the videos where they are in SOURCE (nothing copied).

    manifest.csv, manifest.parquet   path, text, num_frames, fps, width, height, aspect_ratio (height / width),
                                     resolution (height x width), the score columns by name, id, split

`path` is the video's absolute URI in SOURCE: moving SOURCE breaks it, re-export then (DEST is bound to the
arguments, not to where SOURCE is).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.csv as pcsv

from kandinsky_batch.errors import InputError
from kandinsky_batch.export.objects import replace
from kandinsky_batch.export.plan import parquet_bytes
from kandinsky_batch.export.sample import IndexRow, Sample, Unit
from kandinsky_batch.output.storage import Storage

NAME = "csv"
SHARDED = False
FIXED = ("path", "text", "num_frames", "fps", "width", "height", "aspect_ratio", "resolution")


def _video(sample: Sample) -> str:
    return next(ext for ext in sample.media if ext not in ("jpg", "latents.safetensors"))


def check(samples: Sequence[Sample]) -> None:
    """Score columns must not take the manifest's own column names."""
    if not len(samples):
        return
    clash = [name for name in samples[0].scores if name in (*FIXED, "id", "split")]
    if clash:
        raise InputError(f"format={NAME}: score columns {clash} have the names of the manifest's own columns")


def write_unit(unit: Unit, source: Storage, dest: Storage) -> list[IndexRow]:
    """Nothing copied: each video found where SOURCE holds it, at its recorded size."""
    rows = []
    for sample in unit.samples:
        key = sample.media[_video(sample)]
        size = source.size(key)
        if size != sample.bytes:
            raise RuntimeError(f"{source.url(key)}: {'missing' if size is None else f'{size} bytes'}, the manifest "
                               f"records {sample.bytes} for id {sample.id!r}")
        rows.append(IndexRow(sample.key, sample.id, unit.split, unit.name, source.url(key), 0, sample.sha256,
                             sample.bytes))
    return rows


def finish(dest: Storage, index: pa.Table, samples: Sequence[Sample]) -> None:
    """The manifest in sample order, as CSV and as Parquet."""
    if not len(samples):
        return
    paths = dict(zip(index["key"].to_pylist(), index["path"].to_pylist()))
    scores = list(samples[0].scores)
    rows = []
    for sample in samples:
        meta = sample.meta
        height, width = meta.get("height"), meta.get("width")
        rows.append({"path": paths[sample.key], "text": sample.caption, "num_frames": meta.get("num_frames"),
                     "fps": meta.get("fps"), "width": width, "height": height,
                     "aspect_ratio": height / width if height and width else None,
                     "resolution": height * width if height and width else None,
                     **{name: meta.get(name) for name in scores}, "id": sample.id, "split": sample.split})
    schema = pa.schema([("path", pa.string()), ("text", pa.string()), ("num_frames", pa.int64()),
                        ("fps", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
                        ("aspect_ratio", pa.float64()), ("resolution", pa.int64()),
                        *((name, pa.float64()) for name in scores), ("id", pa.string()), ("split", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pcsv.write_csv(table, buf)
    replace(dest, "manifest.csv", buf.getvalue())
    replace(dest, "manifest.parquet", parquet_bytes(table))
