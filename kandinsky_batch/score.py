"""`kandinsky-batch score`: score a finished job's videos (or any Parquet of videos) into a scores table, on the
render machinery: rows stream through the work queue to replicas that load their metrics once.

Like a render: create-only parts published every few seconds (a killed run loses only the rows in flight), the
table's `_SUCCESS` rewritten last, and a re-run scores nothing twice ((id, video_sha256, metric) already in the
table is skipped). Fused scoring (a render job naming `score.metrics`) writes into the same table: `FusedScores`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from tqdm import tqdm

from kandinsky_batch.config.schema import JobConfig, ReplicaGroup
from kandinsky_batch.errors import ConfigError
from kandinsky_batch.fleet import inprocess
from kandinsky_batch.fleet.cluster import Placement
from kandinsky_batch.fleet.scheduler import WorkQueue
from kandinsky_batch.fleet.slot import Pool
from kandinsky_batch.fleet.score_worker import ALREADY, ScoreSpec, ScoreTask, ScoreWorker
from kandinsky_batch.intake.videos import open_videos
from kandinsky_batch.interrupt import StopSignals
from kandinsky_batch.output import scores
from kandinsky_batch.output.score_runs import run_summary
from kandinsky_batch.output.storage import Storage
from pipelines import ParallelSpec
from pipelines.scoring.registry import metric

CPU, GPU = "score-cpu", "score-gpu"
BATCH = 8  # rows per call to a replica: a short clip scores in milliseconds, a round trip costs about as much


@dataclass
class ScoreResult:
    """What a scoring run did; the same counts land in the table's `_SUCCESS`."""

    rows: int
    out: str
    metrics: list
    scored: int = 0
    """Rows this run scored (at least one metric computed)."""
    errors: int = 0
    already: int = 0
    """Rows whose every metric the table held already."""
    skipped: dict = field(default_factory=dict)
    """Rows not scored, by their source status (a job's `failed`, `invalid`; `empty` for a blank `video`)."""
    seconds: float = 0.0
    first_score_seconds: float | None = None
    """From `run` to the first row back from a replica (Ray's start and the metrics' loading included)."""
    workers: list = field(default_factory=list)


class _Fleet:
    """A fixed fleet: CPU replicas, and one GPU replica per GPU for model metrics."""

    def __init__(self, capacity: dict[str, int]):
        self._capacity = capacity

    def capacity(self) -> dict[str, int]:
        return self._capacity


class _Windows:
    """The work queue's `Source`: the source's rows a window at a time, those with nothing to score settled here.

    Tasks are made per device ("cpu", "gpu") and handed out under `pools[device]`, set once the cluster is known."""

    def __init__(self, videos, metrics: list[str], scored: scores.Scored, settle):
        self.batches, self.metrics, self.scored, self.settle = videos.batches(), metrics, scored, settle
        self.pools: dict[str, str] = {}
        self.parts: Counter = Counter()
        """Tasks per id still out: a row with CPU and GPU metrics is scored by one replica of each."""
        self._first: list = []
        self._done = False

    def wait_first(self) -> bool:
        """Read on until a row has something to score (True) or the source ended (False): no replica for nothing."""
        self._first = self.read()
        return bool(self._first)

    def read(self) -> list:
        """The tasks of the next source batch that has any (rows with nothing to score settle on the way)."""
        for rows in self.batches:
            tasks = [task for row in rows for task in self._tasks(row)]
            if tasks:
                return tasks
        self._done = True
        return []

    def poll(self) -> list[dict[str, list[ScoreTask]]]:
        tasks, self._first = self._first or self.read(), []
        window: dict[str, list[ScoreTask]] = {}
        for device, task in tasks:
            window.setdefault(self.pools[device], []).append(task)
        return [window] if window else []

    def _tasks(self, row) -> list[tuple[str, ScoreTask]]:
        if row.skipped is not None:
            self.settle({"id": row.id, "video_sha256": None, "video": row.shown, "scored": [],
                         "score_error": row.skipped}, skipped=row.status or "empty")
            return []
        todo = [m for m in self.metrics if m not in self.scored.done(row.id, row.sha256)]
        if not todo:
            self.settle(None)
            return []
        # A video known only once read (an external one) skips there what its sha256 has already.
        done = tuple((sha, tuple(sorted(m))) for sha, m in self.scored.by_sha(row.id).items()) \
            if row.sha256 is None else ()
        by_device: dict[str, list[str]] = {}
        for name in todo:
            by_device.setdefault(metric(name).device, []).append(name)
        self.parts[row.id] += len(by_device)
        return [(device, ScoreTask(row.id, row.video, row.shown, tuple(names), row.sha256, done, row.prompt,
                                   row.fps, row.row_index)) for device, names in by_device.items()]

    @property
    def exhausted(self) -> bool:
        return self._done and not self._first


