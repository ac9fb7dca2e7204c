"""An export's bookkeeping under `DEST/.export/`: its bound arguments, its plan (sample -> unit), its finished units.

    .export/arguments.json          the arguments DEST is bound to, created by the first run
    .export/plan/{seq:06d}.parquet  each run's newly planned samples (sample rows + unit), create-only, before any unit
    .export/units/{unit}.parquet    a finished unit's index rows, written by its task after the unit's objects

A run re-plans nothing: samples already in the plan keep their unit, so a killed export re-runs the same units with
the same members, and rows rendered since go into new units numbered after the last. The folder is hidden (a dot)
because `datasets` would take `units/train-000000.parquet` for data of the `train` split; it skips dot folders.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kandinsky_batch.errors import InputError
from kandinsky_batch.export.objects import publish_once
from kandinsky_batch.export.sample import IndexRow, Unit
from kandinsky_batch.export.samples import SCHEMA as SAMPLE_SCHEMA
from kandinsky_batch.export.samples import to_sample
from kandinsky_batch.output.manifest import parquet_bytes
from kandinsky_batch.output.storage import Storage

STATE_DIR = ".export"
ARGUMENTS_KEY = f"{STATE_DIR}/arguments.json"
PLAN_DIR = f"{STATE_DIR}/plan"
UNITS_DIR = f"{STATE_DIR}/units"
INDEX_KEY = "index.parquet"
PLAN_SCHEMA = pa.schema([*SAMPLE_SCHEMA, ("unit", pa.string())])
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("id", pa.string()), ("split", pa.string()), ("unit", pa.string()),
                          ("path", pa.string()), ("offset", pa.int64()), ("sha256", pa.string()),
                          ("bytes", pa.int64())])
FILES_PER_UNIT = 256
"""Samples per unit of a format written file by file (a task's worth), unless --shard-size says otherwise."""


def _read(dest: Storage, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(dest.get_bytes(key)))


def bind(dest: Storage, arguments: dict) -> bool:
    """Check DEST is bound to `arguments` (InputError naming each difference); False if it is bound to nothing yet."""
    try:
        bound = json.loads(dest.get_bytes(ARGUMENTS_KEY))
    except FileNotFoundError:
        return False
    differ = [f"{name}: {bound.get(name)!r} there, {arguments.get(name)!r} now"
              for name in sorted(set(bound) | set(arguments)) if bound.get(name) != arguments.get(name)]
    if differ:
        raise InputError(f"--to={dest.uri!r} holds an export made with other arguments ({'; '.join(differ)}); "
                         "re-run with the same ones, or export to another --to")
    return True


def record_arguments(dest: Storage, arguments: dict) -> None:
    """Bind DEST to `arguments`, once (a concurrent first run with others is refused by `publish_once`)."""
    publish_once(dest, ARGUMENTS_KEY, (json.dumps(arguments, indent=2, sort_keys=True) + "\n").encode())


def read_plan(dest: Storage) -> pa.Table:
    """Every planned sample, in plan order (the parts in name order)."""
    parts = [_read(dest, key) for key in dest.list(PLAN_DIR) if key.endswith(".parquet")]
    return pa.concat_tables(parts).cast(PLAN_SCHEMA) if parts else PLAN_SCHEMA.empty_table()


def _next_indices(plan: pa.Table) -> dict[str, int]:
    """Per split, the index after the last unit planned."""
    out: dict[str, int] = {}
    for unit in pc.unique(plan["unit"]).to_pylist():
        split, _, index = unit.rpartition("-")
        out[split] = max(out.get(split, 0), int(index) + 1)
    return out


def plan_new(plan: pa.Table, candidates: pa.Table, sharded: bool, shard_size: int | None,
             shard_bytes: int | None) -> pa.Table:
    """The candidates the plan lacks, grouped into new units per split: whole samples, in order, a unit closed at
    `shard_size` samples or before `shard_bytes` would be passed (sharded); `shard_size` or FILES_PER_UNIT each."""
    if plan.num_rows:
        new = candidates.filter(pc.invert(pc.is_in(candidates["key"], value_set=plan["key"].combine_chunks())))
    else:
        new = candidates  # nothing planned yet: every candidate is new, and filtering would copy them all
    if not sharded:
        shard_size, shard_bytes = shard_size or FILES_PER_UNIT, None
    start = _next_indices(plan)
    index = np.zeros(new.num_rows, np.int64)
    splits = pc.dictionary_encode(new["split"].combine_chunks())
    codes, sizes = splits.indices.to_numpy(zero_copy_only=False), pc.fill_null(new["bytes"], 0).to_numpy()
    for code, split in enumerate(splits.dictionary.to_pylist()):
        rows = np.flatnonzero(codes == code)
        index[rows] = start.get(split, 0) + _unit_offsets(sizes[rows], shard_size, shard_bytes)
    digits = pc.utf8_lpad(pa.array(index).cast(pa.string()), width=6, padding="0")
    units = pc.binary_join_element_wise(new["split"].combine_chunks(), digits, "-")
    return new.append_column("unit", units).cast(PLAN_SCHEMA)


def _unit_offsets(sizes: np.ndarray, shard_size: int | None, shard_bytes: int | None) -> np.ndarray:
    """Each sample's unit within its split, counted from 0: a unit closed at `shard_size` samples or before
    `shard_bytes` would be passed (whole samples, in order)."""
    if shard_bytes is None:
        return np.arange(len(sizes)) // shard_size if shard_size else np.zeros(len(sizes), np.int64)
    out = np.empty(len(sizes), np.int64)
    index = count = size = 0
    for i, nbytes in enumerate(sizes.tolist()):
        if (shard_size is not None and count >= shard_size) or (count and size + nbytes > shard_bytes):
            index, count, size = index + 1, 0, 0
        out[i] = index
        count, size = count + 1, size + nbytes
    return out


def record_plan(dest: Storage, new: pa.Table) -> None:
    """Publish newly planned samples as the next plan part, before any of their units is written."""
    if not new.num_rows:
        return
    seq = len([k for k in dest.list(PLAN_DIR) if k.endswith(".parquet")])
    key = f"{PLAN_DIR}/{seq:06d}.parquet"
    if not dest.put_bytes_if_absent(key, parquet_bytes(new)):
        raise RuntimeError(f"{dest.url(key)} appeared meanwhile: another export is planning into this --to")


def done_units(dest: Storage) -> set[str]:
    """The units whose index part exists: written whole."""
    prefix = f"{UNITS_DIR}/"
    return {k[len(prefix):-len(".parquet")] for k in dest.list(UNITS_DIR) if k.endswith(".parquet")}


def units(plan: pa.Table, names: set[str]) -> Iterator[Unit]:
    """The units named, in name order, each with its members in plan order (built one at a time from the plan)."""
    wanted = pc.is_in(plan["unit"], value_set=pa.array(sorted(names), pa.string()))
    members = pc.indices_nonzero(wanted.combine_chunks())
    unit_of = plan["unit"].take(members)
    order = pc.sort_indices(unit_of)  # stable: plan order within a unit
    members, unit_of = members.take(order), unit_of.take(order)
    start = 0
    for group in pc.value_counts(unit_of).to_pylist():  # in order of first appearance: name order
        rows = plan.take(members.slice(start, group["counts"])).to_pylist()
        yield Unit(group["values"], rows[0]["split"], tuple(to_sample(r) for r in rows))
        start += group["counts"]


def record_unit(dest: Storage, unit: Unit, rows: list[IndexRow]) -> None:
    """Mark a unit done: its index rows, after its objects (a task's last write)."""
    table = pa.Table.from_pylist([vars(r) for r in rows], schema=INDEX_SCHEMA)
    publish_once(dest, f"{UNITS_DIR}/{unit.name}.parquet", parquet_bytes(table))


def read_index(dest: Storage, names: list[str]) -> pa.Table:
    """Every finished unit's index rows, in unit order."""
    parts = [_read(dest, f"{UNITS_DIR}/{name}.parquet") for name in sorted(names)]
    return pa.concat_tables(parts).cast(INDEX_SCHEMA) if parts else INDEX_SCHEMA.empty_table()
