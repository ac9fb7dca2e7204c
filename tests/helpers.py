"""Test helpers: datasets written in code, whole-table shortcuts over the streaming code, the plain-diffusers oracle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kandinsky_batch.config.schema import JobConfig
from kandinsky_batch.intake.dataset import Dataset
from kandinsky_batch.intake.ids import IdIndex
from kandinsky_batch.intake.rows import RowValidator, Task
from kandinsky_batch.output.finalize import FINAL_PART_ROWS
from kandinsky_batch.output.manifest import load_parts, _resolve, parquet_bytes, stored
from kandinsky_batch.output.layout import MANIFEST_DIR
from kandinsky_batch.output.storage import Storage
from pipelines import ModelSpec, to_uint8

TINY_RENDER = ["render.height=32", "render.width=32", "render.num_frames=5", "render.num_inference_steps=2",
               "render.fps=8"]


def write_dataset(path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    """Write rows as a Parquet file and return its path (columns: the union of the rows' keys)."""
    if schema is None:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        rows = [{k: row.get(k) for k in keys} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def oracle(pipe, row: dict) -> np.ndarray:
    """What plain `Kandinsky5T2VPipeline(...)` renders for a manifest row's effective values."""
    out = pipe(
        prompt=row["prompt"], negative_prompt=row["negative_prompt"], height=row["height"], width=row["width"],
        num_frames=row["num_frames"], num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"], generator=torch.Generator("cpu").manual_seed(row["seed"]),
        output_type="np",
    ).frames
    return to_uint8(out[0])


def assert_like_one_device(got: np.ndarray, want: np.ndarray, spec, context=None) -> bool:
    """A gang's frames against one device's, as its shape promises; returns whether they were bit-identical.

    CFG parallel alone: bit-identical. Sequence parallel: within `SHARD_TOLERANCE` (CPU, fp32).
    """
    from pipelines import SHARD_TOLERANCE

    assert got.shape == want.shape, (context, got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    if spec.bit_identical:
        assert diff.max() == 0, (spec.name, context, int(diff.max()), float((diff > 0).mean()))
    else:
        levels, fraction = SHARD_TOLERANCE
        assert diff.max() <= levels and (diff > 0).mean() <= fraction, \
            (spec.name, context, int(diff.max()), float((diff > 0).mean()))
    return bool(diff.max() == 0)


def read_table(path: str, storage_options: dict | None = None) -> pa.Table:
    """Read the whole dataset (a file, or a directory of `*.parquet` in name order) and check its columns."""
    return Dataset(path, storage_options).read()


def build_tasks(table: pa.Table, cfg: JobConfig, spec: ModelSpec) -> tuple[list[Task], list[dict]]:
    """Resolve every row of a whole table: valid rows become Tasks, the rest manifest rows with status `invalid`."""
    column = table.column("id") if "id" in table.column_names else None
    ids = IdIndex.build(column, table.num_rows, cfg.output.format)
    validated = RowValidator(cfg, spec, ids).validate(table, np.arange(table.num_rows))
    return validated.task_list(), validated.invalid


def compact(storage: Storage, run_id: str, table: pa.Table | None = None) -> pa.Table:
    """Rewrite the manifest as final parts `part-{run_id}-final[-NNN].parquet`; returns what it wrote.

    `table` (the job's final rows, one per input row) replaces the resolved union of the parts. Up to
    FINAL_PART_ROWS rows go to one part; a larger manifest is several, in row order.
    """
    tables, keys = load_parts(storage)
    table = _resolve(tables) if table is None else table
    slices = [table.slice(i, FINAL_PART_ROWS) for i in range(0, max(table.num_rows, 1), FINAL_PART_ROWS)]
    written = []
    for i, part in enumerate(slices):
        name = f"part-{run_id}-final.parquet" if len(slices) == 1 else f"part-{run_id}-final-{i:03d}.parquet"
        written.append(f"{MANIFEST_DIR}/{name}")
        storage.put_bytes(written[-1], parquet_bytes(stored(part)))
    # Delete only what was read: a part published meanwhile holds rows the final parts lack.
    for key in keys:
        if key not in written:
            storage.delete(key)
    return table
