"""Benchmark 2, orchestration at scale: many replicas of a simulated model, ours against Ray Data.

The simulated model (`model.path=simulated:S`, `pipelines/simulated.py`) sleeps S seconds per million units of
modelled cost (visual tokens x steps x passes) and returns a 16x16 frame, so everything but the GPU runs for
real: the actors, the work queue, npy encoding, whole-object uploads, the manifest.

Definitions (the same for both systems):
- makespan: wall time from every replica ready (models loaded) to the last row settled at the driver; for
  `job.run` that is `JobResult.drain_seconds`. Ray Data is run with `wait_for_min_actors_s` so that no row
  starts before its whole pool is up; its makespan runs from the last actor's end of `__init__` to the
  return of `take_all()`.
- lower bound: max(sum of modelled row seconds / replicas, longest row).
- mean replica busy fraction: sum of time inside `render` (manifest `render_seconds`) / (replicas x makespan).
- sleep overshoot: sum of `render_seconds` / sum of modelled seconds - 1 (late wake-ups on a loaded host).
- packing floor: the makespan / lower bound of an ideal work queue (same order, same prefetch, zero overhead):
  what is left above it is per-row overhead and sleep overshoot.
- idle per row: (replicas x makespan - sum of render_seconds) / rows, the replica time each row costs beyond
  its render (dispatch, encode, upload, result, and the tail).
- host CPU during the makespan, by process name (sampled from /proc), to see what a 2-core host spends it on.
- row gap (job.run): per replica, the time between two consecutive commits minus the later row's render:
  what a row costs its replica besides the render, as the driver sees it (median and 90th percentile).

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
    one of its rows ends (what `kandinsky_batch.scheduler` does, minus every cost but the renders)."""
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


def _summary(name: str, makespan: float, modelled: list[float], render: dict[str, list[float]], replicas: int,
             total: float, watch: HostWatch, window: tuple[float, float], **extra) -> dict:
    bound = max(sum(modelled) / replicas, max(modelled))
    busy = [sum(v) / makespan for v in render.values()] + [0.0] * (replicas - len(render))
    rendered = sum(sum(v) for v in render.values())
    cpu = watch.cpu_by_process(*window)
    span = cpu.pop("(window s)", 0.0) or 1.0
    return {"system": name, "makespan_s": makespan, "lower_bound_s": bound, "ratio": makespan / bound,
            "packing_floor": ideal_makespan(modelled, replicas) / bound,
            "busy_mean": statistics.fmean(busy), "busy_min": min(busy), "replicas_used": len(render),
            "overshoot": rendered / sum(modelled) - 1,
            "idle_per_row_ms": 1000 * (replicas * makespan - rendered) / len(modelled),
            "startup_s": total - makespan, "total_s": total, "peak_memory_gib": watch.peak_gib,
            "host_cpu_cores": sum(cpu.values()) / span,
            "cpu_cores_by_process": {k: round(v / span, 3) for k, v in list(cpu.items())[:8]}, **extra}


