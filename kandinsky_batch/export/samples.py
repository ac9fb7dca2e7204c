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
SCHEMA = pa.schema([("key", pa.string()), ("id", pa.string()), ("split", pa.string()), ("caption", pa.string()),
                    ("meta", pa.string()), ("media", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                    ("scores", pa.string())])
"""A sample as a row (what the plan stores, with its unit)."""


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
    suffixes = sorted({key.rsplit(".", 1)[-1] if key else None for key in table["key"].to_pylist()}, key=str)
    if len(suffixes) != 1 or suffixes[0] is None:
        raise InputError(f"format: the selected rows hold objects of formats {suffixes}; export one format at a "
                         "time (--where \"format = 'mp4'\")")
    media = {suffixes[0]: "key"}
    if table["poster_key"].null_count == 0:
        media[POSTER] = "poster_key"
    if "latents_key" in table.column_names and table["latents_key"].null_count == 0:
        media[LATENTS] = "latents_key"
    return media


def sample_rows(selection: Selection, caption: str, fractions: dict[str, float]) -> pa.Table:
    """Every selected row as a sample row (`SCHEMA`), in the selection's order."""
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
    columns = {name: table[name].to_pylist() for name in fields if name != "sweep"}
    columns["sweep"] = _sweep_cells(table["sweep"].to_pylist())
    located = {ext: table[column].to_pylist() for ext, column in media_columns.items()}
    ids, scores = columns["id"], json.dumps(selection.scores)
    keys = [sample_key(i) for i in ids]
    if len(set(keys)) != len(keys):
        seen: dict[str, str] = {}
        clash = next((seen[k], i) for k, i in zip(keys, ids) if seen.setdefault(k, i) != i)
        raise InputError(f"ids {list(clash)}: the same sample key; ids of an export are unique")
    metas = [json.dumps({name: _jsonable(columns[name][i]) for name in fields}, separators=(",", ":"),
                        ensure_ascii=False) for i in range(table.num_rows)]
    media = [json.dumps({ext: located[ext][i] for ext in media_columns}) for i in range(table.num_rows)]
    return pa.table({"key": keys, "id": ids, "split": [split_of(i, fractions) for i in ids],
                     "caption": table[caption], "meta": metas, "media": media, "sha256": table["sha256"],
                     "bytes": pc.fill_null(table["bytes"], 0), "scores": [scores] * table.num_rows},
                    schema=SCHEMA)


def to_sample(row: dict) -> Sample:
    """A sample row (a plan row) as the `Sample` a writer gets."""
    return Sample(key=row["key"], id=row["id"], split=row["split"], caption=row["caption"],
                  meta=json.loads(row["meta"]), media=json.loads(row["media"]), sha256=row["sha256"],
                  bytes=row["bytes"], scores=tuple(json.loads(row["scores"] or "[]")))


class Samples(Sequence):
    """Sample rows read as `Sample`s, each built when asked for."""

    def __init__(self, table: pa.Table):
        self.table = table

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
