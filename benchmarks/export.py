"""Export throughput over a generated finished job of N small clips: samples/s, MB/s, driver peak RSS, planning share.

The job output is generated once under `--data` (no rendering): a handful of 17-frame 64x64 mp4s encoded by the
product's encoder and written as one copy per row, a JPEG poster per row, a one-part manifest of a sweep (prompts x
2 models x 2 seeds, ids with dots) carrying a `licence` column, and a scores table of four metrics. Each export
(format x `--where`) runs in a child process of its own, so its peak RSS is the driver's alone; Ray's workers are
sampled apart. `--where` is CONDITION, which keeps about 10 % (the count is checked against numpy's).

    .venv/bin/python benchmarks/export.py [--rows 100000] [--formats webdataset,videofolder,csv] [--inprocess]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, table, write_json  # noqa: E402
from kandinsky_batch.output.layout import object_key, poster_key  # noqa: E402
from kandinsky_batch.output.manifest import job_schema# noqa: E402
from kandinsky_batch.output.success import read_success, write_success# noqa: E402
from kandinsky_batch.output.scores import open_scores, writer  # noqa: E402
from kandinsky_batch.output.storage import Storage  # noqa: E402

CLIPS = 8
"""Distinct encoded clips the rows' objects are copies of (each row's sha256 is its own object's)."""
MODELS, SEEDS = ("tiny", "tiny-b"), (1, 2)
METRICS = ("clip_score", "motion", "nsfw", "shot_cuts")
CONDITION = "clip_score > 25 AND shot_cuts = 0"
T0 = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)
WORDS = ("a red fox running through fresh snow slow motion waves crashing on dark rocks hot air balloon drifting "
         "over valley at dawn city street night rain neon lights reflecting puddles close up of hands kneading "
         "bread old man reading newspaper in park drone shot forest river").split()


def _scores(n: int) -> dict[str, np.ndarray]:
    """Each row's metric values (seeded): clip_score ~ N(25, 4), shot_cuts uniform on 0..4, so CONDITION keeps ~10 %."""
    rng = np.random.default_rng(0)
    return {"clip_score": rng.normal(25, 4, n), "motion": rng.gamma(2.0, 1.0, n),
            "nsfw": (rng.uniform(size=n) < 0.02).astype(np.float64), "shot_cuts": rng.integers(0, 5, n).astype(float)}


def expected_passing(n: int) -> int:
    """CONDITION evaluated by numpy over the generated scores."""
    s = _scores(n)
    return int(np.count_nonzero((s["clip_score"] > 25) & (s["shot_cuts"] == 0)))


