"""Which rows an export takes: a finished job's ok rows joined with their scores, filtered by `--where` in DuckDB.

The condition is a relation filter over one table (manifest columns, then score columns), never text pasted into a
query, and DuckDB runs it with file and network access off and its configuration locked: it can neither read
nor write anything but that table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kandinsky_batch.errors import InputError
from kandinsky_batch.output.layout import MANIFEST_DIR, SCORES_DIR, SUCCESS_KEY
from kandinsky_batch.output.manifest import SCHEMA as MANIFEST
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.scores import metric_columns, read_scores
from kandinsky_batch.output.storage import Storage

_POS = "__export_position"
_OWN = ("id", "row_index", "finished_at", "status", "sha256", "bytes", "sweep")
"""The manifest columns the selection itself reads: resolving rows, matching scores, counting variants."""
NO_SWEEP = "(no sweep)"


@dataclass
class Tally:
    """One sweep variant's rows: ok ones, those the condition keeps and excludes, the bytes of those kept."""

    ok: int = 0
    passing: int = 0
    excluded: int = 0
    bytes: int = 0


@dataclass
class Selection:
    """The selected rows (manifest columns, then score columns), ordered by row_index then id, and the counts."""

    table: pa.Table
    scores: list[str]
    """The score columns joined on (the scores table's metrics): null where a row is unscored."""
    carried: list[str]
    """Input columns the manifest carries beyond its own schema."""
    variants: dict[str, Tally] = field(default_factory=dict)

    def counts(self) -> Selection:
        """The selection without its rows (their schema kept): what a result keeps once they are samples."""
        return Selection(self.table.schema.empty_table(), self.scores, self.carried, self.variants)

    @property
    def total(self) -> Tally:
        """The counts over every variant."""
        out = Tally()
        for tally in self.variants.values():
            out.ok, out.passing = out.ok + tally.ok, out.passing + tally.passing
            out.excluded, out.bytes = out.excluded + tally.excluded, out.bytes + tally.bytes
        return out


def select(source: str, storage_options: dict | None, where: str | None,
           columns: list[str] | None = None) -> Selection:
    """The ok rows of the finished job at `source` that satisfy `where`, with their scores (see module docstring);
    of the manifest's own columns only `columns` (every one if None), with every carried input column."""
    storage = Storage(source, storage_options)
    if read_success(storage) is None:
        raise InputError(f"SOURCE={source!r}: not a finished job output (no {SUCCESS_KEY}); export reads a finished "
                         "job's rows: run or resume that job first")
    ok = _ok_rows(storage, None if columns is None else _to_read(storage, columns, where))
    carried = [name for name in ok.column_names if name not in MANIFEST.names]
    joined, metrics = _with_scores(storage, ok, carried)
    try:
        kept = _filter(joined, where)
    except InputError:
        if columns is None:
            raise
        return select(source, storage_options, where)  # refused (or taken) as over every column, word for word
    variants = _tallies(joined, kept)
    selected = joined if len(kept) == joined.num_rows else joined.take(kept)  # kept is in order: all is the table
    if columns is not None:
        selected = selected.select([n for n in selected.column_names if n in columns or n not in MANIFEST.names])
    return Selection(selected, metrics, carried, variants)


def _ok_rows(storage: Storage, columns: list[str] | None) -> pa.Table:
    manifest = read_manifest(storage, columns)
    ok = pc.fill_null(pc.equal(manifest["status"], "ok"), False)
    return manifest if pc.all(ok).as_py() else manifest.filter(ok)  # all ok: no copy of every row


def _to_read(storage: Storage, columns: list[str], where: str | None) -> list[str] | None:
    """The manifest columns an export reads: `columns`, those the selection itself needs, every carried input column
    and every column `where` may name (its text holds the name); None, every column, when `where` may name columns
    without spelling them (`*`, `COLUMNS(...)`, `#n`) or the parts' schemas cannot be read."""
    try:
        carried = {}
        for key in storage.list(MANIFEST_DIR):
            if key.endswith(".parquet"):
                # Whole parts through Storage (its retries): a compacted manifest is a few parts.
                schema = pq.read_schema(pa.BufferReader(storage.get_bytes(key)))
                carried.update((n, None) for n in schema.names if n not in MANIFEST.names)
    except FileNotFoundError:  # a part compacted away meanwhile: read_manifest's own retry reads every column
        return None
    text = (where or "").lower()
    if any(mark in text for mark in ("*", "#", "columns")):
        return None
    named = [n for n in MANIFEST.names if n.lower() in text or n.lower().replace('"', '""') in text]
    wanted = {*columns, *_OWN, *named}
    return [*(n for n in MANIFEST.names if n in wanted), *carried]


