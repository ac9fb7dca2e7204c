"""The end of a run: the manifest's parts rewritten as exactly one row per input row, other inputs' rows kept."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.output.layout import MANIFEST_DIR
from kandinsky_batch.output.manifest import (SCHEMA, concat, latest, load_parts, parquet_bytes, ranked, read_part,
                                             stored)
from kandinsky_batch.output.storage import Storage

RANK_COLUMNS = ["id", "row_index", "status", "finished_at"]
FINAL_PART_ROWS = 100_000


def _winners(tables: list[pa.Table], rendered: pa.Table, invalid: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Which stored row is each final row: (_part, _pos, row_index), from the narrow columns only; and the
    rows per status of those kept from other inputs.

    Rows with a task get their id's latest render outcome (moved to this run's row_index); this run's
    invalid rows get the latest row recorded at their (id, row_index) with status invalid. Ids this run's input
    does not hold (an earlier job's other dataset, a subset re-run) keep their latest row at each row_index:
    a run never drops another run's records.
    """
    tagged = concat([ranked(t, i) for i, t in enumerate(tables)]) if tables else ranked(SCHEMA.empty_table())
    outcomes = latest(tagged.filter(pc.not_equal(pc.field("status"), "invalid")), ["id"])
    joined = rendered.select(["id", "row_index"]).join(outcomes.select(["id", "_part", "_pos"]), "id",
                                                       join_type="left outer")
    missing = joined.filter(pc.is_null(joined["_pos"]))
    if missing.num_rows:
        raise RuntimeError(f"rows without a final manifest row: ids {missing['id'].to_pylist()[:10]} "
                           f"({missing.num_rows} in all)")
    marked = latest(tagged.filter(pc.equal(pc.field("status"), "invalid"))
                     .join(invalid.select(["id", "row_index"]), ["id", "row_index"], join_type="inner"),
                     ["id", "row_index"])
    if marked.num_rows != invalid.num_rows:
        raise RuntimeError(f"{invalid.num_rows - marked.num_rows} invalid rows have no manifest row")
    ours = pa.concat_arrays([rendered["id"].combine_chunks(), invalid["id"].combine_chunks()]) \
        if rendered.num_rows + invalid.num_rows else pa.array([], pa.string())
    others = latest(tagged.filter(pc.invert(pc.is_in(tagged["id"], ours))), ["id", "row_index"])
    kept = dict(zip(*_value_counts(others["status"])))
    columns = ["_part", "_pos", "row_index"]
    return concat([joined.select(columns), marked.select(columns), others.select(columns)]).sort_by(
        [("_part", "ascending"), ("_pos", "ascending")]), kept


@dataclass
class Finalized:
    """What `finalize` wrote: this run's rows per status, and those kept from other inputs per status."""

    counts: dict[str, int]
    kept: dict[str, int]


def finalize(storage: Storage, run_id: str, rendered: pa.Table, invalid: pa.Table,
             part_rows: int = FINAL_PART_ROWS) -> Finalized:
    """Rewrite the manifest as exactly one row per input row in final parts, keeping other inputs' rows.

    `rendered` and `invalid` hold the (id, row_index) of every input row that had a task or was invalid this
    run. Which stored row wins is decided on four narrow columns; the rows themselves are then copied a part
    at a time, so a million-row manifest never sits in memory whole. Parts hold up to `part_rows` rows,
    sorted by row_index within each (readers sort across them).
    """
    narrow, keys = load_parts(storage, RANK_COLUMNS)
    winners, kept = _winners(narrow, rendered, invalid)
    del narrow
    total = winners.num_rows
    count = max(1, -(-total // part_rows))
    written, counts, buffer = [], {}, []

    def publish() -> None:
        table = concat(buffer).sort_by([("row_index", "ascending")]) if buffer else SCHEMA.empty_table()
        name = f"part-{run_id}-final.parquet" if count == 1 else f"part-{run_id}-final-{len(written):03d}.parquet"
        storage.put_bytes(f"{MANIFEST_DIR}/{name}", parquet_bytes(stored(table)))
        written.append(f"{MANIFEST_DIR}/{name}")
        for status, n in zip(*_value_counts(table["status"])):
            counts[status] = counts.get(status, 0) + n
        buffer.clear()

    parts, positions, rows = (winners[c].to_numpy() for c in ("_part", "_pos", "row_index"))
    bounds = np.flatnonzero(np.diff(parts)) + 1
    buffered = 0
    for chunk in np.split(np.arange(total), bounds) if total else []:
        part = read_part(storage, keys[parts[chunk[0]]]).take(pa.array(positions[chunk]))
        part = part.set_column(SCHEMA.get_field_index("row_index"), "row_index", pa.array(rows[chunk], pa.int64()))
        while part.num_rows:
            take = min(part.num_rows, part_rows - buffered)
            buffer.append(part.slice(0, take))
            part, buffered = part.slice(take), buffered + take
            if buffered == part_rows:
                publish()
                buffered = 0
    if buffer or not written:
        publish()
    # Delete only what was read: a part published meanwhile holds rows the final parts lack.
    for key in keys:
        if key not in written:
            storage.delete(key)
    return Finalized({k: n - kept.get(k, 0) for k, n in counts.items() if n - kept.get(k, 0)}, kept)


def _value_counts(column) -> tuple[list, list]:
    if len(column) == 0:
        return [], []
    counted = pc.value_counts(column)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()
