"""Test helpers: datasets written in code and the plain-diffusers oracle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines import to_uint8

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
