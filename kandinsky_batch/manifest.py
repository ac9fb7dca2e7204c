"""The job manifest: one Parquet dataset under `{output}/manifest/`, one resolved row per input row."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
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
        pa.field("expanded_prompt", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("source_sha256", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("poster", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("num_frames", pa.int32()),
        pa.field("num_inference_steps", pa.int32()),
        pa.field("guidance_scale", pa.float64()),
        pa.field("fps", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("audio_sample_rate", pa.int32()),
        pa.field("audio_seconds", pa.float64()),
        pa.field("model", pa.string()),
        pa.field("sweep", pa.string()),
        pa.field("worker", pa.string()),
        pa.field("gang", pa.string()),
        pa.field("options", pa.string()),
        pa.field("approximate", pa.bool_()),
        pa.field("attempts", pa.int32()),
        pa.field("render_seconds", pa.float64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


_NAMES = frozenset(SCHEMA.names)


def check_row(row: dict) -> None:
    """The checks Arrow does not make on Python rows: known keys, a string id, a known status (ValueError)."""
    unknown = set(row) - _NAMES
    if unknown:
        raise ValueError(f"manifest row id={row.get('id')!r} has unknown keys {sorted(unknown)}; allowed: {SCHEMA.names}")
    # Arrow does not enforce nullable=False when converting Python objects, so check here.
    if not isinstance(row.get("id"), str):
        raise ValueError(f"manifest row needs a string 'id', got {row.get('id')!r}")
    if row.get("status") is not None and row["status"] not in STATUSES:
        raise ValueError(f"manifest row id={row['id']!r} has status={row['status']!r}; allowed: {list(STATUSES)}")


def to_table(rows: list[dict]) -> pa.Table:
    """Rows as a table with SCHEMA; missing keys become null, unknown keys and bad values raise ValueError."""
    for row in rows:
        check_row(row)
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
        """Buffer one row (its keys, id and status checked now, so a bad row fails at its source); may flush."""
        check_row(row)
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


def _read_part(storage: Storage, key: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.get_bytes(key)), schema=SCHEMA, columns=columns)


def _load_parts(storage: Storage, columns: list[str] | None = None,
                transform=lambda table: table) -> tuple[list[pa.Table], list[str]]:
    # A concurrent compaction may delete listed parts after writing their union, so list again on a miss.
    for _ in range(5):
        keys = _part_keys(storage)
        try:
            tables = [transform(_read_part(storage, k, columns)) for k in keys]
        except FileNotFoundError:
            continue
        return tables, keys
    raise RuntimeError(f"manifest parts under {storage.url(MANIFEST_DIR)} kept vanishing while being read")


def read_columns(storage: Storage, columns: list[str], transform=lambda table: table) -> pa.Table:
    """Some columns of all parts, unresolved (duplicates kept), each part passed through `transform` as read."""
    tables, _ = _load_parts(storage, columns, transform)
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns)


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


def read_manifest(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """One row per (id, row_index) (latest `finished_at`, ties to the later part), sorted by `row_index`;
    only `columns` (which must include id, row_index and finished_at) if given."""
    tables, _ = _load_parts(storage, columns)
    return _resolve(tables)


def _ranked(table: pa.Table) -> pa.Table:
    """Positions of `table` as columns, with commit time ranked (null = oldest)."""
    return pa.table({"id": table["id"], "row_index": table["row_index"], "status": table["status"],
                     "_t": pc.fill_null(table["finished_at"].cast(pa.int64()), -(2**63)),
                     "_pos": pa.array(np.arange(table.num_rows))})


def _first_per(table: pa.Table, key: str) -> pa.Table:
    """The first row of each run of equal `key` values (the table is sorted by it)."""
    values = table[key].combine_chunks()
    n = len(values)
    if n == 0:
        return table
    changed = pc.fill_null(pc.not_equal(values.slice(1), values.slice(0, n - 1)), True)
    return table.filter(pa.concat_arrays([pa.array([True]), changed]))


def latest_outcomes(table: pa.Table) -> pa.Table:
    """The latest render outcome (ok or failed) per id among manifest rows, whatever row it sat at."""
    ranked = _ranked(table).filter(pc.not_equal(pc.field("status"), "invalid"))
    order = ranked.sort_by([("id", "ascending"), ("_t", "descending"), ("_pos", "descending")])
    return table.take(_first_per(order, "id")["_pos"])


RANK_COLUMNS = ["id", "row_index", "status", "finished_at"]
FINAL_PART_ROWS = 100_000


def _winners(tables: list[pa.Table], rendered: pa.Table, invalid: pa.Table) -> pa.Table:
    """Which stored row is each input row's final one: (_part, _pos, row_index), from the narrow columns only.

    Rows with a task get their id's latest render outcome (moved to this run's row_index); this run's
    invalid rows get the latest row recorded at their (id, row_index) with status invalid.
    """
    tagged = pa.concat_tables(
        _ranked(t).append_column("_part", pa.array(np.full(t.num_rows, i), pa.int64())) for i, t in enumerate(tables)
    ) if tables else _ranked(SCHEMA.empty_table()).append_column("_part", pa.array([], pa.int64()))
    order = [("_t", "descending"), ("_part", "descending"), ("_pos", "descending")]
    outcomes = _first_per(tagged.filter(pc.not_equal(pc.field("status"), "invalid"))
                          .sort_by([("id", "ascending"), *order]), "id")
    joined = rendered.select(["id", "row_index"]).join(outcomes.select(["id", "_part", "_pos"]), "id",
                                                       join_type="left outer")
    missing = joined.filter(pc.is_null(joined["_pos"]))
    if missing.num_rows:
        raise RuntimeError(f"rows without a final manifest row: ids {missing['id'].to_pylist()[:10]} "
                           f"({missing.num_rows} in all)")
    marked = (tagged.filter(pc.equal(pc.field("status"), "invalid"))
              .join(invalid.select(["id", "row_index"]), ["id", "row_index"], join_type="inner")
              .sort_by([("id", "ascending"), ("row_index", "ascending"), *order]))
    marked = marked.take(_first_unique(marked))
    if marked.num_rows != invalid.num_rows:
        raise RuntimeError(f"{invalid.num_rows - marked.num_rows} invalid rows have no manifest row")
    columns = ["_part", "_pos", "row_index"]
    return pa.concat_tables([joined.select(columns), marked.select(columns)]).sort_by([("_part", "ascending"),
                                                                                       ("_pos", "ascending")])


def finalize(storage: Storage, run_id: str, rendered: pa.Table, invalid: pa.Table,
             part_rows: int = FINAL_PART_ROWS) -> dict[str, int]:
    """Rewrite the manifest as exactly one row per input row in final parts; returns the rows per status.

    `rendered` and `invalid` hold the (id, row_index) of every input row that had a task or was invalid this
    run. Which stored row wins is decided on four narrow columns; the rows themselves are then copied a part
    at a time, so a million-row manifest never sits in memory whole. Parts hold up to `part_rows` rows,
    sorted by row_index within each (readers sort across them).
    """
    narrow, keys = _load_parts(storage, RANK_COLUMNS)
    winners = _winners(narrow, rendered, invalid)
    del narrow
    total = winners.num_rows
    count = max(1, -(-total // part_rows))
    written, counts, buffer = [], {}, []

    def publish() -> None:
        table = pa.concat_tables(buffer).sort_by([("row_index", "ascending")]) if buffer else SCHEMA.empty_table()
        name = f"part-{run_id}-final.parquet" if count == 1 else f"part-{run_id}-final-{len(written):03d}.parquet"
        storage.put_bytes(f"{MANIFEST_DIR}/{name}", _to_parquet(table))
        written.append(f"{MANIFEST_DIR}/{name}")
        for status, n in zip(*_value_counts(table["status"])):
            counts[status] = counts.get(status, 0) + n
        buffer.clear()

    parts, positions, rows = (winners[c].to_numpy() for c in ("_part", "_pos", "row_index"))
    bounds = np.flatnonzero(np.diff(parts)) + 1
    buffered = 0
    for chunk in np.split(np.arange(total), bounds) if total else []:
        part = _read_part(storage, keys[parts[chunk[0]]]).take(pa.array(positions[chunk]))
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
    return counts


def _value_counts(column) -> tuple[list, list]:
    if len(column) == 0:
        return [], []
    counted = pc.value_counts(column)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def _first_unique(table: pa.Table) -> pa.Array:
    """Indices of the first row of each (id, row_index) run in a table sorted by them."""
    if table.num_rows == 0:
        return pa.array([], pa.int64())
    ids, rows = table["id"].combine_chunks(), table["row_index"].combine_chunks()
    n = len(ids)
    changed = pc.or_(pc.not_equal(ids.slice(1), ids.slice(0, n - 1)), pc.not_equal(rows.slice(1), rows.slice(0, n - 1)))
    keep = pa.concat_arrays([pa.array([True]), pc.fill_null(changed, True)])
    return pa.array(np.flatnonzero(keep.to_numpy(zero_copy_only=False)))




def compact(storage: Storage, run_id: str, table: pa.Table | None = None) -> pa.Table:
    """Rewrite the manifest as final parts `part-{run_id}-final[-NNN].parquet`; returns what it wrote.

    `table` (the job's final rows, one per input row) replaces the resolved union of the parts. Up to
    FINAL_PART_ROWS rows go to one part; a larger manifest is several, in row order.
    """
    tables, keys = _load_parts(storage)
    table = _resolve(tables) if table is None else table
    slices = [table.slice(i, FINAL_PART_ROWS) for i in range(0, max(table.num_rows, 1), FINAL_PART_ROWS)]
    written = []
    for i, part in enumerate(slices):
        name = f"part-{run_id}-final.parquet" if len(slices) == 1 else f"part-{run_id}-final-{i:03d}.parquet"
        written.append(f"{MANIFEST_DIR}/{name}")
        storage.put_bytes(written[-1], _to_parquet(part))
    # Delete only what was read: a part published meanwhile holds rows the final parts lack.
    for key in keys:
        if key not in written:
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
