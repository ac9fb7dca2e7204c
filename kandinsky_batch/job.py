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

import pyarrow as pa
from tqdm import tqdm

from kandinsky_batch import cluster, resume
from kandinsky_batch.config import JobConfig, to_dict
from kandinsky_batch.dataset import read_table
from kandinsky_batch.manifest import ManifestWriter, compact, latest_outcomes, read_manifest, to_table, write_success
from kandinsky_batch.options import effective_options
from kandinsky_batch.rows import Task, build_tasks
from kandinsky_batch.routing import check_shapes, route
from kandinsky_batch.scheduler import Pool, WorkQueue
from kandinsky_batch.storage import Storage
from kandinsky_batch.worker import WorkerSpec
from pipelines import load_spec

LIBRARIES = ("torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "av")


@dataclass
class JobResult:
    """What a finished job did; the same counts land in `_SUCCESS`."""

    rows: int
    ok: int = 0
    invalid: int = 0
    failed: int = 0
    skipped: int = 0
    adopted: int = 0
    rendered: int = 0
    retries: int = 0
    restarts: int = 0
    seconds: float = 0.0
    drain_seconds: float = 0.0
    workers: list = field(default_factory=list)


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _stamp(row: dict, cfg: JobConfig) -> dict:
    """Complete a manifest row with the job-level effective values and the commit time."""
    return {"model": cfg.model.path, "format": cfg.output.format, "fps": cfg.render.fps, **row,
            "finished_at": datetime.now(timezone.utc)}


def _final_rows(storage: Storage, tasks: list[Task], invalid: list[dict]) -> pa.Table:
    """Exactly one manifest row per input row: this run's invalid rows, the latest outcome of the rest."""
    manifest = read_manifest(storage).to_pylist()
    latest = latest_outcomes(manifest)
    missing = [t.id for t in tasks if t.id not in latest]
    if missing:
        raise RuntimeError(f"rows without a final manifest row: ids {missing[:10]} ({len(missing)} in all)")
    rows = [{**latest[t.id], "row_index": t.row_index} for t in tasks]
    current = {(r["id"], r["row_index"]): r for r in manifest if r["status"] == "invalid"}
    rows += [current[(r["id"], r["row_index"])] for r in invalid]
    return to_table(sorted(rows, key=lambda r: r["row_index"]))


def run(cfg: JobConfig, force: bool = False, progress: bool = True) -> JobResult:
    """Render every row of `cfg.input` that is not already committed under `cfg.output.uri`."""
    started = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    # 1. Read the input and the model's limits; whole-input errors stop here, before Ray starts.
    table = read_table(cfg.input.path, cfg.input.storage_options)
    spec = load_spec(cfg.model.path, cfg.model.storage_options)
    options, spec = effective_options(cfg.model, spec)
    check_shapes(cfg.cluster, spec, options)
    tasks, invalid = build_tasks(table, cfg, spec)
    routed, unroutable = route(tasks, cfg.cluster)
    if unroutable:
        invalid = sorted(invalid + unroutable, key=lambda r: r["row_index"])
        tasks = [t for ts in routed.values() for t in ts]
    result = JobResult(rows=table.num_rows, invalid=len(invalid))

    # 2. Look at what the output prefix already holds: skip committed rows, adopt orphans.
    storage = Storage(cfg.output.uri, cfg.output.storage_options, retries=cfg.output.retries,
                      backoff=cfg.output.retry_backoff)
    storage.cleanup_temp("videos")
    plan = resume.plan(storage, tasks, cfg, options, force=force)
    result.skipped, result.adopted = len(plan.done), len(plan.adopted)

    # 3. Commit what needs no GPU: invalid rows and adopted videos.
    # Parts are published every few seconds, so a killed driver loses at most the rows in flight.
    writer = ManifestWriter(storage, run_id, flush_seconds=5.0)
    for row in invalid + plan.adopted:
        writer.add(_stamp(row, cfg))
    writer.flush()

    # 4. Render the rest on Ray replicas (each row on its group's), committing manifest rows as they land.
    routed_set = {name: {t.id for t in ts} for name, ts in routed.items()}
    bar = tqdm(total=table.num_rows, initial=len(invalid) + len(plan.done) + len(plan.adopted),
               unit="row", disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 10,
               desc="render")
    counts = {"ok": 0, "failed": 0}

    def on_row(row: dict) -> None:
        writer.add(_stamp(row, cfg))
        counts[row["status"]] += 1
        bar.update(1)
        bar.set_postfix(failed=counts["failed"], invalid=len(invalid), refresh=False)

    todo = sorted(plan.todo, key=lambda t: -t.cost())  # longest first shortens the tail
    try:
        if todo:
            with cluster.connect(cfg.cluster):
                worker_spec = WorkerSpec(
                    model_path=cfg.model.path, output_uri=cfg.output.uri, format=cfg.output.format,
                    fps=cfg.render.fps, model_storage_options=cfg.model.storage_options,
                    output_storage_options=cfg.output.storage_options, retries=cfg.output.retries,
                    retry_backoff=cfg.output.retry_backoff, options=options,
                )
                pools = [Pool(p.group.name, cluster.spawner(p, worker_spec), p.replicas,
                              [t for t in todo if t.id in routed_set[p.group.name]])
                         for p in cluster.plan(cfg.cluster)]
                queue = WorkQueue(pools, cfg.cluster.max_attempts, on_row, on_tick=writer.flush_if_due,
                                  batch_size=cfg.render.batch_size)
                queue.run()
                result.retries, result.restarts, result.workers = queue.retries, queue.restarts, queue.workers
                result.drain_seconds = queue.drain_seconds
    finally:
        # Whatever stopped the queue, publish what landed: a re-run continues from it.
        writer.flush()
        bar.close()

    # 5. Every input row has its final manifest row: compact the parts, then write _SUCCESS last.
    final = compact(storage, run_id, _final_rows(storage, tasks, invalid))
    statuses = final.column("status").to_pylist()
    result.ok, result.failed = statuses.count("ok"), statuses.count("failed")
    result.invalid = statuses.count("invalid")
    result.rendered = counts["ok"] + counts["failed"]
    result.seconds = time.perf_counter() - started
    write_success(storage, {
        "run_id": run_id, "finished_at": datetime.now(timezone.utc).isoformat(),
        "counts": {k: v for k, v in result.__dict__.items() if k != "workers"},
        "workers": result.workers, "model": cfg.model.path, "config": to_dict(cfg), "versions": _versions(),
    })
    return result
