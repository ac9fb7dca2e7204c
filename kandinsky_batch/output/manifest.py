"""The job manifest: one Parquet dataset under `{output}/manifest/`, one resolved row per input row."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import MANIFEST_DIR, key_from_uri

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
        pa.field("key", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("poster_key", pa.string()),
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
        pa.field("model_revision", pa.string()),
        pa.field("weights", pa.string()),
        pa.field("sweep", pa.string()),
        pa.field("sweep_model", pa.string()),
        pa.field("sweep_seed_index", pa.int64()),
        pa.field("worker", pa.string()),
        pa.field("gang", pa.string()),
        pa.field("options", pa.string()),
        pa.field("approximate", pa.bool_()),
        pa.field("attempts", pa.int32()),
        pa.field("render_seconds", pa.float64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        # `output.latents: true`: the row's latents object (`latents/{stem}.safetensors`, relative to the output).
        pa.field("latents_key", pa.string()),
        pa.field("latents_sha256", pa.string()),
        pa.field("latents_bytes", pa.int64()),
    ]
)


_NAMES = frozenset(SCHEMA.names)
# Where a row's objects are: `key`/`poster_key` (relative to the output prefix) are what is stored; `uri`/`poster`
# are filled in by the readers below against where the output is now, so a moved output still resolves.
LOCATED = (("key", "uri"), ("poster_key", "poster"))


def job_schema(carried: pa.Schema | None = None) -> pa.Schema:
    """The manifest schema of a job: SCHEMA, then the input columns it carries through (`carried`)."""
    if not carried or not len(carried):
        return SCHEMA
    clash = [name for name in carried.names if name in _NAMES]
    if clash:
        raise ValueError(f"carried input columns {clash} collide with manifest columns")
    return pa.schema([*SCHEMA, *carried])


def check_row(row: dict, names: frozenset = _NAMES) -> None:
    """The checks Arrow does not make on Python rows: known keys, a string id, a known status (ValueError)."""
    unknown = set(row) - names
    if unknown:
        raise ValueError(f"manifest row id={row.get('id')!r} has unknown keys {sorted(unknown)}; allowed: {SCHEMA.names}")
    # Arrow does not enforce nullable=False when converting Python objects, so check here.
    if not isinstance(row.get("id"), str):
        raise ValueError(f"manifest row needs a string 'id', got {row.get('id')!r}")
    if row.get("status") is not None and row["status"] not in STATUSES:
        raise ValueError(f"manifest row id={row['id']!r} has status={row['status']!r}; allowed: {list(STATUSES)}")


def to_table(rows: list[dict], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows as a table with `schema`; missing keys become null, unknown keys and bad values raise ValueError."""
    names = frozenset(schema.names)
    for row in rows:
        check_row(row, names)
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        ids = [row.get("id") for row in rows][:10]
        raise ValueError(f"manifest rows (ids {ids}) do not fit the schema: {exc}") from exc


def concat(tables: list[pa.Table]) -> pa.Table:
    """Manifest tables of several parts as one: parts of other runs may carry other input columns (null elsewhere)."""
    return pa.concat_tables(tables, promote_options="permissive") if tables else SCHEMA.empty_table()


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes, the same bytes for the same table (what create-only re-writes compare)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ManifestWriter:
    """Buffers manifest rows and publishes them as whole Parquet parts `manifest/part-{run_id}-{seq:06d}.parquet`.

    Flushes when `flush_rows` rows are buffered or the oldest buffered row has waited `flush_seconds`
    (checked on `add`); call `flush()` when done. `run_id` must be unique per writer. `folder` is where the parts
    go under `storage` ("" for its root: a scores table's parts, `kandinsky_batch.output.scores`).
    """

    def __init__(self, storage: Storage, run_id: str, flush_rows: int = 64, flush_seconds: float = 10.0,
                 schema: pa.Schema = SCHEMA, folder: str = MANIFEST_DIR) -> None:
        if flush_rows < 1 or flush_seconds < 0:
            raise ValueError(f"need flush_rows >= 1 and flush_seconds >= 0, got {flush_rows}, {flush_seconds}")
        if "/" in run_id or not run_id:
            raise ValueError(f"run_id must be a non-empty name without '/', got {run_id!r}")
        self.storage = storage
        self.run_id = run_id
        self.schema = schema
        self.folder = f"{folder}/" if folder else ""
        self._names = frozenset(schema.names)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.parts: list[str] = []
        self._rows: list[dict] = []
        self._oldest = 0.0
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, row: dict) -> None:
        """Buffer one row (its keys, id and status checked now, so a bad row fails at its source); may flush."""
        check_row(row, self._names)
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
            key = f"{self.folder}part-{self.run_id}-{self._seq:06d}.parquet"
            data = parquet_bytes(stored(to_table(self._rows, self.schema)))
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