def generate(root: Path, n: int) -> dict:
    """A finished, scored job output of `n` ok rows at `root` (see module docstring); reused when already there."""
    # Imported here: they load torch, which an export's driver (the child) never does.
    from kandinsky_batch.output.video import encode
    from tests.helpers import compact
    from tests.sweep_output import frames, jpeg

    storage = Storage(str(root))
    summary = read_success(storage)
    if summary and summary.get("counts", {}).get("ok") == n:
        return {"generated": False, "seconds": summary.get("generate_seconds")}
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    clips = [frames(seed, seed * 0.7, 0.3, num_frames=17, height=64, width=64) for seed in range(CLIPS)]
    videos = [encode(clip, "mp4", 8) for clip in clips]
    posters = [jpeg(clip[len(clip) // 2]) for clip in clips]
    shas = [hashlib.sha256(v).hexdigest() for v in videos]
    cells = [(m, s) for m in MODELS for s in SEEDS]
    ids, keys, pkeys = [], [], []
    rng = np.random.default_rng(1)
    prompts = [" ".join(rng.choice(WORDS, rng.integers(12, 24))) for _ in range(-(-n // len(cells)))]
    for i in range(n):
        model, seed = cells[i % len(cells)]
        ids.append(f"p{i // len(cells):06d}.{model}-{seed}")
        keys.append(object_key(ids[-1], "mp4"))
        pkeys.append(poster_key(ids[-1]))
    for folder in {os.path.dirname(k) for k in (*keys[:1], *pkeys[:1])}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):  # plain writes: generation is not what is measured
        (root / keys[i]).write_bytes(videos[i % CLIPS])
        (root / pkeys[i]).write_bytes(posters[i % CLIPS])
    written = time.perf_counter() - started
    pick = [i % CLIPS for i in range(n)]
    columns = {
        "id": ids, "row_index": [i // len(cells) for i in range(n)], "prompt": [prompts[i // len(cells)] for i in range(n)],
        "status": ["ok"] * n, "key": keys, "bytes": [len(videos[p]) for p in pick], "sha256": [shas[p] for p in pick],
        "poster_key": pkeys, "seed": [cells[i % len(cells)][1] for i in range(n)], "height": [64] * n,
        "width": [64] * n, "num_frames": [17] * n, "num_inference_steps": [4] * n, "guidance_scale": [5.0] * n,
        "fps": [8] * n, "format": ["mp4"] * n, "model": [cells[i % len(cells)][0] for i in range(n)],
        "sweep": [json.dumps({"model": m, "seed": s}) for m, s in (cells[i % len(cells)] for i in range(n))],
        "sweep_model": [cells[i % len(cells)][0] for i in range(n)],
        "sweep_seed_index": [SEEDS.index(cells[i % len(cells)][1]) for i in range(n)],
        "worker": ["replica0@host:1:cpu"] * n, "gang": ["1"] * n, "approximate": [False] * n, "attempts": [1] * n,
        "render_seconds": rng.uniform(0.4, 0.9, n).tolist(),
        "finished_at": [T0 + timedelta(milliseconds=i) for i in range(n)],
        "licence": ["cc-by" if i % 3 else "proprietary" for i in range(n)],
    }
    schema = job_schema(pa.schema([("licence", pa.string())]))
    manifest = pa.table({f.name: pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
                         for f in schema}, schema=schema)
    compact(storage, "bench", manifest)
    scores, out = _scores(n), writer(open_scores(storage), "score1", METRICS, flush_rows=n + 1)
    for i in range(n):
        out.add({"id": ids[i], "video_sha256": shas[pick[i]], "scored": list(METRICS), "run": "score1",
                 "scored_at": T0, **{m: float(scores[m][i]) for m in METRICS}})
    out.flush()
    seconds = time.perf_counter() - started
    write_success(storage, {"run_id": "bench", "counts": {"ok": n, "failed": 0, "invalid": 0},
                            "generate_seconds": round(seconds, 1), "objects_seconds": round(written, 1)})
    return {"generated": True, "seconds": round(seconds, 1), "objects_seconds": round(written, 1)}


class Watch:
    """Samples this process's RSS and its Ray worker descendants' every 0.1 s, stamped, to attribute peaks to phases."""

    def __init__(self):
        import psutil

        self.me, self.samples, self.workers_peak, self.workers_sum_peak = psutil.Process(), [], 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.me.memory_info().rss))
            rss = []
            for child in self.me.children(recursive=True):
                try:
                    if child.name().startswith("ray::"):
                        rss.append(child.memory_info().rss)
                except psutil.Error:
                    pass
            self.workers_peak = max([self.workers_peak, *rss])
            self.workers_sum_peak = max(self.workers_sum_peak, sum(rss))
            self._stop.wait(0.1)

    def peak(self, t0: float, t1: float) -> float:
        """The driver's highest sampled RSS between two perf_counter times, MiB."""
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0) / 2**20


def _child(case: dict) -> dict:
    """One export, its phases timed by wrapping the stage's steps (see module docstring)."""
    from kandinsky_batch.export import plan as plans
    from kandinsky_batch.export import stage
    from kandinsky_batch.export.formats import load_format
    from kandinsky_batch.fleet import cluster

    marks: dict[str, list[float]] = {}

    def timed(module, name):
        original = getattr(module, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                marks.setdefault(name, [t0, time.perf_counter()])

        setattr(module, name, wrapper)

    fmt = load_format(case["format"])
    for module, name in ((stage, "select"), (stage, "sample_rows"), (fmt, "check"), (stage, "write_units"),
                         (plans, "read_index"), (fmt, "finish")):
        timed(module, name)
    connect = cluster.connect

    @contextmanager
    def timed_connect(*a, **k):
        t0 = time.perf_counter()
        with connect(*a, **k):
            marks["ray_start"] = [t0, time.perf_counter()]
            yield

    cluster.connect = timed_connect
    args = stage.ExportArgs(source=case["source"], to=case["to"], format=case["format"], where=case["where"],
                            shard_size=case["shard_size"], address=case["address"])
    import psutil

    rss_before = psutil.Process().memory_info().rss / 2**20
    with Watch() as watch:
        started = time.perf_counter()
        result = stage.run(args)
        ended = time.perf_counter()
    write = marks["write_units"]
    ray = marks.get("ray_start", [write[0], write[0]])
    phases = {"select": marks["select"], "samples": marks["sample_rows"], "check": marks["check"],
              "plan": [started, write[0]], "ray_start": ray, "units": [ray[1], write[1]], "finish": [write[1], ended]}
    return {"samples": result.samples, "units": result.units, "wall_s": ended - started,
            "phase_s": {k: b - a for k, (a, b) in phases.items()},
            "phase_peak_rss_mib": {k: watch.peak(a, b) for k, (a, b) in phases.items()},
            "driver_rss_before_mib": rss_before,
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "driver_sampled_peak_rss_mib": watch.peak(started, ended),
            "ray_worker_peak_rss_mib": watch.workers_peak / 2**20,
            "ray_workers_sum_peak_rss_mib": watch.workers_sum_peak / 2**20}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_case(source: Path, dest: Path, fmt: str, where: str | None, address: str | None, shard_size: int) -> dict:
    """One export in a child process, then what it wrote checked and measured; DEST removed afterwards."""
    shutil.rmtree(dest, ignore_errors=True)
    case = {"source": str(source), "to": str(dest), "format": fmt, "where": where, "address": address,
            "shard_size": shard_size if fmt == "webdataset" else None}
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"export {case} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    index = pq.read_table(dest / "index.parquet", columns=["bytes"])
    assert index.num_rows == out["samples"], (index.num_rows, out)
    out.update(case, load_1min=load, video_mb=pc.sum(index["bytes"]).as_py() / 1e6,
               dest_mb=_bytes(dest) / 1e6)
    shutil.rmtree(dest, ignore_errors=True)
    return out


def _peak_phase(result: dict) -> str:
    """The step during which the driver's sampled RSS was highest (`plan` spans select..check, so it is left out)."""
    peaks = {k: v for k, v in result["phase_peak_rss_mib"].items() if k != "plan"}
    return max(peaks, key=peaks.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--formats", default="webdataset,videofolder,csv")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--inprocess", action="store_true", help="also run each format unfiltered with threads")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "kb-export-bench"))
    parser.add_argument("--out", help="the JSON's path (default results/export.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = Path(args.data)
    source, dest = data / f"source-{args.rows}", data / "dest"
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if args.generate:
        print(json.dumps(generate(source, args.rows)))
        return
    # In a child too: a child's ru_maxrss starts at its parent's RSS, so this process stays small (no torch).
    proc = subprocess.run([sys.executable, __file__, "--generate", "--rows", str(args.rows), "--data", str(data)],
                          capture_output=True, text=True, check=True)
    generation = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"source: {args.rows} rows at {source} ({'generated in' if generation['generated'] else 'reused; took'} "
          f"{generation['seconds']} s)", flush=True)
    passing = expected_passing(args.rows)
    cases = [(fmt, where, None) for fmt in args.formats.split(",") for where in (None, CONDITION)]
    if args.inprocess:
        cases += [(fmt, None, "inprocess") for fmt in args.formats.split(",")]
    results = []
    for fmt, where, address in cases:
        out = run_case(source, dest, fmt, where, address, args.shard_size)
        assert out["samples"] == (passing if where else args.rows), (out["samples"], passing)
        results.append(out)
        print(f"{fmt} where={where!r} {address or 'local Ray'}: {out['samples']} samples in {out['wall_s']:.1f} s",
              flush=True)
    rows = []
    for r in results:
        ph = r["phase_s"]
        rows.append([r["format"], "10 %" if r["where"] else "all", r["address"] or "local Ray", r["samples"],
                     r["units"], r["wall_s"], r["samples"] / r["wall_s"], r["video_mb"] / r["wall_s"],
                     r["dest_mb"], r["driver_peak_rss_mib"], _peak_phase(r), ph["select"] + ph["samples"] + ph["check"],
                     ph["plan"] / r["wall_s"], ph["ray_start"], ph["units"], ph["finish"],
                     r["ray_worker_peak_rss_mib"], r["load_1min"]])
    print(table(["format", "rows", "tasks on", "samples", "units", "wall s", "samples/s", "video MB/s", "DEST MB",
                 "driver peak RSS MiB", "peak in", "select+samples+check s", "planning share", "Ray start s", "units s",
                 "finish s", "Ray worker peak RSS MiB", "load 1 min"], rows))
    path = write_json("export", {"machine": machine(), "rows": args.rows, "generation": generation,
                                 "condition": CONDITION, "expected_passing": passing, "results": results}, args.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
