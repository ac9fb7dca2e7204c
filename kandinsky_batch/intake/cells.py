"""Input rows -> their sweep cells, in Arrow: each cell's id, seed and axis values set, one table per model.

What the cells are (axes, ids, seeds) is the config's `Sweep`; this is the front end applying it to a batch of
input rows before they are validated, so rows stay Arrow until they become tasks.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.config.schema import derive_seed
from kandinsky_batch.config.sweep import RENDER_AXES, ModelVariant, Sweep


def expand(sweep: Sweep, batch: pa.Table, ids: pa.Array, rows: np.ndarray, variant: ModelVariant,
           job_seed: int) -> tuple[pa.Table, np.ndarray, dict[int, str]]:
    """The cells of `batch` (input rows `rows` with ids `ids`) on one model: ids, seeds and axis values set,
    and the errors of cells that cannot be rendered as the sweep asks (by position in the cells' table)."""
    if not sweep.active:  # an input column named `sweep` is not the manifest's
        return (batch.drop_columns(["sweep"]) if "sweep" in batch.column_names else batch), rows, {}
    base = ids.to_pylist()
    own = batch.column("seed").to_pylist() if "seed" in batch.column_names else [None] * len(base)
    errors = {}
    if sweep.cells[0].seed is not None:
        # A row's own seed and a seeds axis would both decide the same seed: the row is not rendered.
        clash = [i for i, s in enumerate(own) if s is not None]
        for offset in range(len(sweep.cells)):
            errors.update({offset * len(base) + i: f"seed={own[i]}: the row sets its own seed (rule: a sweep "
                           f"with a seeds axis sets every cell's seed; drop the row's seed)" for i in clash})
    tables = []
    for suffix, values, cell in sweep.cells_of(variant):
        table = batch
        for axis, value in cell.render.items():
            kind = RENDER_AXES[axis][1]
            if axis in table.column_names:  # the row's own value overrides the axis
                column = pc.fill_null(table.column(axis).cast(kind), pa.scalar(value, kind))
            else:
                column = pa.array([value] * table.num_rows, kind)
            table = _set(table, axis, column)
        table = _set(table, "id", pc.binary_join_element_wise(ids, pa.scalar(suffix), ""))
        if cell.seed is not None:
            seeds = [_cell_seed(cell.seed, job_seed, i) if s is None else s for i, s in zip(base, own)]
        else:
            seeds = [_cell_seed(None, job_seed, i) if s is None else s for i, s in zip(base, own)]
        table = _set(table, "seed", pa.array(seeds, pa.int64()))
        table = _set(table, "sweep", pa.array([values] * table.num_rows, pa.string()))
        # The cell's axis values typed, named apart from the effective `model` (a path) and `seed` (a number).
        if sweep.swept_models:
            table = _set(table, "sweep_model", pa.array([variant.label] * table.num_rows, pa.string()))
        if cell.seed_index is not None:
            table = _set(table, "sweep_seed_index", pa.array([cell.seed_index] * table.num_rows, pa.int64()))
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive"), np.tile(rows, len(tables)), errors


def annotate(sweep: Sweep, invalid: list[dict], variant: ModelVariant) -> list[dict]:
    """Name the sweep axis in the errors of invalid cells whose failing field an axis set."""
    if not sweep.active:
        return invalid
    for row in invalid:
        values = json.loads(row["sweep"]) if row.get("sweep") else {}
        axis = next((a for a in RENDER_AXES if a in values and (row.get("error") or "").startswith(f"{a}=")
                     and row.get(a) == values[a]), None)
        if axis is not None:
            row["error"] = f"sweep axis {row['error']}"
        if sweep.swept_models:
            row["error"] = f"{row['error']} (sweep model {variant.label!r}: {variant.model.path})"
    return invalid


def _set(table: pa.Table, name: str, column) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


def _cell_seed(seed: tuple | None, job_seed: int, row_id: str) -> int:
    if seed is None:
        return derive_seed(job_seed, row_id)
    kind, value = seed
    return derive_seed(job_seed + value, row_id) if kind == "count" else value
