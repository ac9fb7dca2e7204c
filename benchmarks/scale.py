"""Benchmark 4, scale: the streaming front end, the driver's memory and the fleet at 10 k, 100 k and 1 M rows.

Rows are generated (~25-word prompts from a 400-word vocabulary, ids `row-N`, 5 s and 10 s mixed) and rendered
by the simulated model at zero cost (`simulated:0`: a 16x16 npy per row) on 8 local replicas, with prompts
validated through the real Qwen tokenizer (the tiny preset's, byte for byte Qwen2.5-VL's), so tokenization is
in every figure. Each job runs in a child process of its own, so its peak RSS is the driver's alone.

Figures (see benchmarks/RESULTS.md, section 4):
- start -> first render: `run` called -> first batch handed to a replica (`JobResult.first_render_seconds`;
  for runs cut short, the first video object's appearance). Includes preflight, Ray start, actor start.
- validation: IdIndex + RowValidator over the whole dataset in this process, rows/s (tokenizer included).
- driver peak RSS: the job's child process (ru_maxrss), Ray's own processes excluded.
- zero-cost rows/s through 8 replicas: rows committed per second between 10 % and 90 % of a run (2 k rows:
  the whole run; 1 M rows: a window of --window seconds after the first video, then the run is cut).
- finalize: manifest compaction + `_SUCCESS` (`job.run` end) - a 1 M-row manifest written in the driver's
  4,096-row parts is synthesized, then `final_rows` + `compact` timed in a child (peak RSS reported too).
- resume: a 1 M-row dataset with the first half committed (manifest parts and one object per row) ->
  first new render of the re-run.
- node lost: `tests/fleet_scenarios.py node_loss` (two-node Ray in a private network namespace; root).

Run: .venv/bin/python benchmarks/scale.py [--sizes 10000,100000,1000000] [--window 45]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _common import REPO, machine, table, write_json

WORDS = ("a an the small large red blue green golden silver old young quiet busy bright dark soft warm cold wet "
         "cat dog fox owl horse deer bird fish child woman man robot dragon ship car train tree river mountain "
         "forest city street garden beach desert ocean cloud storm sun moon star light shadow snow rain wind "
         "walks runs flies swims jumps dances sings sleeps looks turns climbs falls rises glows moves waits "
         "over under through across along near beside behind above below into onto from with without slowly "
         "quickly gently suddenly softly brightly camera follows pans zooms tracks closeup wide shot cinematic "
         "morning evening night dawn dusk winter summer autumn spring foggy sunny stormy calm wild ancient "
         "modern futuristic rustic neon glass stone wooden metal paper velvet silk leather marble crystal").split()
ROW_GROUP = 65536
REPLICAS = 8


def make_dataset(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` prompts of 20-30 words, written in row groups of 65,536 rows."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    writer = None
    for start in range(0, rows, ROW_GROUP):
        n = min(ROW_GROUP, rows - start)
        lengths = rng.integers(20, 31, n)
        picks = words[rng.integers(0, len(words), int(lengths.sum()))]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        prompts = [" ".join(picks[bounds[i]:bounds[i + 1]]) for i in range(n)]
        chunk = pa.table({
            "id": pa.array([f"row-{i}" for i in range(start, start + n)]),
            "prompt": pa.array(prompts),
            "num_frames": pa.array(np.where(rng.random(n) < 0.7, 121, 241), pa.int64()),
        })
        writer = writer or pq.ParquetWriter(path, chunk.schema)
        writer.write_table(chunk, row_group_size=ROW_GROUP)
    writer.close()


def tokenizer_spec(path: str):
    """The simulated model's limits with the real Qwen tokenizer (the tiny preset's) counting prompt tokens."""
    from dataclasses import fields

    from pipelines import ModelSpec, load_spec
    from pipelines.simulated import simulated_spec

    sim = simulated_spec(path)
    return ModelSpec(**{f.name: getattr(sim, f.name) for f in fields(ModelSpec) if f.name != "tokenizer_dir"},
                     tokenizer_dir=load_spec("tiny").tokenizer_dir)


def _config(data: Path, out: Path, extra: list[str] = ()):
    from kandinsky_batch.config.load import load_config

    return load_config(None, [f"input.path={data}", f"output.uri=file://{out}", "model.path=simulated:0",
                              "output.format=npy", f"cluster.replicas={REPLICAS}", f"cluster.num_cpus={REPLICAS}",
                              *extra])


def _patch_spec() -> None:
    import kandinsky_batch.intake.preflight as preflight

    preflight.load_spec = lambda path, storage_options=None: tokenizer_spec(path)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- children (each its own process: their RSS is theirs alone) -----------------------------------------------

def child_job(data: Path, out: Path, limit: float) -> dict:
    """Run the job; report first video time, commit rate, result. Cut after `limit` s past the first video."""
    from kandinsky_batch.job import run

    _patch_spec()
    cfg = _config(data, out)
    videos = out / "videos"
    before = sum(1 for _ in os.scandir(videos)) if videos.exists() else 0  # a resumed prefix holds some
    started = time.monotonic()
    report: dict = {}
    thread = threading.Thread(target=lambda: report.update(result=run(cfg, progress=False).__dict__), daemon=True)
    thread.start()
    samples = []  # (seconds since start, objects under videos/)
    first = None
    while thread.is_alive():
        time.sleep(0.5)
        if limit >= 1e9 and samples and samples[-1][1] > 150_000:
            # A long run to the end: counting a growing directory twice a second would slow it; RSS only.
            samples.append((time.monotonic() - started, samples[-1][1], _rss_mb()))
            time.sleep(1.5)
            continue
        count = (sum(1 for _ in os.scandir(videos)) if videos.exists() else 0) - before
        now = time.monotonic() - started
        samples.append((now, count, _rss_mb()))
        if count > 0 and first is None:
            first = now
        if first is not None and now - first > limit:
            report["cut"] = True
            break
    thread.join(timeout=0 if report.get("cut") else None)
    report.update(first_video_seconds=first, samples=samples, peak_rss_mb=_peak_rss_mb())
    return report


def child_finalize(out: Path, rows: int) -> dict:
    """Time final_rows + compact over a manifest of `rows` ok rows in 4,096-row parts."""
    from kandinsky_batch.output.finalize import finalize
    from kandinsky_batch.output.success import write_success
    from kandinsky_batch.output.storage import Storage

    storage = Storage(f"file://{out}")
    keys = pa.table({"id": pa.array([f"row-{i}" for i in range(rows)]), "row_index": pa.array(np.arange(rows))})
    started = time.perf_counter()
    counts = finalize(storage, "bench-final", keys, keys.slice(0, 0)).counts
    write_success(storage, {"counts": counts})
    return {"finalize_seconds": time.perf_counter() - started, "rows": sum(counts.values()),
            "peak_rss_mb": _peak_rss_mb()}


def synthesize_committed(data: Path, out: Path, rows: int, objects: bool) -> None:
    """Commit the first `rows` rows of `data` as a job would have: manifest parts of 4,096 ok rows (+ objects)."""
    from kandinsky_batch.output.manifest import ManifestWriter
    from kandinsky_batch.intake.preflight import preflight

    _patch_spec()
    checked = preflight(_config(data, out))
    writer = ManifestWriter(checked.storage, "bench-prefix", flush_rows=4096, flush_seconds=3600)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    start = 0
    for batch in checked.dataset.batches(batch_size=8192):
        positions = np.arange(start, start + batch.num_rows)
        start += batch.num_rows
        for task in checked.validator.validate(batch, positions).task_list():
            if task.row_index >= rows:
                writer.flush()
                return
            key = f"videos/{task.id}.npy"
            if objects:
                (out / key).write_bytes(b"")
            writer.add(checked.stamp.row(task.row(), status="ok", error=None, uri=f"file://{out}/{key}", bytes=0,
                                         sha256="0" * 64, attempts=1, worker="bench", finished_at=now))
    writer.flush()


def _child(mode: str, *args: str, timeout: float) -> dict:
    """Run this script as a child in its own session; kill the whole group (its Ray too) when it is done."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, *args], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, -9) or not lines:
        raise RuntimeError(f"child {mode} failed (rc {proc.returncode}): {out[-2000:]}")
    return json.loads(lines[-1])


