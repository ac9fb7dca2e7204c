"""`kandinsky-batch export`: a finished job's ok rows, filtered by their scores, written once in a training format.

1. select the rows (`select.py`), 2. make them samples (`samples.py`), 3. check the format takes them, 4. bind DEST
to the arguments (checked first) and plan the new samples into units (`plan.py`), 5. write the units not done yet (`execute.py`),
6. the index, the format's own metadata, and `_SUCCESS`, each replaced only when it changes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.errors import InputError
from kandinsky_batch.export import plan as plans
from kandinsky_batch.export.execute import write_units
from kandinsky_batch.export.formats import load_format
from kandinsky_batch.export.objects import replace
from kandinsky_batch.export.samples import CAPTIONS, MANIFEST_COLUMNS, Samples, sample_rows
from kandinsky_batch.export.select import Selection, format_dry_run, select
from kandinsky_batch.output.layout import SUCCESS_KEY
from kandinsky_batch.output.manifest import parquet_bytes
from kandinsky_batch.output.success import read_success, versions
from kandinsky_batch.output.storage import Storage

_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class ExportArgs:
    """What `export` was asked: the fields bound to DEST first, then where to read and write and how to run."""

    source: str
    to: str
    format: str
    where: str | None = None
    split: tuple[tuple[str, float], ...] = ()
    """Split names and their shares of the samples (`--split val=0.02`), the rest `train`."""
    caption: str = "prompt"
    shard_size: int | None = None
    shard_bytes: int | None = None
    storage_options: dict = field(default_factory=dict)
    address: str | None = None
    """Ray's address (None: a local loopback Ray; `inprocess`: threads of this process)."""

    def binding(self) -> dict:
        """The arguments DEST is bound to."""
        return {"format": self.format, "where": (self.where or "").strip() or None,
                "split": dict(self.split), "caption": self.caption, "shard_size": self.shard_size,
                "shard_bytes": self.shard_bytes}

    def check(self) -> None:
        """Each option's rule, before anything is read; InputError naming the option and the value."""
        if self.caption not in CAPTIONS:
            raise InputError(f"--caption={self.caption!r}: one of {list(CAPTIONS)}")
        for name, share in self.split:
            if not _SPLIT_NAME.fullmatch(name) or name == DEFAULT_SPLIT:
                raise InputError(f"--split {name}={share}: a split name is lowercase [a-z0-9_], not {DEFAULT_SPLIT!r} "
                                 "(the rest)")
            if not 0 < share < 1:
                raise InputError(f"--split {name}={share}: a share in (0, 1)")
        if sum(share for _, share in self.split) >= 1:
            raise InputError(f"--split {dict(self.split)}: the shares add to 1 or more, leaving no {DEFAULT_SPLIT}")
        for option, value in (("--shard-size", self.shard_size), ("--shard-bytes", self.shard_bytes)):
            if value is not None and value < 1:
                raise InputError(f"{option}={value}: must be >= 1")


def parse_split(text: str | None) -> tuple[tuple[str, float], ...]:
    """`val=0.02,test=0.01` as ((name, share), ...); InputError naming a malformed item."""
    out = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, share = item.partition("=")
        try:
            out.append((name.strip(), float(share)))
        except ValueError:
            raise InputError(f"--split {item.strip()!r}: expected NAME=SHARE, e.g. val=0.02") from None
        if not sep:
            raise InputError(f"--split {item.strip()!r}: expected NAME=SHARE, e.g. val=0.02")
    return tuple(sorted(out))


@dataclass
class ExportResult:
    """What one `export` run found and did."""

    selection: Selection
    """The counts; its rows are dropped once they are samples (a dry run keeps them)."""
    dest: str = ""
    samples: int = 0
    planned: int = 0
    units: int = 0
    written: int = 0
    splits: dict = field(default_factory=dict)
    seconds: float = 0.0
    dry_run: bool = False


def run(args: ExportArgs, dry_run: bool = False) -> ExportResult:
    """Export `args.source` to `args.to` (see module docstring); with `dry_run`, only count."""
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    args.check()
    fmt = load_format(args.format)
    dest, source = Storage(args.to, args.storage_options), Storage(args.source, args.storage_options)
    bound = plans.bind(dest, args.binding())
    # 1-2. The rows and their samples: every refusal comes before anything is written.
    selection = select(args.source, args.storage_options, args.where, MANIFEST_COLUMNS)
    candidates = sample_rows(selection, args.caption, dict(args.split))
    if dry_run:
        return ExportResult(selection, args.to, samples=candidates.num_rows, dry_run=True)
    result = ExportResult(selection.counts(), args.to, samples=candidates.num_rows)
    del selection  # its rows live on as the samples: the driver holds one copy of them
    # 3-4. The format's checks, DEST's binding, then the plan of the samples it lacks.
    dest.cleanup_temp()  # a killed run's partial writes: its units are re-run whole
    planned = plans.read_plan(dest)
    new = plans.plan_new(planned, candidates, fmt.SHARDED, args.shard_size, args.shard_bytes)
    checked = Samples(candidates)
    fmt.check(checked)
    if not bound:
        plans.record_arguments(dest, args.binding())
    plans.record_plan(dest, new)
    result.planned = new.num_rows
    plan = pa.concat_tables([planned, new]) if new.num_rows else planned  # the parts as read_plan reads them
    # A first plan is the candidates in their order: the format's finish reads the samples its check did.
    samples = checked if not planned.num_rows else Samples(plan)
    del candidates, checked, new
    # 5. The units not done, one task each.
    names = set(pc.unique(plan["unit"]).to_pylist())
    pending = names - plans.done_units(dest)
    result.units = len(names)
    result.written = write_units(args.format, plans.units(plan, pending), source, dest, args.address)
    # 6. What a reader needs beside the units, replaced only when it changed.
    index = plans.read_index(dest, sorted(names))
    replace(dest, plans.INDEX_KEY, parquet_bytes(index))
    fmt.finish(dest, index, samples)
    result.splits = {row["values"]: row["counts"] for row in pc.value_counts(plan["split"]).to_pylist()}
    result.splits = dict(sorted(result.splits.items()))
    result.seconds = time.perf_counter() - started
    _record_success(dest, args, result, started_at)
    return result


def _record_success(dest: Storage, args: ExportArgs, result: ExportResult, started_at: datetime) -> None:
    """`_SUCCESS`: units, counts per split, arguments; rewritten only when more than its timestamps would change."""
    summary = {"source": args.source, "arguments": args.binding(), "units": result.units,
               "samples": sum(result.splits.values()), "splits": result.splits, "index": plans.INDEX_KEY}
    old = read_success(dest) or {}
    if {k: old.get(k) for k in summary} == summary:
        return
    summary.update(started_at=started_at.isoformat(), finished_at=datetime.now(timezone.utc).isoformat(),
                   written_this_run=result.written, planned_this_run=result.planned, versions=versions())
    dest.put_bytes(SUCCESS_KEY, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())


def format_result(result: ExportResult, args: ExportArgs) -> str:
    """The line (or, for a dry run, the table) the CLI prints."""
    if result.dry_run:
        return format_dry_run(result.selection, args.source, args.to, args.format)
    splits = ", ".join(f"{n} {name}" for name, n in result.splits.items()) or "none"
    return (f"done: {result.samples} samples selected ({result.selection.total.excluded} excluded by --where), "
            f"{result.planned} newly planned; {result.units} units ({result.written} written this run); "
            f"splits: {splits} in {result.seconds:.1f} s -> {args.to}")