def table_storage(cfg: JobConfig, default: str | None) -> Storage:
    """The scores table's storage: `score.out`, else the source's default (a job output's `scores/`)."""
    out = cfg.score.out or default
    if out is None:
        raise ConfigError(f"score.out: not set, and score.source={cfg.score.source!r} is a Parquet dataset, not a "
                          "job output: name where the scores table goes (score --out URI)")
    return Storage(out, cfg.score.storage_options, retries=cfg.output.retries, backoff=cfg.output.retry_backoff)


def _stamped(row: dict, run_id: str) -> dict:
    """A worker's (or the queue's) row as the table stores it."""
    kept = {k: v for k, v in row.items() if k not in ("status", "error", "attempts", "worker", "gang", ALREADY)}
    if row.get("status") == "failed":  # the replica died on it `cluster.max_attempts` times
        kept["score_error"] = f"replica lost: {row.get('error')}"
    return {**kept, "run": run_id, "scored_at": datetime.now(timezone.utc)}


def run(cfg: JobConfig, progress: bool = True, verbose: bool = False, transport=None) -> ScoreResult:
    """Score every video of `cfg.score.source` not already in its scores table (see module docstring)."""
    with StopSignals() as stop:
        return _run(cfg, progress, verbose, stop, transport or inprocess.transport(cfg.cluster))


def _run(cfg: JobConfig, progress: bool, verbose: bool, stop: StopSignals, transport) -> ScoreResult:
    started, clock = time.perf_counter(), time.monotonic()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    metrics = cfg.score.names()
    # 1. The source, the table and what it holds, before anything starts.
    with stop.abortable():
        videos = open_videos(cfg.score.source, cfg.score.storage_options)
        storage = table_storage(cfg, videos.default_out)
        scored = scores.Scored(storage)
    result = ScoreResult(rows=videos.num_rows, out=storage.uri, metrics=metrics)
    writer = scores.writer(storage, run_id, metrics)
    bar = tqdm(total=result.rows, unit="row", disable=not progress, desc="scoring", mininterval=1)
    skips: Counter = Counter()
    outcome: dict[str, str] = {}  # id -> "scored" / "error" so far this run, while its parts are out

    def settle(row: dict | None, skipped: str | None = None) -> None:
        """A row settled without a replica: skipped (recorded once), or every metric in the table already."""
        if row is None:
            result.already += 1
        else:
            skips[skipped] += 1
            if scored.errors.get((row["id"], None), 0) != row["score_error"]:
                writer.add(_stamped(row, run_id))
        bar.update(1)

    def commit(row: dict) -> None:
        if result.first_score_seconds is None:
            result.first_score_seconds = time.monotonic() - clock
        windows.parts[row["id"]] -= 1
        if not row.get(ALREADY):
            error = row.get("score_error") or row.get("status") == "failed"
            # An error the table holds already for this video, unchanged, is not written twice.
            if row.get("scored") or scored.errors.get((row["id"], row.get("video_sha256")), 0) != row.get(
                    "score_error"):
                writer.add(_stamped(row, run_id))
            outcome[row["id"]] = "error" if error or outcome.get(row["id"]) == "error" else "scored"
        if windows.parts[row["id"]] <= 0:
            del windows.parts[row["id"]]
            state = outcome.pop(row["id"], "already")
            result.scored += state == "scored"
            result.errors += state == "error"
            result.already += state == "already"
            bar.update(1)

    # 2. Rows stream from the source; skipped and already-scored ones settle as they are read. Then replicas, if
    # anything is left: CPU metrics on CPU replicas, model metrics on GPU replicas when the cluster has GPUs.
    windows = _Windows(videos, metrics, scored, settle)
    devices = {metric(name).device for name in metrics}
    try:
        with stop.abortable():
            anything = windows.wait_first()
        if anything:
            with transport.connect(cfg.cluster, verbose=verbose):
                stop.install()  # ray.init took SIGTERM over
                stop.check()
                gpus = transport.gpus() if "gpu" in devices else 0
                pools = {"cpu": CPU, "gpu": GPU if gpus else CPU}
                windows.pools = pools
                capacity = {CPU: cfg.cluster.replicas or os.cpu_count() or 1, GPU: gpus}
                capacity = {name: n for name, n in capacity.items() if name in {pools[d] for d in devices}}
                spec = ScoreSpec((), tuple(sorted(cfg.score.weights.items())), cfg.score.storage_options,
                                 cfg.output.retries, cfg.output.retry_backoff)
                queue = WorkQueue([_pool(name, units, spec, [m for m in metrics if pools[metric(m).device] == name],
                                         transport) for name, units in capacity.items()],
                                  _Fleet(capacity), windows, max_attempts=cfg.cluster.max_attempts,
                                  on_row=commit, wait=transport.wait, get=transport.get, batch_size=BATCH,
                                  no_replica_timeout=cfg.cluster.no_replica_timeout,
                                  on_tick=lambda q: writer.flush_if_due(), should_stop=lambda: stop.requested,
                                  draining=transport.draining)
                queue.run()
                result.workers = queue.workers
                if queue.stopped:
                    stop.check()
    finally:
        # Whatever stopped the run, publish what was scored: a re-run continues from it.
        writer.flush()
        bar.close()
    return _finish(storage, run_id, result, skips, metrics, cfg, started)