def _conform(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """A stored part in SCHEMA's types and order (columns it predates as nulls), then its carried input columns."""
    names = columns if columns is not None else SCHEMA.names
    arrays, fields = [], []
    for name in names:
        if name not in _NAMES and name not in table.column_names:
            continue  # a carried column of other parts: concat makes it null here, as a read of every column does
        field_ = SCHEMA.field(name) if name in _NAMES else table.schema.field(name)
        if name in table.column_names:
            column = table.column(name)
            arrays.append(column if column.type == field_.type else column.cast(field_.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field_.type))
        fields.append(field_)
    if columns is None:
        for name in table.column_names:
            if name not in _NAMES:
                arrays.append(table.column(name))
                fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _keys(table: pa.Table, key_name: str, uri_name: str) -> pa.Array:
    """A part's object keys: its `key` column, or for rows of older outputs (absolute URIs only) the key the URI
    names. Only those rows go through Python; parts written with keys stay in Arrow."""
    keys = table.column(key_name).combine_chunks()
    if uri_name not in table.column_names:
        return keys
    uris = table.column(uri_name).combine_chunks()
    missing = np.flatnonzero(pc.and_(pc.is_null(keys), pc.is_valid(uris)).to_numpy(zero_copy_only=False))
    if not len(missing):
        return keys
    filled = keys.to_pylist()
    for i in missing:
        filled[i] = key_from_uri(uris[int(i)].as_py())
    return pa.array(filled, pa.string())


def _located(storage: Storage, table: pa.Table) -> pa.Table:
    """Keys of older parts (absolute URIs only) derived from their URIs; URIs resolved against the prefix as it is now."""
    base = pa.scalar(f"{storage.scheme}://{storage.root}/")
    for key_name, uri_name in LOCATED:
        if key_name not in table.column_names:
            continue
        keys = _keys(table, key_name, uri_name)
        table = table.set_column(table.schema.get_field_index(key_name), key_name, keys)
        if uri_name in table.column_names:
            resolved = pc.binary_join_element_wise(base, keys, "")  # null where there is no object
            table = table.set_column(table.schema.get_field_index(uri_name), uri_name, resolved)
    return table


def read_part(storage: Storage, key: str, columns: list[str] | None = None) -> pa.Table:
    """One stored part, conformed to SCHEMA, with its objects located under the prefix as it is now."""
    handle = pq.ParquetFile(io.BytesIO(storage.get_bytes(key)))
    wanted = columns if columns is None else list(dict.fromkeys(
        [*columns, *(k for k, u in LOCATED if u in columns or k in columns),
         *(u for k, u in LOCATED if k in columns or u in columns)]))
    present = None if wanted is None else [c for c in wanted if c in handle.schema_arrow.names]
    table = _located(storage, _conform(handle.read(columns=present), wanted))
    return table if columns is None else table.select([c for c in columns if c in table.column_names])


def stored(table: pa.Table) -> pa.Table:
    """A table as parts store it: objects by key alone (the readers resolve `uri`/`poster` where the output is)."""
    for key_name, uri_name in LOCATED:
        if uri_name not in table.column_names:
            continue
        if key_name in table.column_names:  # a row given by URI alone is stored by the key the URI names
            table = table.set_column(table.schema.get_field_index(key_name), key_name,
                                     _keys(table, key_name, uri_name))
        i = table.schema.get_field_index(uri_name)
        table = table.set_column(i, uri_name, pa.nulls(table.num_rows, pa.string()))
    return table


def load_parts(storage: Storage, columns: list[str] | None = None,
                transform=lambda table: table) -> tuple[list[pa.Table], list[str]]:
    # A concurrent compaction may delete listed parts after writing their union, so list again on a miss.
    for _ in range(5):
        keys = _part_keys(storage)
        try:
            tables = [transform(read_part(storage, k, columns)) for k in keys]
        except FileNotFoundError:
            continue
        return tables, keys
    raise RuntimeError(f"manifest parts under {storage.url(MANIFEST_DIR)} kept vanishing while being read")


def read_columns(storage: Storage, columns: list[str], transform=lambda table: table) -> pa.Table:
    """Some columns of all parts, unresolved (duplicates kept), each part passed through `transform` as read."""
    tables, _ = load_parts(storage, columns, transform)
    return concat(tables) if tables else SCHEMA.empty_table().select(columns)


def read_parts(storage: Storage) -> tuple[pa.Table, list[str]]:
    """All rows of all parts, unresolved (duplicates kept), and the part keys they came from."""
    tables, keys = load_parts(storage)
    return concat(tables), keys


def _resolve(tables: list[pa.Table]) -> pa.Table:
    if sum(t.num_rows for t in tables) == 0:
        return SCHEMA.empty_table()
    # Ranked and sorted on the narrow rank columns, then one take of the wide rows: a single copy of the table.
    ranks = concat([ranked(t.select(["id", "row_index", "finished_at"]), i, keep=True) for i, t in enumerate(tables)])
    ranks = ranks.append_column("_row", pa.array(np.arange(ranks.num_rows), pa.int64()))
    # One row per input row: (id, row_index), so a duplicate id's own `invalid` row is kept beside the first.
    order = latest(ranks, ["id", "row_index"]).sort_by([("row_index", "ascending"), ("id", "ascending")])
    return concat(tables).take(order["_row"])


def read_manifest(storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """One row per (id, row_index) (latest `finished_at`, ties to the later part), sorted by `row_index`;
    only `columns` (which must include id, row_index and finished_at) if given."""
    tables, _ = load_parts(storage, columns)
    resolved = _resolve(tables)
    if columns is None or not resolved.num_rows:
        return resolved
    return resolved.select([c for c in columns if c in resolved.column_names])


def ranked(table: pa.Table, part: int = 0, keep: bool = False) -> pa.Table:
    """`table`'s rank columns: commit time (`_t`, null = oldest), part and position; with the rank columns only,
    or after all of `table`'s (`keep`)."""
    ranks = {"_t": pc.fill_null(table["finished_at"].cast(pa.int64()), -(2**63)),
             "_part": pa.array(np.full(table.num_rows, part), pa.int64()),
             "_pos": pa.array(np.arange(table.num_rows), pa.int64())}
    if keep:
        for name, column in ranks.items():
            table = table.append_column(name, column)
        return table
    return pa.table({"id": table["id"], "row_index": table["row_index"], "status": table["status"], **ranks})


def latest(table: pa.Table, keys: list[str]) -> pa.Table:
    """The latest row per value of `keys` in a `ranked` table: the one resolver of which manifest row stands.

    Latest is the later `finished_at` (null = oldest), ties to the later part, then the later row within it."""
    ordered = table.sort_by([(k, "ascending") for k in keys]
                             + [("_t", "descending"), ("_part", "descending"), ("_pos", "descending")])
    n = ordered.num_rows
    if n == 0:
        return ordered
    changed = pa.array(np.zeros(n - 1, dtype=bool))
    for k in keys:
        values = ordered[k].combine_chunks()
        changed = pc.or_(changed, pc.fill_null(pc.not_equal(values.slice(1), values.slice(0, n - 1)), True))
    return ordered.filter(pa.concat_arrays([pa.array([True]), changed]))


def latest_outcomes(table: pa.Table) -> pa.Table:
    """The latest render outcome (ok or failed) per id among manifest rows, whatever row it sat at."""
    outcomes = ranked(table).filter(pc.not_equal(pc.field("status"), "invalid"))
    return table.take(latest(outcomes, ["id"])["_pos"])
