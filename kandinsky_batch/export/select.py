"""Which rows an export takes: a finished job's ok rows joined with their scores, filtered by `--where` in DuckDB.

The condition is a relation filter over one table (manifest columns, then score columns), never text pasted into a
query, and DuckDB runs it with file and network access off and its configuration locked: it can neither read
nor write anything but that table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.errors import InputError
from kandinsky_batch.output.layout import SCORES_DIR, SUCCESS_KEY
from kandinsky_batch.output.manifest import SCHEMA as MANIFEST
from kandinsky_batch.output.manifest import read_manifest, read_success
from kandinsky_batch.output.scores import metric_columns, read_scores
from kandinsky_batch.output.storage import Storage

_POS = "__export_position"
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

    @property
    def total(self) -> Tally:
        """The counts over every variant."""
        out = Tally()
        for tally in self.variants.values():
            out.ok, out.passing = out.ok + tally.ok, out.passing + tally.passing
            out.excluded, out.bytes = out.excluded + tally.excluded, out.bytes + tally.bytes
        return out


def select(source: str, storage_options: dict | None, where: str | None) -> Selection:
    """The ok rows of the finished job at `source` that satisfy `where`, with their scores (see module docstring)."""
    storage = Storage(source, storage_options)
    if read_success(storage) is None:
        raise InputError(f"SOURCE={source!r}: not a finished job output (no {SUCCESS_KEY}); export reads a finished "
                         "job's rows: run or resume that job first")
    manifest = read_manifest(storage)
    ok = manifest.filter(pc.equal(manifest["status"], "ok"))
    carried = [name for name in ok.column_names if name not in MANIFEST.names]
    joined, metrics = _with_scores(storage, ok, carried)
    kept = _filter(joined, where)
    selected = joined.take(kept)
    return Selection(selected, metrics, carried, _tallies(joined, kept))


def _with_scores(storage: Storage, ok: pa.Table, carried: list[str]) -> tuple[pa.Table, list[str]]:
    """`ok` with one column per metric of the source's scores table, matched on (id, sha256 = video_sha256)."""
    if not storage.fs.isdir(f"{storage.root}/{SCORES_DIR}"):
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
    keep = set(kept.to_pylist())
    out: dict[str, Tally] = {}
    sizes = joined["bytes"].to_pylist()
    for i, sweep in enumerate(joined["sweep"].to_pylist()):
        tally = out.setdefault(variant_of(sweep), Tally())
        tally.ok += 1
        if i in keep:
            tally.passing += 1
            tally.bytes += sizes[i] or 0
        else:
            tally.excluded += 1
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
