"""Benchmark 2, orchestration at scale: many replicas of a simulated model, ours against Ray Data.

The simulated model (`model.path=simulated:S`, `pipelines/simulated.py`) sleeps S seconds per million units of
modelled cost (visual tokens x steps x passes) and returns a 16x16 frame, so everything but the GPU runs for
real: the actors, the work queue, npy encoding, whole-object uploads, the manifest.

Definitions (the same for both systems, which run in one loopback Ray this script starts as `cluster.connect`
would, num_cpus = max(host cores, replicas); `job.run` joins it):
- makespan: wall time from every replica ready (models loaded) to the last row settled at the driver; for
  `job.run` that is `JobResult.drain_seconds` (first row handed out -> last settled), with rows held back
  until the whole fleet is up (the job itself hands rows to the first replicas ready). Ray Data is run with `wait_for_min_actors_s` so that no row
  starts before its whole pool is up; its makespan runs from the last actor's end of `__init__` to the
  return of `take_all()`.
- lower bound: max(sum of modelled row seconds / replicas, longest row).
- busy fraction: per replica, the time its simulated renders ran within the makespan / the makespan; mean and
  min over replicas. Renders are traced inside every actor (a Ray worker setup hook wraps
  `SimulatedRenderer.render` and logs each call's wall-clock interval): neither system's own accounting is used.
- sleep overshoot: traced render time / modelled seconds - 1 (late wake-ups of sleepers on a loaded host).
- gap: per replica, the start of a render minus the end of its previous one (median, 90th percentile): what a
  row costs its replica besides the render (result, dispatch, and whatever runs on the render's thread).
- packing floor: the makespan / lower bound of an ideal work queue (same order, same prefetch, zero overhead).
- host CPU during the makespan, by process name (sampled from /proc): what a 2-core host spends it on.

Run: .venv/bin/python benchmarks/orchestration.py [--replicas 64 --rows 2000 --seconds-per-megaunit 0.105]
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from _common import HostWatch, machine, table, write_json
from pipelines import RenderRequest
from pipelines.simulated import DEFAULT_SECONDS_PER_MEGAUNIT, SimulatedRenderer

# (num_frames, num_inference_steps, guidance_scale) per variant; 512x768 throughout, as the Lite configs.
VARIANTS = {
    "sft-5s": (121, 50, 5.0), "sft-10s": (241, 50, 5.0),
    "nocfg-5s": (121, 50, 1.0), "nocfg-10s": (241, 50, 1.0),
    "distilled-5s": (121, 16, 1.0), "distilled-10s": (241, 16, 1.0),
}
MIXES = {"sft": ["sft-5s", "sft-10s"], "lite": list(VARIANTS)}
HEIGHT, WIDTH = 512, 768


def build_rows(n: int, mix: str, seed: int = 0) -> list[dict]:
    """`n` prompt rows, each a variant drawn uniformly from the mix (seeded, so every run sees the same load)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        frames, steps, guidance = VARIANTS[rng.choice(MIXES[mix])]
        rows.append({"id": f"row{i:05d}", "prompt": f"simulated prompt number {i}", "seed": i, "height": HEIGHT,
                     "width": WIDTH, "num_frames": frames, "num_inference_steps": steps,
                     "guidance_scale": guidance})
    return rows


def _request(row: dict) -> RenderRequest:
    return RenderRequest(prompt=row["prompt"], negative_prompt=None, height=row["height"], width=row["width"],
                         num_frames=row["num_frames"], num_inference_steps=row["num_inference_steps"],
                         guidance_scale=row["guidance_scale"], seed=row["seed"])


def ideal_makespan(seconds: list[float], replicas: int, prefetch: int = 2) -> float:
    """Makespan of a zero-overhead work queue: longest first, each replica `prefetch` rows deep, refilled when
    one of its rows ends (what `kandinsky_batch.fleet.scheduler` does, minus every cost but the renders)."""
    pending = iter(sorted(seconds, reverse=True))
    queues = [[next(pending, None) for _ in range(prefetch)] for _ in range(replicas)]
    queues = [[s for s in q if s is not None] for q in queues]
    running = [(q.pop(0), slot) for slot, q in enumerate(queues) if q]
    heapq.heapify(running)
    end = 0.0
    while running:
        now, slot = heapq.heappop(running)
        end = now
        following = next(pending, None)
        if following is not None:
            queues[slot].append(following)
        if queues[slot]:
            heapq.heappush(running, (now + queues[slot].pop(0), slot))
    return end


TRACE_ENV = "KB_BENCH_TRACE_DIR"


def trace_renders() -> None:
    """Ray worker setup hook: append each simulated render's (start, end, modelled) to $KB_BENCH_TRACE_DIR/PID."""
    from pipelines import simulated

    path = os.path.join(os.environ[TRACE_ENV], str(os.getpid()))
    render = simulated.SimulatedRenderer.render

    def traced(self, request):
        started = time.time()
        frames = render(self, request)
        with open(path, "a") as f:
            f.write(f"{started} {time.time()} {self.seconds(request)}\n")
        return frames

    simulated.SimulatedRenderer.render = traced