def run_job(rows: list[dict], replicas: int, model: str, workdir: Path) -> dict:
    """Our system: `job.run` with npy output to local disk; figures from JobResult and the manifest."""
    from kandinsky_batch.config import load_config
    from kandinsky_batch.job import run
    from kandinsky_batch.manifest import read_manifest
    from kandinsky_batch.storage import Storage
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = workdir / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    uri = f"file://{workdir / 'job'}"
    cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", "output.format=npy",
                             f"model.path={model}", f"cluster.replicas={replicas}"])
    with HostWatch() as watch:
        result = run(cfg, progress=False)
    if result.ok != len(rows):
        raise RuntimeError(f"job.run: {result.ok} of {len(rows)} rows ok ({result.failed} failed)")
    manifest = read_manifest(Storage(uri)).to_pylist()
    render = defaultdict(list)
    commits = defaultdict(list)
    for row in manifest:
        render[row["worker"]].append(row["render_seconds"])
        commits[row["worker"]].append((row["finished_at"].timestamp(), row["render_seconds"]))
    gaps = sorted(b[0] - a[0] - b[1] for c in commits.values() for a, b in zip(sorted(c), sorted(c)[1:]))
    modelled = [SimulatedRenderer(model).seconds(_request(r)) for r in rows]
    # The manifest's commit times place the drain window on the wall clock.
    last = max(row["finished_at"] for row in manifest).timestamp()
    return _summary("kandinsky-batch job.run", result.drain_seconds, modelled, render, replicas, result.seconds,
                    watch, (last - result.drain_seconds, last), restarts=result.restarts, retries=result.retries,
                    row_gap_ms={"median": 1000 * gaps[len(gaps) // 2], "p90": 1000 * gaps[int(len(gaps) * 0.9)]})


class SimulatedCallable:
    """What a Ray Data user would write: load the model once per actor, render + encode + upload per row."""

    def __init__(self, model: str, uri: str):
        from kandinsky_batch.storage import Storage

        self.renderer = SimulatedRenderer(model)
        self.storage = Storage(uri)
        self.ready_at = time.time()
        self.name = f"pid{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        import hashlib

        from kandinsky_batch.storage import object_key
        from kandinsky_batch.video import encode

        out = defaultdict(list)
        for i in range(len(batch["id"])):
            row = {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in batch.items()}
            started = time.perf_counter()
            frames = self.renderer.render(_request(row))
            out["render_seconds"].append(time.perf_counter() - started)
            data = encode(frames, "npy", 24)
            key = object_key(row["id"], "npy")
            if not self.storage.put_bytes_if_absent(key, data):
                data = self.storage.get_bytes(key)
            out["id"].append(row["id"])
            out["uri"].append(self.storage.url(key))
            out["sha256"].append(hashlib.sha256(data).hexdigest())
            out["worker"].append(self.name)
            out["ready_at"].append(self.ready_at)
        return {k: np.asarray(v) for k, v in out.items()}


def run_ray_data(rows: list[dict], replicas: int, model: str, workdir: Path) -> dict:
    """The reference: `from_items(...).map_batches(SimulatedCallable, concurrency=replicas, batch_size=1)`."""
    import ray

    from kandinsky_batch.cluster import loopback_only

    started = time.perf_counter()
    loopback_only()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False,
             logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.wait_for_min_actors_s = 600  # the whole pool up before the first row, as our work queue does
        uri = f"file://{workdir / 'ray-data'}"
        # One row per block, longest first, like job.run: otherwise rows travel to actors in blocks of many.
        ordered = sorted(rows, key=lambda r: -SimulatedRenderer(model).seconds(_request(r)))
        with HostWatch() as watch:
            ds = ray.data.from_items(ordered, override_num_blocks=len(ordered)).map_batches(
                SimulatedCallable, fn_constructor_kwargs={"model": model, "uri": uri}, concurrency=replicas,
                batch_size=1, num_cpus=1,
            )
            out = ds.take_all()
            ended = time.time()
    finally:
        ray.shutdown()
    total = time.perf_counter() - started
    if len(out) != len(rows):
        raise RuntimeError(f"Ray Data: {len(out)} of {len(rows)} rows came back")
    ready = max(r["ready_at"] for r in out)
    render = defaultdict(list)
    for row in out:
        render[row["worker"]].append(float(row["render_seconds"]))
    modelled = [SimulatedRenderer(model).seconds(_request(r)) for r in rows]
    makespan = ended - ready
    return _summary("Ray Data map_batches (actor pool)", makespan, modelled, render, replicas, total, watch,
                    (ready, ended))


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

    headers = ["system", "replicas", "rows", "makespan s", "lower bound s", "ratio", "packing floor", "busy mean",
               "busy min", "sleep overshoot", "idle/row ms", "host CPU cores", "start-up s", "peak mem GiB"]
    print(table(headers, [[r["system"], args.replicas, args.rows, r["makespan_s"], r["lower_bound_s"], r["ratio"],
                           r["packing_floor"], f"{100 * r['busy_mean']:.1f} %", f"{100 * r['busy_min']:.1f} %",
                           f"{100 * r['overshoot']:.2f} %", r["idle_per_row_ms"], r["host_cpu_cores"],
                           r["startup_s"], r["peak_memory_gib"]] for r in results]))
    for r in results:
        print(f"{r['system']}: CPU cores during the makespan by process: {r['cpu_cores_by_process']}")
        if "row_gap_ms" in r:
            print(f"{r['system']}: row gap ms {r['row_gap_ms']}, replica restarts {r['restarts']}")
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
