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
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from kandinsky_batch.errors import InputError
from kandinsky_batch.export.objects import replace
from kandinsky_batch.output.manifest import parquet_bytes
from kandinsky_batch.export.sample import IndexRow, Sample, Unit
from kandinsky_batch.export.samples import Samples, in_batches
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


def _schema(scores: list[str]) -> pa.Schema:
    return pa.schema([("path", pa.string()), ("text", pa.string()), ("num_frames", pa.int64()), ("fps", pa.int64()),
                      ("width", pa.int64()), ("height", pa.int64()), ("aspect_ratio", pa.float64()),
                      ("resolution", pa.int64()), *((name, pa.float64()) for name in scores), ("id", pa.string()),
                      ("split", pa.string())])


def _row(sample: Sample, path: str, scores: list[str]) -> dict:
    meta = sample.meta
    height, width = meta.get("height"), meta.get("width")
    return {"path": path, "text": sample.caption, "num_frames": meta.get("num_frames"), "fps": meta.get("fps"),
            "width": width, "height": height, "aspect_ratio": height / width if height and width else None,
            "resolution": height * width if height and width else None,
            **{name: meta.get(name) for name in scores}, "id": sample.id, "split": sample.split}


def finish(dest: Storage, index: pa.Table, samples: Sequence[Sample]) -> None:
    """The manifest in sample order, as CSV and as Parquet, built a batch at a time."""
    if not len(samples):
        return
    keys = samples.table["key"] if isinstance(samples, Samples) else pa.array([s.key for s in samples], pa.string())
    found = pc.index_in(keys, value_set=index["key"].combine_chunks())  # one lookup of every sample's path
    if found.null_count:
        raise KeyError(keys[pc.index(pc.is_null(found), True).as_py()].as_py())
    paths = index["path"].take(found)
    scores, schema, tables, start = list(samples[0].scores), _schema(list(samples[0].scores)), [], 0
    for batch in in_batches(samples):
        rows = zip(batch, paths.slice(start, len(batch)).to_pylist())
        tables.append(pa.Table.from_pylist([_row(s, p, scores) for s, p in rows], schema=schema))
        start += len(batch)
    table = pa.concat_tables(tables).combine_chunks()  # one piece, as the table of every row was
    buf = io.BytesIO()
    pcsv.write_csv(table, buf)
    replace(dest, "manifest.csv", buf.getvalue())
    replace(dest, "manifest.parquet", parquet_bytes(table))
