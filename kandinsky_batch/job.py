"""One render job, start to finish: the single `run` path behind the CLI, `python -m`, `ray job submit`
and the tests."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

from kandinsky_batch.fleet import autoscale, cluster, inprocess
from kandinsky_batch.config.schema import JobConfig
from kandinsky_batch.config.load import to_dict
from kandinsky_batch.intake.windows import Intake
from kandinsky_batch.interrupt import Interrupted, StopSignals
from kandinsky_batch.output.finalize import finalize
from kandinsky_batch.output.manifest import ManifestWriter
from kandinsky_batch.output.success import versions, write_success
from kandinsky_batch.progress import Progress, checking, loading
from kandinsky_batch.intake.preflight import Lane, preflight, probe_storage
from kandinsky_batch.errors import ConfigError
from kandinsky_batch.output import lease as leases
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.fleet.scheduler import WorkQueue
from kandinsky_batch.fleet.slot import Pool
from kandinsky_batch.output.layout import OBJECT_DIRS
from kandinsky_batch.fleet.worker import WorkerSpec
from kandinsky_batch.fleet.score_worker import FUSED
from kandinsky_batch.score import FusedScores
from pipelines.resolve import pinned
from pipelines import quiet_progress

MAX_REASONS = 10_000  # distinct errors counted for the most common one: bounded when every row's error differs
STOP_INTAKE_SECONDS = 0.5
"""On a signal, how long to wait for the front end to finish the window it is on (it is abandoned after): `ray job
stop` sends SIGKILL 3 s after its SIGTERM (`RAY_JOB_STOP_WAIT_TIME_S`, ray/dashboard/modules/job/job_supervisor.py,
`JobSupervisor.run`), and the line saying what was kept and the lease's release must come before it."""


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
    storage_retries: int = 0
    """Storage operations tried again after a throttle (503 SlowDown) or a dropped connection: replicas' and driver's."""
    restarts: int = 0
    drains: int = 0
    """Replicas retired because Ray drained their node (preemption): not failures, not in `restarts`."""
    drained: int = 0
    """Rows handed back to the queue by those drains, no attempt counted (each rendered again elsewhere)."""
    model_loads: int = 0
    """Replicas that loaded a model (rebuilds and model switches included)."""
    switches: int = 0
    """Replicas torn down and reloaded as another model of a sweep once their own had no rows left."""
    seconds: float = 0.0
    drain_seconds: float = 0.0
    first_render_seconds: float | None = None
    """From `run` to the first batch handed to a replica (preflight, Ray start, model load included)."""
    workers: list = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    """This run's invalid and failed rows by their first reason (not written to `_SUCCESS`)."""

    @property
    def top_reason(self) -> str | None:
        return self.reasons.most_common(1)[0][0] if self.reasons else None

    @property
    def top_count(self) -> int:
        return self.reasons.most_common(1)[0][1] if self.reasons else 0


@contextmanager
def _on_interrupt(handler):
    """Call `handler(exc)` on `Interrupted` from the block, then let it go on."""
    try:
        yield
    except Interrupted as exc:
        handler(exc)
        raise


def _pool(cfg: JobConfig, lane: Lane, placement: cluster.Placement, lanes: int, transport=cluster) -> Pool:
    """The work queue's pool of one model's replica group: its replicas load that model."""
    spec = WorkerSpec(
        model_path=pinned(lane.model.path, lane.model.revision), output_uri=cfg.output.uri, stamp=lane.stamp,
        model_storage_options=lane.model.storage_options, output_storage_options=cfg.output.storage_options,
        input_storage_options=cfg.input.storage_options,
        retries=cfg.output.retries, retry_backoff=cfg.output.retry_backoff,
        score=tuple(cfg.score.metrics), score_weights=tuple(sorted(cfg.score.weights.items())),
    )
    name = Intake.pool_name(lane, placement.group.name, lanes)
    return Pool(name, transport.spawner(placement, spec, name), group=placement.group.name,
                ranks=placement.parallel.world_size, stamp=lane.stamp)


def run(cfg: JobConfig, force: bool = False, progress: bool = True, verbose: bool = False,
        transport=None) -> JobResult:
    """Render every row of `cfg.input` that is not already committed under `cfg.output.uri`.

    `verbose` keeps Ray's start-up warnings and the model libraries' progress bars on the console.
    `transport`: where the replicas run, `cluster` (Ray) or `inprocess`; None: as `cluster.address` says.
    SIGINT/SIGTERM stop it within seconds (`Interrupted`, raised once what was committed is published)."""
    with StopSignals() as stop:
        return _run(cfg, force, progress, verbose, stop, transport or inprocess.transport(cfg.cluster))


