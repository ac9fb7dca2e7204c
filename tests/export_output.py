"""A small scored sweep output for the export tests: real mp4s and posters, carried input columns, a failed and an
invalid cell, one unscored and one errored video; and the selection recomputed from its Parquet files apart."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.scores import open_scores, writer
from kandinsky_batch.output.storage import Storage
from tests.helpers import compact
from tests.scores_output import METRICS, T0, synthetic, write_scores
from tests.sweep_output import PROMPTS, write_sweep

# guidance_scale's axis mixes an int and a float on purpose: exported, both are floats.
AXES = {"model": ["tiny", "tiny-b"], "guidance_scale": [5, 5.5], "seed": [1, 2]}
FAILED, INVALID = "p1.tiny-5-2", "p2.tiny-b-5.5-1"
UNSCORED, ERRORED = "p0.tiny-5-1", "p0.tiny-b-5-2"
CARRIED = ("licence", "tags", "dimension")
CONDITION = "clip_score > 24 AND shot_cuts < 2 AND licence = 'cc-by'"


def _carried(table: pa.Table) -> pa.Table:
    """Input columns the manifest carries through: a licence, tags, a prompt suite's dimension."""
    table = table.drop_columns([c for c in CARRIED if c in table.column_names])
    n = table.num_rows
    licences = ["cc-by" if i % 3 else "proprietary" for i in range(n)]
    return (table.append_column("licence", pa.array(licences, pa.string()))
            .append_column("tags", pa.array([[f"t{i % 2}", "synthetic"] for i in range(n)], pa.list_(pa.string())))
            .append_column("dimension", pa.array(["subject_consistency"] * n, pa.string())))


def copy_output(root: Path, storage: Storage) -> Storage:
    """A local output's files, byte for byte, under another prefix (an object store's)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            storage.put_bytes(str(path.relative_to(root)), path.read_bytes())
    return storage


def write_source(uri: str, options: dict | None = None, prompts: list[str] = PROMPTS) -> Storage:
    """The finished, scored output (see module docstring)."""
    storage = write_sweep(uri, options, prompts=prompts, axes=AXES,
                          outcomes={FAILED: ("failed", "replica lost"), INVALID: ("invalid", "height=7: too small")})
    compact(storage, "run1", _carried(read_manifest(storage)))
    write_scores(storage, skip={UNSCORED}, errors={ERRORED: "clip_score: unreadable"})
    return storage


def add_rows(storage: Storage, prompts: list[str]) -> list[str]:
    """More rows rendered into the same output, the rows and objects already there kept as they were (the encoder
    is not bit-stable across runs), and scored by a second run: the new ids."""
    before = read_manifest(storage)
    kept = {key: storage.get_bytes(key) for key in storage.list() if key.startswith(("videos/", "posters/"))}
    write_sweep(storage.uri, storage._options, prompts=prompts, axes=AXES,
                outcomes={FAILED: ("failed", "replica lost"), INVALID: ("invalid", "height=7: too small")})
    for key, data in kept.items():
        storage.put_bytes(key, data)
    after = read_manifest(storage)
    added = after.filter(pc.invert(pc.is_in(after["id"], value_set=before["id"].combine_chunks())))
    both = pa.concat_tables([t.drop_columns([c for c in CARRIED if c in t.column_names]) for t in (before, added)]).sort_by(
        [("row_index", "ascending"), ("id", "ascending")])
    compact(storage, "run1", _carried(both))
    out = writer(open_scores(storage), "score2", METRICS)
    for row in added.to_pylist():
        if row["status"] == "ok":
            out.add({"id": row["id"], "video_sha256": row["sha256"], "scored": list(METRICS), "run": "score2",
                     "scored_at": T0, **synthetic(row["id"])})
    out.flush()
    return added["id"].to_pylist()


def expected_rows(root: Path, keep=lambda row: True) -> list[dict]:
    """The ok rows of a local source read straight from its Parquet files, each with its known scores (none for
    the unscored and errored videos), kept by `keep`, in (row_index, id) order."""
    manifest = pq.read_table(root / "manifest").to_pylist()
    out = []
    for row in manifest:
        if row["status"] != "ok":
            continue
        scored = row["id"] not in (UNSCORED, ERRORED)
        row.update({m: synthetic(row["id"])[m] if scored else None for m in METRICS})
        row["sweep"] = json.loads(row["sweep"]) if row["sweep"] else None
        if keep(row):
            out.append(row)
    return sorted(out, key=lambda r: (r["row_index"], r["id"]))


def passes(row: dict) -> bool:
    """CONDITION in Python: SQL's comparisons with null are not true."""
    return (row["clip_score"] is not None and row["clip_score"] > 24 and row["shot_cuts"] < 2
            and row["licence"] == "cc-by")