@contextmanager
def local_ray(replicas: int, trace_dir: Path) -> Iterator[None]:
    """A loopback-only local Ray sized as `cluster.connect` sizes one, with every render traced."""
    import ray

    from kandinsky_batch.fleet.local_ray import start_local

    trace_dir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
    start_local(num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False, logging_level=logging.WARNING,
                _node_ip_address="127.0.0.1", runtime_env={"worker_process_setup_hook": "orchestration.trace_renders",
                                                           "env_vars": {TRACE_ENV: str(trace_dir), "PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()


def _summary(name: str, makespan: float, window: tuple[float, float], rows: list[dict], model: str,
             replicas: int, trace_dir: Path, watch: HostWatch, total: float, **extra) -> dict:
    modelled = [SimulatedRenderer(model).seconds(_request(r)) for r in rows]
    bound = max(sum(modelled) / replicas, max(modelled))
    traces = [sorted(tuple(map(float, line.split())) for line in path.read_text().splitlines())
              for path in trace_dir.iterdir()]
    t0, t1 = window
    inside = [sum(max(0.0, min(end, t1) - max(start, t0)) for start, end, _ in calls) for calls in traces]
    busy = [seconds / makespan for seconds in inside] + [0.0] * (replicas - len(traces))
    rendered = sum(end - start for calls in traces for start, end, _ in calls)
    gaps = sorted(b[0] - a[1] for calls in traces for a, b in zip(calls, calls[1:]))
    cpu = watch.cpu_by_process(t0, t1)
    span = cpu.pop("(window s)", 0.0) or 1.0
    ratio = lambda a, b: a / b if b else None  # noqa: E731 - zero-cost rows (a throughput probe) have no bound
    return {"system": name, "makespan_s": makespan, "lower_bound_s": bound, "ratio": ratio(makespan, bound),
            "packing_floor": ratio(ideal_makespan(modelled, replicas), bound),
            "busy_mean": statistics.fmean(busy), "busy_min": min(busy), "replicas_traced": len(traces),
            "renders_traced": sum(map(len, traces)),
            "overshoot": ratio(rendered, sum(modelled)) - 1 if sum(modelled) else None,
            "gap_ms": gaps and {"median": 1000 * gaps[len(gaps) // 2], "p90": 1000 * gaps[int(len(gaps) * 0.9)]},
            "rows_per_s": len(rows) / makespan, "startup_s": total - makespan, "total_s": total,
            "peak_memory_gib": watch.peak_gib, "host_cpu_cores": sum(cpu.values()) / span,
            "cpu_cores_by_process": {k: round(v / span, 3) for k, v in list(cpu.items())[:8]}, **extra}


@contextmanager
def _rows_after_fleet_is_up(replicas: int) -> Iterator[None]:
    """Hold rows until every replica is ready, as Ray Data's `wait_for_min_actors_s` does, so both makespans
    measure a warm fleet (a job hands rows to the first replicas up; on 2 cores their start-up would slow them)."""
    from kandinsky_batch.fleet.scheduler import WorkQueue
    from kandinsky_batch.fleet.slot import SlotState

    pull = WorkQueue._pull

    def gated(queue: WorkQueue) -> None:
        if sum(s.state is SlotState.READY for s in queue.slots) >= replicas:
            pull(queue)

    WorkQueue._pull = gated
    try:
        yield
    finally:
        WorkQueue._pull = pull


def run_job(rows: list[dict], replicas: int, model: str, workdir: Path) -> dict:
    """Our system: `job.run` with npy output to local disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kandinsky_batch.config.load import load_config
    from kandinsky_batch.job import run
    from kandinsky_batch.output.manifest import read_manifest
    from kandinsky_batch.output.storage import Storage

    data = workdir / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    uri = f"file://{workdir / 'out'}"
    cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", "output.format=npy",
                             f"model.path={model}", f"cluster.replicas={replicas}"])
    started = time.perf_counter()
    with local_ray(replicas, workdir / "traces"), HostWatch() as watch, _rows_after_fleet_is_up(replicas):
        result = run(cfg, progress=False)
    total = time.perf_counter() - started
    if result.ok != len(rows):
        raise RuntimeError(f"job.run: {result.ok} of {len(rows)} rows ok ({result.failed} failed)")
    # The manifest's commit times place the drain window on the wall clock.
    last = max(row["finished_at"] for row in read_manifest(Storage(uri)).to_pylist()).timestamp()
    return _summary("kandinsky-batch job.run", result.drain_seconds, (last - result.drain_seconds, last), rows,
                    model, replicas, workdir / "traces", watch, total, restarts=result.restarts,
                    retries=result.retries)


class SimulatedCallable:
    """What a Ray Data user would write: load the model once per actor, render + encode + upload per row."""

    def __init__(self, model: str, uri: str):
        from kandinsky_batch.output.storage import Storage

        self.renderer = SimulatedRenderer(model)
        self.storage = Storage(uri)
        self.ready_at = time.time()

    def __call__(self, batch: dict) -> dict:
        import hashlib

        from kandinsky_batch.output.layout import object_key
        from kandinsky_batch.output.video import encode

        out = defaultdict(list)
        for i in range(len(batch["id"])):
            row = {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in batch.items()}
            data = encode(self.renderer.render(_request(row)), "npy", 24)
            key = object_key(row["id"], "npy")
            if not self.storage.put_bytes_if_absent(key, data):
                data = self.storage.get_bytes(key)
            out["id"].append(row["id"])
            out["uri"].append(self.storage.url(key))
            out["sha256"].append(hashlib.sha256(data).hexdigest())
            out["ready_at"].append(self.ready_at)
        return {k: np.asarray(v) for k, v in out.items()}


def run_ray_data(rows: list[dict], replicas: int, model: str, workdir: Path) -> dict:
    """The reference: `from_items(...).map_batches(SimulatedCallable, concurrency=replicas, batch_size=1)`."""
    import ray

    started = time.perf_counter()
    with local_ray(replicas, workdir / "traces"):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.wait_for_min_actors_s = 600  # the whole pool up before the first row, as our work queue does
        # One row per block, longest first, like job.run: otherwise rows travel to actors in blocks of many.
        ordered = sorted(rows, key=lambda r: -SimulatedRenderer(model).seconds(_request(r)))
        with HostWatch() as watch:
            ds = ray.data.from_items(ordered, override_num_blocks=len(ordered)).map_batches(
                SimulatedCallable, fn_constructor_kwargs={"model": model, "uri": f"file://{workdir / 'out'}"},
                concurrency=replicas, batch_size=1, num_cpus=1,
            )
            out = ds.take_all()
            ended = time.time()
    total = time.perf_counter() - started
    if len(out) != len(rows):
        raise RuntimeError(f"Ray Data: {len(out)} of {len(rows)} rows came back")
    ready = max(r["ready_at"] for r in out)
    return _summary("Ray Data map_batches (actor pool)", ended - ready, (ready, ended), rows, model, replicas,
                    workdir / "traces", watch, total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--mix", choices=sorted(MIXES), default="sft",
                        help="sft: 5 s and 10 s sft rows; lite: sft, nocfg and distilled, 5 s and 10 s")
    parser.add_argument("--seconds-per-megaunit", type=float, default=DEFAULT_SECONDS_PER_MEGAUNIT,
                        help="simulated seconds per million cost units (default: 5 s row ~0.5 s, 10 s ~1 s)")
    parser.add_argument("--systems", default="job,ray-data", help="comma-separated: job, ray-data")
    parser.add_argument("--workdir", help="where outputs go (default: a temp dir, removed afterwards)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/orchestration.json)")
    args = parser.parse_args()
    load = os.getloadavg()[0]

    model = f"simulated:{args.seconds_per_megaunit}"
    rows = build_rows(args.rows, args.mix)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kb-orchestration-"))
    results = []
    try:
        for system in args.systems.split(","):
            where = workdir / system
            where.mkdir(parents=True, exist_ok=True)
            runner = {"job": run_job, "ray-data": run_ray_data}[system]
            results.append(runner(rows, args.replicas, model, where))
            print(f"{system}: done", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    pct = lambda x: None if x is None else f"{100 * x:.1f} %"  # noqa: E731
    headers = ["system", "replicas", "rows", "makespan s", "lower bound s", "ratio", "packing floor", "busy mean",
               "busy min", "sleep overshoot", "gap ms (median/p90)", "rows/s", "host CPU cores", "start-up s",
               "peak mem GiB"]
    print(table(headers, [[r["system"], args.replicas, args.rows, r["makespan_s"], r["lower_bound_s"], r["ratio"],
                           r["packing_floor"], pct(r["busy_mean"]), pct(r["busy_min"]), pct(r["overshoot"]),
                           r["gap_ms"] and f"{r['gap_ms']['median']:.1f} / {r['gap_ms']['p90']:.1f}",
                           r["rows_per_s"], r["host_cpu_cores"], r["startup_s"], r["peak_memory_gib"]]
                          for r in results]))
    for r in results:
        print(f"{r['system']}: CPU cores during the makespan by process: {r['cpu_cores_by_process']}"
              + (f"; replica restarts {r['restarts']}" if "restarts" in r else ""))
    path = write_json("orchestration", {
        "benchmark": "orchestration", "machine": machine(),
        "params": {"replicas": args.replicas, "rows": args.rows, "mix": args.mix, "model": model},
        "loadavg_before": load,
        "targets": {"ratio_max": 1.03, "busy_mean_min": 0.98}, "results": results,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