def _run(cfg: JobConfig, force: bool, progress: bool, verbose: bool, stop: StopSignals, transport) -> JobResult:
    started, started_clock = time.perf_counter(), time.monotonic()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if not verbose:
        quiet_progress()  # the tiny presets are built (and saved) here, in the driver, by the preflight

    # 1. Preflight: config, dataset, sweep, each model's limits and options, ids and resume conflicts, before Ray;
    # a job running on the output prefix is named at once, before the rest is read.
    with checking(progress), stop.abortable():  # it only reads: a signal ends it at once
        probe_storage("output.uri", cfg.output.uri, cfg.output.storage_options, ConfigError)
        owner = Storage(cfg.output.uri, cfg.output.storage_options, retries=cfg.output.retries,
                        backoff=cfg.output.retry_backoff)
        before = leases.read(owner)
        leases.judge(owner, before, cfg.output.lease_ttl)
        checked = preflight(cfg, force=force)
    # 2. One job per output prefix: the lease, taken once the job is known to be runnable (a refusal writes
    # nothing). If another job held the prefix since it was read, the preflight reads it again, under the lease.
    lease = leases.Lease.acquire(owner, run_id, cfg.output.lease_ttl).start()
    try:
        if lease.took_over is not None:
            print(f"note: took over the lease of {lease.took_over.state.names()} on {cfg.output.uri}: "
                  f"{lease.took_over.why}", file=sys.stderr)
        if not lease.follows(before):
            with checking(progress), stop.abortable():
                checked = preflight(cfg, force=force)
        return _leased(cfg, checked, lease, run_id, started, started_clock, progress, verbose, stop, transport)
    finally:
        lease.release()  # not if another job took it over: that one holds it now