def _with_scores(storage: Storage, ok: pa.Table, carried: list[str]) -> tuple[pa.Table, list[str]]:
    """`ok` with one column per metric of the source's scores table, matched on (id, sha256 = video_sha256)."""
    if not storage.holds(SCORES_DIR):
        return ok, []
    scores = read_scores(storage.under(SCORES_DIR))
    metrics = metric_columns(scores.drop_columns(["score_error", "video", "scored_at"]))
    clash = sorted(set(metrics) & set(carried))
    if clash:
        raise InputError(f"score columns {clash} have the names of input columns the manifest carries: rename "
                         "those input columns to export both")
    keys = pa.table({"id": ok["id"], "sha256": ok["sha256"],
                     _POS: pa.array(range(ok.num_rows), pa.int64())})
    matched = keys.join(scores.select(["id", "video_sha256", *metrics]), ["id", "sha256"],
                        right_keys=["id", "video_sha256"], join_type="left outer").sort_by(_POS)
    for name in metrics:
        ok = ok.append_column(name, matched[name])
    return ok, metrics


def _filter(table: pa.Table, where: str | None) -> pa.Array:
    """The positions of the rows `where` keeps, in order; InputError naming the problem in one line."""
    positions = pa.array(range(table.num_rows), pa.int64())
    if where is None or not where.strip():
        return positions
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        relation = con.from_arrow(table.append_column(_POS, positions))
        kept = relation.filter(where).project(_POS).fetch_arrow_table()[_POS]
    except duckdb.Error as exc:
        raise InputError(f"--where={where!r}: {_one_line(exc)}") from None
    finally:
        con.close()
    kept = kept.combine_chunks()
    return kept.take(pc.sort_indices(kept))


def _one_line(exc: Exception) -> str:
    """DuckDB's message up to its echo of the query (`LINE 1: ...`), on one line."""
    lines = []
    for line in str(exc).splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


def variant_of(sweep: str | None) -> str:
    """A row's sweep variant for the counts: its cell's axis values but the seed, as compact JSON."""
    if not sweep:
        return NO_SWEEP
    cell = {k: v for k, v in json.loads(sweep).items() if k != "seed"}
    return json.dumps(cell, sort_keys=True, separators=(",", ":"))


def _tallies(joined: pa.Table, kept: pa.Array) -> dict[str, Tally]:
    """Counted per distinct sweep cell (a sweep has few), then summed by variant: no Python object per row."""
    cells = pc.dictionary_encode(joined["sweep"].combine_chunks())
    names = [variant_of(cell) for cell in cells.dictionary.to_pylist()] + [NO_SWEEP]
    codes = pc.fill_null(cells.indices, len(names) - 1).to_numpy()
    positions = kept.to_numpy()
    picked = codes[positions]
    ok, passing = np.bincount(codes, minlength=len(names)), np.bincount(picked, minlength=len(names))
    sizes = np.zeros(len(names), np.int64)
    np.add.at(sizes, picked, pc.fill_null(joined["bytes"], 0).to_numpy()[positions])
    out: dict[str, Tally] = {}
    for i, name in enumerate(names):
        if ok[i]:
            tally = out.setdefault(name, Tally())
            tally.ok, tally.passing = tally.ok + int(ok[i]), tally.passing + int(passing[i])
            tally.excluded, tally.bytes = tally.excluded + int(ok[i] - passing[i]), tally.bytes + int(sizes[i])
    return dict(sorted(out.items()))


def format_dry_run(selection: Selection, source: str, dest: str, fmt: str) -> str:
    """What `--dry-run` prints: the counts per sweep variant and in all."""
    total = selection.total
    width = max([len("variant"), *(len(v) for v in selection.variants)])
    lines = [f"export {source} -> {dest} ({fmt}): nothing written (--dry-run)",
             f"{'variant':<{width}}  {'ok':>8}  {'passing':>8}  {'excluded':>8}  {'bytes':>14}"]
    for name, tally in selection.variants.items():
        lines.append(f"{name:<{width}}  {tally.ok:>8}  {tally.passing:>8}  {tally.excluded:>8}  {tally.bytes:>14}")
    lines.append(f"{'all':<{width}}  {total.ok:>8}  {total.passing:>8}  {total.excluded:>8}  {total.bytes:>14}")
    lines.append(f"ok rows: {total.ok}; passing: {total.passing}; excluded by the condition: {total.excluded}; "
                 f"bytes: {total.bytes} ({total.bytes / 1e6:.1f} MB)")
    return "\n".join(lines)
