"""The job manifest: one Parquet dataset under `{output}/manifest/`, one resolved row per input row."""

from __future__ import annotations

import io
import json
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import Storage

MANIFEST_DIR = "manifest"
SUCCESS_KEY = "_SUCCESS"
STATUSES = ("ok", "invalid", "failed")

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("row_index", pa.int64()),
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("num_frames", pa.int32()),
        pa.field("num_inference_steps", pa.int32()),
        pa.field("guidance_scale", pa.float64()),
        pa.field("fps", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("model", pa.string()),
        pa.field("worker", pa.string()),
        pa.field("gang", pa.string()),
        pa.field("options", pa.string()),
        pa.field("approximate", pa.bool_()),
        pa.field("attempts", pa.int32()),
        pa.field("render_seconds", pa.float64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


def to_table(rows: list[dict]) -> pa.Table:
    """Rows as a table with SCHEMA; missing keys become null, unknown keys and bad values raise ValueError."""
    for row in rows:
        unknown = sorted(set(row) - set(SCHEMA.names))
        if unknown:
            raise ValueError(f"manifest row id={row.get('id')!r} has unknown keys {unknown}; allowed: {SCHEMA.names}")
        # Arrow does not enforce nullable=False when converting Python objects, so check here.
        if not isinstance(row.get("id"), str):
            raise ValueError(f"manifest row needs a string 'id', got {row.get('id')!r}")
        if row.get("status") is not None and row["status"] not in STATUSES:
            raise ValueError(f"manifest row id={row['id']!r} has status={row['status']!r}; allowed: {list(STATUSES)}")
    try:
        return pa.Table.from_pylist(rows, schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        ids = [row.get("id") for row in rows][:10]
        raise ValueError(f"manifest rows (ids {ids}) do not fit the schema: {exc}") from exc


def _to_parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ManifestWriter:
    """Buffers manifest rows and publishes them as whole Parquet parts `manifest/part-{run_id}-{seq:06d}.parquet`.

    Flushes when `flush_rows` rows are buffered or the oldest buffered row has waited `flush_seconds`
    (checked on `add`); call `flush()` when done. `run_id` must be unique per writer.
    """

    def __init__(self, storage: Storage, run_id: str, flush_rows: int = 64, flush_seconds: float = 10.0) -> None:
        if flush_rows < 1 or flush_seconds < 0:
            raise ValueError(f"need flush_rows >= 1 and flush_seconds >= 0, got {flush_rows}, {flush_seconds}")
        if "/" in run_id or not run_id:
            raise ValueError(f"run_id must be a non-empty name without '/', got {run_id!r}")
        self.storage = storage
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.parts: list[str] = []
        self._rows: list[dict] = []
        self._oldest = 0.0
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, row: dict) -> None:
        """Buffer one row (validated now, so a bad row fails at its source); may flush."""
        to_table([row])
        with self._lock:
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.append(dict(row))
            due = len(self._rows) >= self.flush_rows or time.monotonic() - self._oldest >= self.flush_seconds
        if due:
            self.flush()

    def flush_if_due(self) -> str | None:
        """Publish buffered rows if the oldest has waited `flush_seconds` (call it periodically)."""
        with self._lock:
            due = bool(self._rows) and time.monotonic() - self._oldest >= self.flush_seconds
        return self.flush() if due else None

    def flush(self) -> str | None:
        """Publish buffered rows as one part; returns its key, or None if nothing was buffered."""
        with self._lock:
            if not self._rows:
                return None
            key = f"{MANIFEST_DIR}/part-{self.run_id}-{self._seq:06d}.parquet"
            data = _to_parquet(to_table(self._rows))
            # Create-only: two writers sharing a run_id would otherwise overwrite each other's rows.
            if not self.storage.put_bytes_if_absent(key, data) and self.storage.get_bytes(key) != data:
                raise RuntimeError(f"manifest part {key} exists with other rows: run_id {self.run_id!r} is reused")
            # Rows are dropped only after the part is stored, so a failed flush can be retried.
            self._rows.clear()
            self._seq += 1
            self.parts.append(key)
            return key


def _part_keys(storage: Storage) -> list[str]:
    return [k for k in storage.list(MANIFEST_DIR) if k.endswith(".parquet")]


def _load_parts(storage: Storage) -> tuple[list[pa.Table], list[str]]:
    # A concurrent compaction may delete listed parts after writing their union, so list again on a miss.
    for _ in range(5):
        keys = _part_keys(storage)
        try:
            tables = [pq.read_table(io.BytesIO(storage.get_bytes(k)), schema=SCHEMA) for k in keys]
        except FileNotFoundError:
            continue
        return tables, keys
    raise RuntimeError(f"manifest parts under {storage.url(MANIFEST_DIR)} kept vanishing while being read")


def read_parts(storage: Storage) -> tuple[pa.Table, list[str]]:
    """All rows of all parts, unresolved (duplicates kept), and the part keys they came from."""
    tables, keys = _load_parts(storage)
    return (pa.concat_tables(tables) if tables else SCHEMA.empty_table()), keys


def _resolve(tables: list[pa.Table]) -> pa.Table:
    if sum(t.num_rows for t in tables) == 0:
        return SCHEMA.empty_table()
    # Rank by finished_at (null = oldest), then the later part, then the later row within a part.
    tagged = pa.concat_tables(
        t.append_column("_part", pa.array([i] * t.num_rows, pa.int64()))
        .append_column("_pos", pa.array(range(t.num_rows), pa.int64()))
        for i, t in enumerate(tables)
    )
    tagged = tagged.append_column("_t", pc.fill_null(tagged["finished_at"].cast(pa.int64()), -(2**63)))
    order = pc.sort_indices(
        tagged,
        sort_keys=[("id", "ascending"), ("row_index", "ascending"), ("_t", "descending"), ("_part", "descending"),
                   ("_pos", "descending")],
    )
    ranked = tagged.take(order)
    # One row per input row: (id, row_index), so a duplicate id's own `invalid` row is kept beside the first.
    ids, rows = ranked["id"].combine_chunks(), ranked["row_index"].combine_chunks()
    n = len(ids)
    changed = pc.or_(pc.not_equal(ids.slice(1), ids.slice(0, n - 1)), pc.not_equal(rows.slice(1), rows.slice(0, n - 1)))
    keep = pa.concat_arrays([pa.array([True]), pc.fill_null(changed, True)])
    resolved = ranked.filter(keep).drop_columns(["_part", "_pos", "_t"])
    return resolved.sort_by([("row_index", "ascending"), ("id", "ascending")])


def read_manifest(storage: Storage) -> pa.Table:
    """One row per (id, row_index) (latest `finished_at`, ties to the later part), sorted by `row_index`."""
    tables, _ = _load_parts(storage)
    return _resolve(tables)


def latest_outcomes(rows: list[dict]) -> dict[str, dict]:
    """The latest render outcome (ok or failed) per id among manifest rows, whatever row it sat at."""
    rows = [r for r in rows if r["status"] != "invalid"]
    rows.sort(key=lambda r: (r["finished_at"] is not None, r["finished_at"] or 0))
    return {r["id"]: r for r in rows}


def compact(storage: Storage, run_id: str, table: pa.Table | None = None) -> pa.Table:
    """Rewrite the manifest as the single part `part-{run_id}-final.parquet`; returns what it wrote.

    `table` (the job's final rows, one per input row) replaces the resolved union of the parts.
    """
    tables, keys = _load_parts(storage)
    table = _resolve(tables) if table is None else table
    final = f"{MANIFEST_DIR}/part-{run_id}-final.parquet"
    storage.put_bytes(final, _to_parquet(table))
    # Delete only what was read: a part published meanwhile holds rows the final part lacks.
    for key in keys:
        if key != final:
            storage.delete(key)
    return table


def write_success(storage: Storage, summary: dict) -> None:
    """Publish `_SUCCESS` with the job summary as pretty JSON."""
    text = json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"
    storage.put_bytes(SUCCESS_KEY, text.encode("utf-8"))


def read_success(storage: Storage) -> dict | None:
    """The `_SUCCESS` summary, or None if the job has not finished."""
    try:
        return json.loads(storage.get_bytes(SUCCESS_KEY))
    except FileNotFoundError:
        return None