def _leased(cfg: JobConfig, checked, lease: leases.Lease, run_id: str, started: float, started_clock: float,
            progress: bool, verbose: bool, stop: StopSignals, transport) -> JobResult:
    """The job under its lease: every commit, flush and `_SUCCESS` only while `lease.held()`."""
    storage = checked.storage
    for folder in OBJECT_DIRS:
        storage.cleanup_temp(folder)
    cells = len(checked.sweep.cells) * len(checked.lanes)
    result = JobResult(rows=checked.dataset.num_rows * cells, input_rows=checked.dataset.num_rows)

    # 3. Stream the rows (a sweep's cells): invalid and adopted ones are committed as they are read, the rest
    # queue for replicas. Parts are published every few seconds, so a killed driver loses at most the rows in flight.
    writer = ManifestWriter(storage, run_id, flush_rows=4096, flush_seconds=5.0, schema=checked.manifest_schema)
    fused = FusedScores(cfg, run_id) if cfg.score.metrics else None  # each video scored as it is committed
    bar = Progress(result.rows, run_id, progress)
    lease.progress["rows_total"] = result.rows  # its heartbeat is what `kandinsky-batch status` reads

    sealed, settling = threading.Event(), threading.Lock()

    def commit(row: dict) -> None:
        with settling:
            if sealed.is_set() or not lease.held():
                # Stopped on a signal and published, or the lease is gone: a front end still running is ignored,
                # a re-run derives it (a row's object, if any, is adopted).
                return
            scored = row.pop(FUSED, None)
            writer.add({**row, "finished_at": datetime.now(timezone.utc)})
            if scored is not None:
                fused.add(scored)
            bar.settled(row["status"])
            if row["status"] != "ok" and row.get("error"):
                reason = row["error"].split("; ")[0]
                if reason in result.reasons or len(result.reasons) < MAX_REASONS:
                    result.reasons[reason] += 1

    intake = Intake(checked.dataset, checked.lanes, checked.sweep, cfg.render.seed, commit).start()

    def stopped(exc: Interrupted) -> None:
        """Publish what landed, count it for the CLI's line and release the lease, before Ray shuts down: all of
        it inside `ray job stop`'s window. Once is enough (Ray's exit re-raises the same error)."""
        if sealed.is_set():
            return
        intake.close(STOP_INTAKE_SECONDS)
        with settling:
            sealed.set()
        if lease.held():
            if fused:
                fused.writer.flush()
            writer.flush()
        exc.committed = sum(bar.counts[s] for s in ("ok", "failed", "invalid"))
        exc.in_output = checked.state.committed + bar.counts["ok"]
        lease.release()  # no job runs here any more: `status` says incomplete, not stale

    try:
        # 4. Render on the replicas (Ray's, or threads of this process), if anything is left to render; the fleet
        # follows the cluster's GPUs and is shared by the models of a sweep.
        with stop.abortable():
            anything = intake.wait_first()
        if anything:
            with transport.connect(cfg.cluster, *(lane.cluster for lane in checked.lanes), verbose=verbose,
                                   phase=bar.phase), _on_interrupt(stopped):  # exits first: before Ray's shutdown
                stop.install()  # ray.init took SIGTERM over
                stop.check()
                placed = [(_pool(cfg, lane, placement, len(checked.lanes), transport), placement)
                          for lane in checked.lanes for placement in transport.plan(lane.cluster)]
                pools = [pool for pool, _ in placed]
                # The autoscaler is asked for what the remaining work can use, a bundle per replica's gang.
                scaler = autoscale.for_job(cfg.cluster, {pool.name: autoscale.gang_bundle(
                    pool.ranks, placement.num_gpus, placement.num_cpus) for pool, placement in placed},
                    cfg.render.batch_size, run_id)
                gangs = {p.group: max(q.ranks for q in pools if q.group == p.group) for p in pools}
                fleet = transport.Fleet(cfg.cluster, gangs)
                names = [lane.label for lane in checked.lanes] if len(checked.lanes) > 1 else [cfg.model.path]
                replicas = sum(units // gangs.get(group, 1) for group, units in fleet.capacity().items())
                bar.phase(loading(names, replicas))
                queue = WorkQueue(
                    pools, fleet, intake, max_attempts=cfg.cluster.max_attempts,
                    on_row=commit, wait=transport.wait, get=transport.get, batch_size=cfg.render.batch_size,
                    no_replica_timeout=cfg.cluster.no_replica_timeout,
                    on_tick=lambda q: (lease.held() and fused and fused.writer.flush_if_due(),
                                       lease.held() and writer.flush_if_due(), bar.update(intake, q),
                                       lease.progress.update(rows_settled=sum(bar.counts.values())), scaler(q)),
                    should_stop=lambda: stop.requested or not lease.held(), draining=transport.draining,
                )
                try:
                    queue.run()
                finally:
                    scaler.close()  # this job's ask withdrawn, every other job's kept
                if queue.stopped:
                    stop.check()
                    lease.check()
                if queue.first_dispatch is not None:
                    result.first_render_seconds = queue.first_dispatch - started_clock
                result.retries, result.restarts, result.workers = queue.retries, queue.restarts, queue.workers
                result.drains, result.drained = queue.drains.drains, queue.drains.drained
                result.storage_retries += queue.storage_retries
                result.switches, result.model_loads = queue.switches, len(queue.workers)
                result.drain_seconds = queue.drain_seconds
    except Interrupted as exc:
        stopped(exc)
        raise
    finally:
        # Whatever stopped the job, publish what landed (while the lease is held): a re-run continues from it.
        if not sealed.is_set():
            intake.close(STOP_INTAKE_SECONDS if stop.requested else None)
        if fused and lease.held():
            fused.writer.flush()
        if lease.held():
            writer.flush()
        bar.update(intake)
        bar.bar.close()

    # 5. Every input row has its final manifest row: compact the parts, then write _SUCCESS last.
    intake.check()
    lease.check()
    rendered, invalid = intake.keys()
    final = finalize(storage, run_id, rendered, invalid)
    counts = final.counts
    result.ok, result.failed, result.invalid = counts.get("ok", 0), counts.get("failed", 0), counts.get("invalid", 0)
    result.kept = sum(final.kept.values())
    result.skipped, result.adopted = intake.counts.skipped, intake.counts.adopted
    result.rendered = bar.counts["ok"] + bar.counts["failed"] - intake.counts.adopted
    result.seconds = time.perf_counter() - started
    if fused:
        fused.finish(result.workers)
    lease.check()
    result.storage_retries += storage.take_retries()  # the driver's: manifest parts, compaction, heartbeat
    write_success(storage, {
        "run_id": run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
        "counts": {k: v for k, v in result.__dict__.items() if k not in ("workers", "reasons")},
        "workers": result.workers, "model": cfg.model.path, "config": to_dict(cfg), "versions": versions(),
        "sweep": {"axes": checked.sweep.axes, "cells_per_row": cells,
                  "models": {lane.label: lane.model.path for lane in checked.lanes}} if checked.sweep.active else None,
    })
    return result
