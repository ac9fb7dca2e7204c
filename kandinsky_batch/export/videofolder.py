"""`--format videofolder`: the layout `datasets.load_dataset("videofolder", data_dir=DEST)` reads.

    {split}/{key}.{ext}            each sample's video, its bytes as rendered (`val/` is read as `validation`)
    {split}/metadata.parquet       `file_name`, then the sample's fields, with one Arrow schema for every split

Parquet with an explicit schema, not JSONL: a split whose scores are all null would otherwise get other types
than the rest. Posters and latents are not part of this layout (the webdataset format carries them).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from kandinsky_batch.errors import InputError
from kandinsky_batch.export.objects import publish_once, read_video, replace
from kandinsky_batch.output.manifest import parquet_bytes
from kandinsky_batch.export.sample import IndexRow, Sample, Unit
from kandinsky_batch.export.samples import in_batches
from kandinsky_batch.output.storage import Storage

NAME = "videofolder"
SHARDED = False
VIDEO_EXTENSIONS = ("mp4", "webm", "mov", "mkv", "avi")
"""Video files `datasets`' VideoFolder takes (its EXTENSIONS lists these among others)."""
RESERVED = ("file_name", "video")


def _video_ext(sample: Sample) -> str:
    return next(ext for ext in sample.media if ext in VIDEO_EXTENSIONS)


def check(samples: Sequence[Sample]) -> None:
    """Videos only, and no field named like the columns `datasets` adds."""
    if not len(samples):
        return
    first = samples[0]
    if not any(ext in VIDEO_EXTENSIONS for ext in first.media):
        raise InputError(f"format={NAME}: the samples hold {sorted(first.media)}, not a video of "
                         f"{list(VIDEO_EXTENSIONS)} (a still-image job goes to --format webdataset or csv)")
    clash = [name for name in RESERVED if name in first.meta]
    if clash:
        raise InputError(f"format={NAME}: carried input columns {clash} are names `datasets` gives its own "
                         "columns; rename them to export this format")


def write_unit(unit: Unit, source: Storage, dest: Storage) -> list[IndexRow]:
    """Each sample's video as `{split}/{key}.{ext}`, checked against the manifest's sha256 first."""
    rows = []
    for sample in unit.samples:
        ext = _video_ext(sample)
        data = read_video(source, sample, ext)
        path = f"{unit.split}/{sample.key}.{ext}"
        publish_once(dest, path, data)
        rows.append(IndexRow(sample.key, sample.id, unit.split, unit.name, path, 0, sample.sha256, len(data)))
    return rows


def _schema(samples: Sequence[Sample]) -> pa.Schema:
    """`file_name`, then each field with the Arrow type of all its values across every split: each batch's type
    of a field, merged as Arrow merges them (null takes the other, integers widen to floats, structs gain fields)."""
    names = list(samples[0].meta)
    merged = None
    for batch in in_batches(samples):
        types = pa.schema([(name, pa.array([sample.meta.get(name) for sample in batch]).type) for name in names])
        merged = types if merged is None else pa.unify_schemas([merged, types], promote_options="permissive")
    return pa.schema([("file_name", pa.string()), *merged])


def finish(dest: Storage, index: pa.Table, samples: Sequence[Sample]) -> None:
    """`{split}/metadata.parquet` of every split, in sample order, built a batch at a time."""
    if not len(samples):
        return
    schema = _schema(samples)
    by_split: dict[str, list[pa.Table]] = {}
    for batch in in_batches(samples):
        rows: dict[str, list[dict]] = {}
        for sample in batch:
            rows.setdefault(sample.split, []).append({"file_name": f"{sample.key}.{_video_ext(sample)}", **sample.meta})
        for split, split_rows in rows.items():
            by_split.setdefault(split, []).append(pa.Table.from_pylist(split_rows, schema=schema))
    for split, tables in sorted(by_split.items()):
        table = pa.concat_tables(tables).combine_chunks()  # one piece, as the Parquet of one table of rows was
        replace(dest, f"{split}/metadata.parquet", parquet_bytes(table))
