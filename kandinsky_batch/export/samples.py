"""Selected rows as samples: their metadata with one JSON type per key, their media, caption and split.

Samples live as rows of an Arrow table (meta and media as JSON text) until a writer needs them, so a driver
planning a million rows holds one table, not a million dicts; `Samples` reads it as a sequence of `Sample`.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.errors import InputError
from kandinsky_batch.export.sample import Sample, sample_key, split_of
from kandinsky_batch.export.select import Selection

CAPTIONS = ("prompt", "expanded_prompt")
IDENTITY = ("id", "prompt", "expanded_prompt", "negative_prompt", "seed", "model")
RENDER = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps", "format",
          "audio_sample_rate", "audio_seconds", "model_revision", "weights", "options", "sweep_model",
          "sweep_seed_index", "image_uri", "image_sha256", "source_uri", "source_sha256")
"""The manifest's render parameters and conditioning inputs, as rendered (effective values)."""
POSTER, LATENTS = "jpg", "latents.safetensors"
MANIFEST_COLUMNS = [*IDENTITY, *RENDER, "sweep", "sha256", "bytes", "key", "poster_key", "latents_key"]
"""The manifest columns a sample is made of (`select`'s `columns`), beside the carried ones and the scores."""
SCHEMA = pa.schema([("key", pa.string()), ("id", pa.string()), ("split", pa.string()), ("caption", pa.string()),
                    ("meta", pa.string()), ("media", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                    ("scores", pa.string())])
"""A sample as a row (what the plan stores, with its unit)."""
BATCH_ROWS = 2048
"""Rows turned into Python values at a time: the driver's transient objects are a batch's, not the selection's."""


def _jsonable(value):
    """A Parquet value as JSON: timestamps and dates as ISO text, binary as base64, decimals as floats."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _sweep_cells(column: list[str | None]) -> list[dict | None]:
    """Parsed sweep cells with the same keys each, an axis of ints and floats as floats: a reader inferring types
    from the first samples must not truncate a later 5.5 to the 5 it saw first, nor drop an axis it did not see."""
    cells = [json.loads(s) if s else None for s in column]
    kinds: dict[str, set] = {}
    for cell in cells:
        for axis, value in (cell or {}).items():
            if value is not None:
                kinds.setdefault(axis, set()).add(type(value))
    as_float = {axis for axis, found in kinds.items() if found == {int, float}}
    mixed = {axis: sorted(k.__name__ for k in found) for axis, found in kinds.items()
             if len(found) > 1 and axis not in as_float}
    if mixed:
        axis, names = next(iter(sorted(mixed.items())))
        raise InputError(f"sweep axis {axis!r}: values of types {names} across rows; an exported field has one type")
    axes = sorted({axis for cell in cells for axis in cell or {}})
    return [None if cell is None else {a: float(cell[a]) if a in as_float and cell.get(a) is not None
                                       else cell.get(a) for a in axes} for cell in cells]


def _media(table: pa.Table) -> dict[str, str]:
    """Extension -> the column naming each row's object: the video, the poster when every row has one, the
    latents when the manifest records them for every row."""
    extensions = pc.unique(pc.replace_substring_regex(table["key"], r"(?s)^.*\.", "")).to_pylist()
    suffixes = sorted(set(extensions), key=str)
    if len(suffixes) != 1 or suffixes[0] is None:
        raise InputError(f"format: the selected rows hold objects of formats {suffixes}; export one format at a "
                         "time (--where \"format = 'mp4'\")")
    media = {suffixes[0]: "key"}
    if table["poster_key"].null_count == 0:
        media[POSTER] = "poster_key"
    if "latents_key" in table.column_names and table["latents_key"].null_count == 0:
        media[LATENTS] = "latents_key"
    return media


def _sweep_lookup(column: pa.ChunkedArray) -> dict[str | None, dict | None]:
    """Each distinct sweep text's cell as `_sweep_cells` makes it over all rows: its rules hold over the distinct
    cells alone, and a sweep has few."""
    texts = pc.unique(column).to_pylist()
    return dict(zip(texts, _sweep_cells(texts)))


def _unique_keys(keys: pa.Array, ids: pa.Array) -> None:
    if pc.count_distinct(keys).as_py() == len(keys):
        return
    seen: dict[str, str] = {}
    clash = next((seen[k], i) for k, i in zip(keys.to_pylist(), ids.to_pylist()) if seen.setdefault(k, i) != i)
    raise InputError(f"ids {list(clash)}: the same sample key; ids of an export are unique")


def sample_rows(selection: Selection, caption: str, fractions: dict[str, float]) -> pa.Table:
    """Every selected row as a sample row (`SCHEMA`), in the selection's order, made `BATCH_ROWS` at a time."""
    table = selection.table
    if caption not in CAPTIONS:
        raise InputError(f"--caption={caption!r}: one of {list(CAPTIONS)}")
    blank = pc.or_kleene(pc.is_null(table[caption]), pc.equal(pc.utf8_trim_whitespace(table[caption]), ""))
    missing = table.filter(pc.fill_null(blank, True))["id"].to_pylist()
    if missing:
        raise InputError(f"--caption={caption}: {len(missing)} selected rows have no {caption} (ids "
                         f"{missing[:5]}); pick the other caption or leave them out with --where")
    if table.num_rows == 0:
        return SCHEMA.empty_table()
    media_columns = _media(table)
    fields = [*IDENTITY, *RENDER, "sweep", *selection.carried, *selection.scores, "sha256"]
    sweeps = _sweep_lookup(table["sweep"])
    ids = table["id"].combine_chunks()
    keys = pa.concat_arrays([pa.array([sample_key(i) for i in ids.slice(start, BATCH_ROWS).to_pylist()], pa.string())
                             for start in range(0, len(ids), BATCH_ROWS)])
    _unique_keys(keys, ids)
    batches = [_made(table.slice(start, BATCH_ROWS), fields, media_columns, sweeps, fractions)
               for start in range(0, table.num_rows, BATCH_ROWS)]
    made = {}
    for name in ("split", "meta", "media"):  # one chunk each, as the table built in one piece had
        made[name] = pa.concat_arrays([batch.pop(name) for batch in batches])
    return pa.table({"key": keys, "id": ids, "split": made["split"], "caption": table[caption].combine_chunks(),
                     "meta": made["meta"], "media": made["media"], "sha256": table["sha256"].combine_chunks(),
                     "bytes": pc.fill_null(table["bytes"].combine_chunks(), 0),
                     "scores": pa.repeat(pa.scalar(json.dumps(selection.scores)), len(ids))}, schema=SCHEMA)


def _made(batch: pa.Table, fields: list[str], media_columns: dict[str, str], sweeps: dict,
          fractions: dict[str, float]) -> dict[str, pa.Array]:
    """A batch's splits, metadata and media as JSON text: its Python values die with the batch."""
    columns = {name: batch[name].to_pylist() for name in fields if name != "sweep"}
    columns["sweep"] = [sweeps[text] for text in batch["sweep"].to_pylist()]
    located = {ext: batch[column].to_pylist() for ext, column in media_columns.items()}
    rows = range(batch.num_rows)
    metas = [json.dumps({name: _jsonable(columns[name][i]) for name in fields}, separators=(",", ":"),
                        ensure_ascii=False) for i in rows]
    media = [json.dumps({ext: located[ext][i] for ext in media_columns}) for i in rows]
    return {"split": pa.array([split_of(i, fractions) for i in columns["id"]], pa.string()),
            "meta": pa.array(metas, pa.string()), "media": pa.array(media, pa.string())}


def to_sample(row: dict) -> Sample:
    """A sample row (a plan row) as the `Sample` a writer gets."""
    return Sample(key=row["key"], id=row["id"], split=row["split"], caption=row["caption"],
                  meta=json.loads(row["meta"]), media=json.loads(row["media"]), sha256=row["sha256"],
                  bytes=row["bytes"], scores=tuple(json.loads(row["scores"] or "[]")))


def in_batches(samples: Sequence[Sample]) -> Iterator[list[Sample]]:
    """`samples` `BATCH_ROWS` at a time: a format's pass over a million holds one batch of `Sample`s, not all."""
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


class Samples(Sequence):
    """Sample rows read as `Sample`s, each built when asked for."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.memo: dict = {}
        """What a format's `check` derived from these samples, for its `finish` when it gets the same ones."""

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return Samples(self.table.slice(start, max(0, stop - start)))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return to_sample(self.table.slice(index, 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Sample]:
        for batch in self.table.to_batches(max_chunksize=1024):
            for row in batch.to_pylist():
                yield to_sample(row)