def _rate(samples: list) -> float:
    """Objects per second between 10 % and 90 % of the objects seen."""
    top = samples[-1][1]
    lo = next(s for s in samples if s[1] >= 0.1 * top)
    hi = next(s for s in samples if s[1] >= 0.9 * top)
    return (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9)


def validation_rate(data: Path) -> float:
    from kandinsky_batch.intake.dataset import Dataset
    from kandinsky_batch.intake.ids import IdIndex
    from kandinsky_batch.intake.rows import RowValidator

    cfg = _config(data, Path("/nonexistent"))
    spec = tokenizer_spec("simulated:0")
    spec.count_tokens(["warm up the tokenizer"])
    started = time.perf_counter()
    dataset = Dataset(str(data))
    validator = RowValidator(cfg, spec, IdIndex.build(dataset.column("id"), dataset.num_rows, "npy"))
    start = 0
    for batch in dataset.batches(batch_size=8192):
        validator.validate(batch, np.arange(start, start + batch.num_rows))
        start += batch.num_rows
    return dataset.num_rows / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,10000,100000,1000000")
    parser.add_argument("--window", type=float, default=45.0, help="seconds of rendering measured at 1 M rows")
    parser.add_argument("--full-below", type=int, default=200_000, help="sizes below this run to the end")
    parser.add_argument("--node-loss", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir")
    parser.add_argument("--out")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "job":
            print(json.dumps(child_job(Path(rest[0]), Path(rest[1]), float(rest[2])), default=str))
        elif mode == "finalize":
            print(json.dumps(child_finalize(Path(rest[0]), int(rest[1]))))
        elif mode == "prefix":
            synthesize_committed(Path(rest[0]), Path(rest[1]), int(rest[2]), objects=rest[3] == "objects")
            print("{}")
        sys.stdout.flush()
        os._exit(0)  # a cut job's threads and Ray are the parent's to kill

    work = Path(args.workdir or tempfile.mkdtemp(prefix="kb-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    results, rows_out = {"machine": machine(), "sizes": {}}, []
    for n in sizes:
        data = work / f"in-{n}.parquet"
        if not data.exists():
            make_dataset(data, n)
        entry = {"validation_rows_per_s": validation_rate(data)}
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        full = n < args.full_below
        job = _child("job", str(data), str(out), str(1e9 if full else args.window), timeout=3600)
        result = job.get("result") or {}
        entry.update(first_render_seconds=result.get("first_render_seconds") or job["first_video_seconds"],
                     driver_peak_rss_mb=job["peak_rss_mb"], rows_per_s=_rate(job["samples"]), cut=bool(job.get("cut")),
                     seconds=result.get("seconds"))
        if full:
            entry["finalize_seconds"] = None  # measured in the job's own end: see seconds - drain
        if n >= 1_000_000:
            fin_dir = work / f"fin-{n}"
            shutil.rmtree(fin_dir, ignore_errors=True)
            _child("prefix", str(data), str(fin_dir), str(n), "no-objects", timeout=3600)
            entry["finalize"] = _child("finalize", str(fin_dir), str(n), timeout=3600)
            res_dir = work / f"resume-{n}"
            shutil.rmtree(res_dir, ignore_errors=True)
            _child("prefix", str(data), str(res_dir), str(n // 2), "objects", timeout=3600)
            resume = _child("job", str(data), str(res_dir), "5", timeout=3600)
            entry["resume_first_render_seconds"] = resume["first_video_seconds"]
            entry["resume_peak_rss_mb"] = resume["peak_rss_mb"]
        results["sizes"][n] = entry
        rows_out.append([n, entry["first_render_seconds"], entry["validation_rows_per_s"], entry["driver_peak_rss_mb"],
                         entry["rows_per_s"], entry.get("finalize", {}).get("finalize_seconds"),
                         entry.get("resume_first_render_seconds")])
        print(table(["rows", "start->first render s", "validation rows/s", "driver peak RSS MB", "rows/s (8 replicas)",
                     "finalize s", "resume->first render s"], rows_out), flush=True)
    if args.node_loss:
        results["node_loss"] = node_loss(work)
        print(f"node lost mid-job: {results['node_loss']}")
    m = results["machine"]
    print(f"\n{m.get('cpu')} ({m.get('host_cores')} cores), commit {m.get('commit')}")
    print(f"wrote {write_json('scale', results, args.out)}")
    return 0


def node_loss(work: Path) -> dict:
    """The two-node node-loss scenario of tests/fleet_scenarios.py: completes, lost, duplicated, hung."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return {"skipped": "needs root and unshare"}
    target = work / "node-loss"
    shutil.rmtree(target, ignore_errors=True)
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.fleet_scenarios", "node_loss", str(target)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": proc.stderr[-1000:]}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
