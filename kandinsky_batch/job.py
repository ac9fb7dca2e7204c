"""One render job, start to finish: the single `run` path behind the CLI, `python -m`, `ray job submit`
and the tests."""

from __future__ import annotations

import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from tqdm import tqdm

from kandinsky_batch import cluster, inprocess
from kandinsky_batch.config import JobConfig, to_dict
from kandinsky_batch.heartbeat import Heartbeat
from kandinsky_batch.intake import Intake
from kandinsky_batch.manifest import ManifestWriter, finalize, write_success
from kandinsky_batch.metrics import JobMetrics
from kandinsky_batch.preflight import Lane, preflight
from kandinsky_batch.scheduler import Pool, WorkQueue
from kandinsky_batch.storage import OBJECT_DIRS
from kandinsky_batch.worker import WorkerSpec
from pipelines.models import pinned

LIBRARIES = ("torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "av")
METRICS_SECONDS = 2.0


@dataclass
class JobResult:
    """What a finished job did; the same counts land in `_SUCCESS`."""

    rows: int
    """Manifest rows: input rows x sweep cells (input rows without a sweep)."""
    input_rows: int = 0
    ok: int = 0
    invalid: int = 0
    failed: int = 0
    skipped: int = 0
    adopted: int = 0
    rendered: int = 0
    kept: int = 0
    """Rows of ids this run's input does not hold (an earlier run's other dataset), kept in the manifest as they were."""
    retries: int = 0
    restarts: int = 0
    model_loads: int = 0
    """Replicas that loaded a model (rebuilds and model switches included)."""
    switches: int = 0
    """Replicas torn down and reloaded as another model of a sweep once their own had no rows left."""
    seconds: float = 0.0
    drain_seconds: float = 0.0
    first_render_seconds: float | None = None
    """From `run` to the first batch handed to a replica (preflight, Ray start, model load included)."""
    workers: list = field(default_factory=list)


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class _Progress:
    """The progress bar and the live metrics, fed from the manifest rows as they are committed."""

    def __init__(self, total: int, run_id: str, enabled: bool):
        self.bar = tqdm(total=total, unit="row", disable=not enabled, desc="render",
                        mininterval=0.5 if sys.stderr.isatty() else 10)
        self.metrics = JobMetrics(run_id)
        self.counts = {"ok": 0, "failed": 0, "invalid": 0, "skipped": 0}
        self._next_metrics = 0.0

    def settled(self, status: str) -> None:
        self.counts[status] += 1
        self.metrics.settled(status)

    def update(self, intake: Intake, queue: WorkQueue | None = None) -> None:
        self.counts["skipped"] = intake.counts.skipped
        done = sum(self.counts.values())
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(failed=self.counts["failed"], invalid=self.counts["invalid"], refresh=False)
        now = time.monotonic()
        if queue is not None and now >= self._next_metrics:
            self._next_metrics = now + METRICS_SECONDS
            self.metrics.queued(queue.queued())
            for slot in queue.slots:
                if slot.info:
                    self.metrics.busy(slot.info["worker"], slot.busy_fraction(now))
            self.metrics.tick()


def _pool(cfg: JobConfig, lane: Lane, placement: cluster.Placement, lanes: int, transport=cluster) -> Pool:
    """The work queue's pool of one model's replica group: its replicas load that model."""
    spec = WorkerSpec(
        model_path=pinned(lane.model.path, lane.model.revision), output_uri=cfg.output.uri, stamp=lane.stamp,
        model_storage_options=lane.model.storage_options, output_storage_options=cfg.output.storage_options,
        input_storage_options=cfg.input.storage_options,
        retries=cfg.output.retries, retry_backoff=cfg.output.retry_backoff,
    )
    name = Intake.pool_name(lane, placement.group.name, lanes)
    return Pool(name, transport.spawner(placement, spec, name), group=placement.group.name,
                ranks=placement.parallel.world_size, stamp=lane.stamp)


def run(cfg: JobConfig, force: bool = False, progress: bool = True, transport=None) -> JobResult:
    """Render every row of `cfg.input` that is not already committed under `cfg.output.uri`.

    `transport`: where the replicas run, `cluster` (Ray) or `inprocess`; None: as `cluster.address` says."""
    transport = transport or inprocess.transport(cfg.cluster)
    started, started_clock = time.perf_counter(), time.monotonic()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    # 1. Preflight: config, dataset, sweep, each model's limits and options, ids and resume conflicts, before Ray.
    checked = preflight(cfg, force=force)
    storage = checked.storage
    for folder in OBJECT_DIRS:
        storage.cleanup_temp(folder)
    cells = len(checked.sweep.cells) * len(checked.lanes)
    result = JobResult(rows=checked.dataset.num_rows * cells, input_rows=checked.dataset.num_rows)

    # 2. Stream the rows (a sweep's cells): invalid and adopted ones are committed as they are read, the rest
    # queue for replicas. Parts are published every few seconds, so a killed driver loses at most the rows in flight.
    writer = ManifestWriter(storage, run_id, flush_rows=4096, flush_seconds=5.0, schema=checked.manifest_schema)
    bar = _Progress(result.rows, run_id, progress)
    heartbeat = Heartbeat(storage, run_id, result.rows).start()  # for `kandinsky-batch status`

    def commit(row: dict) -> None:
        writer.add({**row, "finished_at": datetime.now(timezone.utc)})
        bar.settled(row["status"])

    intake = Intake(checked.dataset, checked.lanes, checked.sweep, cfg.render.seed, commit).start()
    try:
        # 3. Render on the replicas (Ray's, or threads of this process), if anything is left to render; the fleet
        # follows the cluster's GPUs and is shared by the models of a sweep.
        if intake.wait_first():
            with transport.connect(cfg.cluster, *(lane.cluster for lane in checked.lanes)):
                pools = [_pool(cfg, lane, placement, len(checked.lanes), transport)
                         for lane in checked.lanes for placement in transport.plan(lane.cluster)]
                gangs = {p.group: max(q.ranks for q in pools if q.group == p.group) for p in pools}
                queue = WorkQueue(
                    pools, transport.Fleet(cfg.cluster, gangs), intake, max_attempts=cfg.cluster.max_attempts,
                    on_row=commit, wait=transport.wait, get=transport.get, batch_size=cfg.render.batch_size,
                    no_replica_timeout=cfg.cluster.no_replica_timeout,
                    on_tick=lambda q: (writer.flush_if_due(), bar.update(intake, q),
                                       heartbeat.beat(sum(bar.counts.values()))),
                )
                queue.run()
                if queue.first_dispatch is not None:
                    result.first_render_seconds = queue.first_dispatch - started_clock
                result.retries, result.restarts, result.workers = queue.retries, queue.restarts, queue.workers
                result.switches, result.model_loads = queue.switches, len(queue.workers)
                result.drain_seconds = queue.drain_seconds
    finally:
        # Whatever stopped the job, publish what landed: a re-run continues from it.
        intake.close()
        writer.flush()
        bar.update(intake)
        bar.bar.close()

    # 4. Every input row has its final manifest row: compact the parts, then write _SUCCESS last.
    intake.check()
    rendered, invalid = intake.keys()
    final = finalize(storage, run_id, rendered, invalid)
    counts = final.counts
    result.ok, result.failed, result.invalid = counts.get("ok", 0), counts.get("failed", 0), counts.get("invalid", 0)
    result.kept = sum(final.kept.values())
    result.skipped, result.adopted = intake.counts.skipped, intake.counts.adopted
    result.rendered = bar.counts["ok"] + bar.counts["failed"] - intake.counts.adopted
    result.seconds = time.perf_counter() - started
    write_success(storage, {
        "run_id": run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
        "counts": {k: v for k, v in result.__dict__.items() if k != "workers"},
        "workers": result.workers, "model": cfg.model.path, "config": to_dict(cfg), "versions": _versions(),
        "sweep": {"axes": checked.sweep.axes, "cells_per_row": cells,
                  "models": {lane.label: lane.model.path for lane in checked.lanes}} if checked.sweep.active else None,
    })
    heartbeat.stop()
    return result
