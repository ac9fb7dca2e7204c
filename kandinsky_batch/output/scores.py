"""The scores table: metric values of committed videos in create-only Parquet parts, one resolved row per video.

    {scores}/part-{run}-{seq:06d}.parquet   rows as each run scored them (`SCORES_DIR` of a job output by default)
    {scores}/_SUCCESS                       every run's counts and each metric's provenance, rewritten last

Wide: `id`, one float64 column per metric named as the metric, `video_sha256` (what was scored), `score_error`,
`scored` (the metrics this row's run computed: a null among them is the metric's own null), `video` (where it was
read), `run`, `scored_at`. Runs with other metric sets add parts with other columns; `read_scores` resolves them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kandinsky_batch.output.layout import MANIFEST_DIR, SCORES_DIR
from kandinsky_batch.output.manifest import ManifestWriter
from kandinsky_batch.output.success import read_success, write_success
from kandinsky_batch.output.storage import Storage

KEY = ("id", "video_sha256")
FIXED = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("video_sha256", pa.string()),
    pa.field("score_error", pa.string()),
    pa.field("scored", pa.list_(pa.string())),
    pa.field("video", pa.string()),
    pa.field("run", pa.string()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC")),
])
_NO_SHA = ""  # joins never match nulls: rows whose object could not be read take this key while resolving


def table_schema(metrics) -> pa.Schema:
    """The parts' schema of a run scoring `metrics`: the fixed columns, then one float64 column per metric."""
    clash = sorted(set(metrics) & set(FIXED.names))
    if clash:
        raise ValueError(f"metric names {clash} collide with the scores table's columns {FIXED.names}")
    return pa.schema([*FIXED, *(pa.field(name, pa.float64()) for name in sorted(metrics))])


def scores_uri(output_uri: str) -> str:
    """Where a job output's scores table is: `{output}/scores`."""
    return f"{output_uri.rstrip('/')}/{SCORES_DIR}"


def open_scores(uri_or_storage, storage_options: dict | None = None) -> Storage:
    """The scores table's storage: a scores folder as given, or a job output's `scores/` (it holds `manifest/`)."""
    storage = uri_or_storage if isinstance(uri_or_storage, Storage) else Storage(uri_or_storage, storage_options)
    return storage.under(SCORES_DIR) if storage.holds(MANIFEST_DIR) else storage


def writer(storage: Storage, run_id: str, metrics, flush_rows: int = 4096, flush_seconds: float = 5.0):
    """A buffered writer of one run's rows as create-only parts at the scores table's root."""
    return ManifestWriter(storage, run_id, flush_rows, flush_seconds, schema=table_schema(metrics), folder="")