@dataclass
class ScorePlan:
    """What `score` would do, found by `validate` reading the source and the table only (nothing starts)."""

    source: str
    out: str
    metrics: list
    rows: int = 0
    to_score: int = 0
    """Rows with a metric the table does not hold (an external video's bytes are hashed by the replica, so one
    scored before under the same id counts here until then)."""
    already: int = 0
    skipped: dict = field(default_factory=dict)

    def lines(self) -> str:
        skipped = ", ".join(f"{n} {status}" for status, n in sorted(self.skipped.items())) or "none"
        return (f"score {self.source} -> {self.out}\nmetrics: {', '.join(self.metrics)}\n"
                f"rows: {self.rows}: {self.to_score} to score, {self.already} scored already, skipped: {skipped}")


def plan(cfg: JobConfig) -> ScorePlan:
    """Count what `run` would score, through the same windows and resume index, with no replica and no write."""
    videos = open_videos(cfg.score.source, cfg.score.storage_options)
    storage = table_storage(cfg, videos.default_out)
    found = ScorePlan(cfg.score.source, storage.uri, cfg.score.names(), rows=videos.num_rows)

    def settle(row: dict | None, skipped: str | None = None) -> None:
        if row is None:
            found.already += 1
        else:
            found.skipped[skipped] = found.skipped.get(skipped, 0) + 1

    windows = _Windows(videos, found.metrics, scores.Scored(storage), settle)
    while not windows.exhausted:
        found.to_score += len({task.id for _, task in windows.read()})
    return found


def _finish(storage: Storage, run_id: str, result: ScoreResult, skips: Counter, metrics: list[str], cfg: JobConfig,
            started: float) -> ScoreResult:
    """3. The table's `_SUCCESS` last: this run's counts and what produced each column."""
    result.skipped, result.seconds = dict(skips), time.perf_counter() - started
    scores.record_run(storage, run_summary(run_id, result, metrics, cfg, source=cfg.score.source))
    return result


class FusedScores:
    """A render job's scores (`score.metrics`): rows its replicas scored right after committing each video, from
    the same bytes, published beside the manifest into `score.out` (default `{output.uri}/scores`)."""

    def __init__(self, cfg: JobConfig, run_id: str):
        self.cfg, self.run_id, self.metrics = cfg, run_id, list(cfg.score.metrics)
        self.storage = Storage(cfg.score.out or scores.scores_uri(cfg.output.uri),
                               cfg.score.storage_options or cfg.output.storage_options, retries=cfg.output.retries,
                               backoff=cfg.output.retry_backoff)
        self.writer = scores.writer(self.storage, run_id, self.metrics)
        self.rows = self.scored = self.errors = 0
        self.workers: list = []

    def add(self, row: dict) -> None:
        self.writer.add(_stamped(row, self.run_id))
        self.rows += 1
        self.scored += bool(row.get("scored"))
        self.errors += bool(row.get("score_error"))

    def finish(self, workers: list) -> None:
        """Publish the last rows, then the table's `_SUCCESS` (before the job's own, which is written last)."""
        self.writer.flush()
        self.workers = workers
        scores.record_run(self.storage, run_summary(self.run_id, self, self.metrics, self.cfg,
                                                    source=self.cfg.output.uri, fused=True))


def _pool(name: str, units: int, spec: ScoreSpec, metrics: list[str], transport) -> Pool:
    """The work queue's pool of CPU or GPU scoring replicas, each loading `metrics`."""
    placement = Placement(ReplicaGroup(name=name, replicas=units), ParallelSpec(), num_gpus=1 if name == GPU else 0,
                          num_cpus=1, threads=1 if name == CPU else None)
    return Pool(name, transport.spawner(placement, replace(spec, metrics=tuple(metrics)), name, worker=ScoreWorker))
