"""`kandinsky-batch status OUTPUT_URI`: how far the job writing there has come, read from the output alone.

Rows ok / invalid / failed so far from the manifest parts (the latest row per (id, row_index), as
`manifest.read_manifest` resolves them, narrow columns only), whether a job is running from its lease's heartbeat
(`kandinsky_batch.output.lease`), its rate over the rows it rendered itself and the ETA of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.output import lease
from kandinsky_batch.output.manifest import STATUSES, read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.storage import Storage

COLUMNS = ["id", "row_index", "status", "finished_at", "worker"]


@dataclass
class Status:
    state: str
    """`running`, `stale` (a lease whose heartbeat is older than its ttl), `finished`, `incomplete` (parts, no live
    lease, no _SUCCESS) or `not started`."""
    rows: dict = field(default_factory=dict)
    """Rows per status so far (ok, invalid, failed)."""
    run_id: str | None = None
    host: str | None = None
    pid: int | None = None
    heartbeat_age_seconds: float | None = None
    finished_at: str | None = None
    rows_total: int | None = None
    rows_settled: int | None = None
    rate_per_minute: float | None = None
    """Rows the running job rendered (ok or failed, not adopted) per minute, from their `finished_at`."""
    eta_seconds: float | None = None


def _rate(table, since: datetime) -> float | None:
    """Rows per minute among the rows rendered since `since`, first to last commit."""
    rendered = table.filter(pc.and_(pc.is_in(table["status"], pa.array(["ok", "failed"])),
                                    pc.not_equal(pc.fill_null(table["worker"], ""), "adopted")))
    rendered = rendered.filter(pc.greater_equal(rendered["finished_at"], since))
    if rendered.num_rows < 2:
        return None
    first, last = pc.min(rendered["finished_at"]).as_py(), pc.max(rendered["finished_at"]).as_py()
    span = (last - first).total_seconds()
    return (rendered.num_rows - 1) * 60 / span if span > 0 else None


def status(uri: str, storage_options: dict | None = None, now: datetime | None = None) -> Status:
    """Where the job writing to `uri` stands (reads only)."""
    now = now or datetime.now(timezone.utc)
    storage = Storage(uri, storage_options)
    table = read_manifest(storage, COLUMNS)
    counts = dict.fromkeys(STATUSES, 0)
    if table.num_rows:
        counted = pc.value_counts(table["status"])
        for value, n in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()):
            counts[value] = n
    held, success = lease.read(storage), read_success(storage)
    finished = success.get("finished_at") if success else None
    beat = (held.beat or held.holder) if held.live else None
    if beat is not None:
        # The holder's own clock against ours: `status` only reads, so it cannot probe the store's clock as a
        # contender does (`lease.judge`); a display, never a decision.
        updated = beat.get("updated_at") or beat.get("started_at")
        age = (now - datetime.fromisoformat(updated)).total_seconds()
        alive = age < held.ttl and not lease.gone(held.holder or {})
        result = Status("running" if alive else "stale", counts, beat.get("run_id"), beat.get("host"),
                        beat.get("pid"), age, rows_total=beat.get("rows_total"), rows_settled=beat.get("rows_settled"))
        if result.state == "running" and result.rows_total is not None:
            result.rate_per_minute = _rate(table, datetime.fromisoformat(beat["started_at"]))
            left = result.rows_total - (result.rows_settled or 0)
            if result.rate_per_minute:
                result.eta_seconds = left * 60 / result.rate_per_minute
        return result
    if success is not None:
        return Status("finished", counts, success.get("run_id"), finished_at=finished)
    return Status("incomplete" if table.num_rows else "not started", counts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def format_status(s: Status) -> str:
    """The lines `status` prints."""
    if s.state == "running":
        head = f"running ({s.run_id}, {s.host}:{s.pid}, updated {s.heartbeat_age_seconds:.0f}s ago)"
    elif s.state == "stale":
        head = f"stale: last heartbeat {s.heartbeat_age_seconds:.0f}s ago (the job died? re-run to resume)"
    elif s.state == "finished":
        head = f"finished at {s.finished_at} ({s.run_id})"
    elif s.state == "incomplete":
        head = "incomplete: manifest rows but no running job and no _SUCCESS (a job stopped early? re-run to resume)"
    else:
        head = "not started"
    lines = [head, "rows: " + ", ".join(f"{n} {k}" for k, n in s.rows.items())]
    if s.rows_total is not None:
        lines.append(f"progress: {s.rows_settled} of {s.rows_total} rows settled (heartbeat)")
    if s.state == "running":
        rate = "—" if s.rate_per_minute is None else f"{s.rate_per_minute:.1f} rows/min"
        eta = "—" if s.eta_seconds is None else _duration(s.eta_seconds)
        lines.append(f"rate: {rate}, ETA: {eta}")
    return "\n".join(lines)