def read_rows(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """Every stored row of every part, unresolved, with `_part` (the part's index in name order) and `_pos`."""
    tables = []
    for i, key in enumerate(k for k in storage.list() if k.endswith(".parquet") and "/" not in k):
        handle = pq.ParquetFile(pa.BufferReader(storage.get_bytes(key)))
        present = None if columns is None else [c for c in columns if c in handle.schema_arrow.names]
        table = handle.read(columns=present)
        n = table.num_rows
        tables.append(table.append_column("_part", pa.array([i] * n, pa.int64()))
                      .append_column("_pos", pa.array(range(n), pa.int64())))
    if not tables:
        empty = FIXED if columns is None else pa.schema([FIXED.field(c) for c in columns if c in FIXED.names])
        return empty.empty_table().append_column("_part", pa.array([], pa.int64())).append_column(
            "_pos", pa.array([], pa.int64()))
    return pa.concat_tables(tables, promote_options="permissive")


def metric_columns(table: pa.Table) -> list[str]:
    """The metric columns of a scores table, sorted: every column that is not a fixed or a rank column."""
    return sorted(c for c in table.column_names if c not in FIXED.names and not c.startswith("_"))


def _newest_first(rows: pa.Table) -> pa.Table:
    keyed = rows.append_column("_k", pc.fill_null(rows["video_sha256"], _NO_SHA)).append_column(
        "_t", pc.fill_null(rows["scored_at"].cast(pa.int64()), -(2**63)))
    return keyed.sort_by([("id", "ascending"), ("_k", "ascending"), ("_t", "descending"),
                          ("_part", "descending"), ("_pos", "descending")])


def read_scores(uri_or_storage, storage_options: dict | None = None) -> pa.Table:
    """One row per (id, video_sha256): `id`, `video_sha256`, each metric, `score_error`, `video`, `scored_at`.

    A metric's value is the newest non-null one among the rows of that video (a run never scores a (video, metric)
    twice, so there is at most one unless a row scored it null). `score_error` is the errors of the newest run
    that wrote a row for the video, joined with "; " (null: everything that run tried scored): a re-run tries
    failed metrics again, so it says what is still wrong. A row of an object that could not be read (no sha256)
    is superseded by any later row of its id that has one. Sorted by id, then video_sha256."""
    storage = open_scores(uri_or_storage, storage_options)
    rows = _newest_first(read_rows(storage))
    metrics = metric_columns(rows)
    firsts = [("run", "first"), ("video", "first"), ("scored_at", "first"), ("_t", "first"),
              *((name, "first") for name in metrics)]
    resolved = rows.group_by(["id", "_k"], use_threads=False).aggregate(firsts)
    resolved = resolved.rename_columns([c[:-len("_first")] if c.endswith("_first") else c
                                        for c in resolved.column_names])
    # The newest run's errors for each video.
    newest = rows.select(["id", "_k", "run", "score_error"]).join(
        resolved.select(["id", "_k", "run"]), ["id", "_k", "run"], join_type="inner")
    errors = newest.group_by(["id", "_k"], use_threads=False).aggregate(
        [("score_error", "distinct", pc.CountOptions(mode="only_valid"))])
    joined = pc.binary_join(errors["score_error_distinct"], "; ")
    errors = pa.table({"id": errors["id"], "_k": errors["_k"],
                       "score_error": pc.if_else(pc.equal(joined, ""), pa.scalar(None, pa.string()), joined)})
    resolved = resolved.join(errors, ["id", "_k"], join_type="left outer")
    # An unread object's row gives way to a later row of its id with an sha256.
    read = resolved.filter(pc.not_equal(resolved["_k"], _NO_SHA))
    latest = read.group_by("id").aggregate([("_t", "max")])
    latest = pa.table({"id": latest["id"], "_read_t": latest["_t_max"]})
    resolved = resolved.join(latest, "id", join_type="left outer")
    superseded = pc.and_(pc.equal(resolved["_k"], _NO_SHA), pc.fill_null(
        pc.greater_equal(resolved["_read_t"], resolved["_t"]), False))
    resolved = resolved.filter(pc.invert(superseded))
    sha = pc.if_else(pc.equal(resolved["_k"], _NO_SHA), pa.scalar(None, pa.string()), resolved["_k"])
    resolved = resolved.append_column("video_sha256", sha).sort_by([("id", "ascending"), ("_k", "ascending")])
    return resolved.select(["id", "video_sha256", *metrics, "score_error", "video", "scored_at"])


class Scored:
    """What a scores table holds already, for resume: per id, the metrics scored for each sha256, and the newest
    error of each (id, video_sha256) (an outcome recorded again unchanged is not written twice)."""

    def __init__(self, storage: Storage):
        rows = read_rows(storage, ["id", "video_sha256", "scored", "score_error", "scored_at"])
        rows = _newest_first(rows)
        self.metrics: dict[str, dict[str | None, frozenset]] = {}
        self.errors: dict[tuple[str, str | None], str | None] = {}
        for row_id, sha, scored, error in zip(*(rows[c].to_pylist() for c in KEY + ("scored", "score_error"))):
            shas = self.metrics.setdefault(row_id, {})
            shas[sha] = shas.get(sha, frozenset()) | frozenset(scored or ())
            self.errors.setdefault((row_id, sha), error)  # newest first: the first seen stands

    def done(self, row_id: str, sha: str | None) -> frozenset:
        """The metrics already scored for this video."""
        return self.metrics.get(row_id, {}).get(sha, frozenset()) if sha is not None else frozenset()

    def by_sha(self, row_id: str) -> dict[str, frozenset]:
        """sha256 -> metrics scored, for every video of this id scored so far."""
        return {sha: m for sha, m in self.metrics.get(row_id, {}).items() if sha is not None}


def record_run(storage: Storage, run: dict) -> dict:
    """Add one run's summary to the table's `_SUCCESS` (rewritten whole, last): `runs` keeps every run's, oldest
    first; `columns` names, per metric, the newest run that loaded it and its provenance (weights, versions)."""
    summary = read_success(storage) or {}
    runs = [r for r in summary.get("runs", []) if r.get("run_id") != run["run_id"]] + [run]
    columns = {}
    for past in runs:
        for name, entry in past.get("metrics", {}).items():
            if entry.get("provenance") is not None or name not in columns:
                columns[name] = {"run": past["run_id"], **entry}
    summary = {"runs": runs, "columns": dict(sorted(columns.items()))}
    write_success(storage, summary)
    return summary


def read_runs(uri_or_storage, storage_options: dict | None = None) -> dict | None:
    """The scores table's `_SUCCESS` (`runs`, `columns`), or None before any run finished."""
    return read_success(open_scores(uri_or_storage, storage_options))
