"""Benchmark 1, overhead: a 1-replica `kandinsky-batch run` against a bare diffusers loop, per video.

Both render the same rows with the tiny model (64x64, 17 frames, 4 steps, CFG 5, the seeds the job derives),
encode each to mp4 with `kandinsky_batch.output.video.encode_mp4` and write it to local disk; each runs in its own
process with one torch thread (CPU replicas always render with one, see `cluster.plan`: the seed contract
must not depend on the fleet's shape; `--threads` sets the bare loop's, default 1, and the job's
`cluster.num_cpus`) and x264 with its fixed thread count. One thread is also the steadier figure here: on a
2-core host shared with other work, 2 OpenMP threads collapse whenever one is descheduled.

Marginal per-video time = (wall(2N rows) - wall(N rows)) / N, so start-up (imports, model load, Ray start,
actor start, manifest compaction) cancels. Each size runs `--repeats` times, interleaved, and the fastest
run counts. The ratio is job / bare; the target is <= 1.05. The job's drain time (`_SUCCESS`
counts.drain_seconds, start-up excluded) gives a second estimate of the same ratio.

Run: .venv/bin/python benchmarks/overhead.py [--rows 24 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, machine, table, write_json

RENDER = dict(height=64, width=64, num_frames=17, num_inference_steps=4, guidance_scale=5.0, fps=8)
PROMPTS = ["a cat dancing in the rain", "a dog running on the beach at sunset", "a red car at night",
           "slow motion waves crashing on rocks", "clouds over snowy mountains", "a flower opening"]


def bare(data: str, outdir: str, threads: int) -> dict:
    """The bare loop: plain `from_pretrained`, the seed contract's call, encode_mp4, one file per row."""
    started = time.perf_counter()
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from diffusers import Kandinsky5T2VPipeline

    from kandinsky_batch.intake.rows import derive_seed
    from kandinsky_batch.output.video import encode_mp4
    from pipelines import resolve_model

    torch.set_num_threads(threads)
    pipe = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for row in pq.read_table(data).to_pylist():
        frames = pipe(
            prompt=row["prompt"], negative_prompt=None, height=RENDER["height"], width=RENDER["width"],
            num_frames=RENDER["num_frames"], num_inference_steps=RENDER["num_inference_steps"],
            guidance_scale=RENDER["guidance_scale"], output_type="np",
            generator=torch.Generator("cpu").manual_seed(derive_seed(0, row["id"])),
        ).frames[0]
        (out / f"{row['id']}.mp4").write_bytes(encode_mp4(np.round(frames * 255).astype(np.uint8), RENDER["fps"]))
    return {"load_s": loaded - started, "loop_s": time.perf_counter() - loaded}


def _run_bare(data: Path, outdir: Path, threads: int) -> dict:
    started = time.perf_counter()
    # Ray sets OMP_NUM_THREADS to an actor's CPUs; the bare process gets the same.
    proc = subprocess.run([sys.executable, __file__, "_bare", str(data), str(outdir), str(threads)],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return {"wall_s": time.perf_counter() - started, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _run_job(data: Path, outdir: Path, threads: int) -> dict:
    overrides = [f"input.path={data}", f"output.uri={outdir}", "output.format=mp4", "model.path=tiny",
                 "cluster.replicas=1", f"cluster.num_cpus={threads}", *(f"render.{k}={v}" for k, v in RENDER.items())]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kandinsky_batch", "run", str(REPO / "configs" / "tiny.yaml"), *overrides,
                    "--no-progress"], capture_output=True, text=True, check=True, cwd=REPO)
    wall = time.perf_counter() - started
    counts = json.loads((outdir / "_SUCCESS").read_text())["counts"]
    return {"wall_s": wall, "drain_s": counts["drain_seconds"], "ok": counts["ok"]}


def _dataset(path: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"v{i:04d}", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=48, help="N: the runs render N and 2N rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/overhead.json)")
    args = parser.parse_args()

    from pipelines import resolve_model

    resolve_model("tiny")  # built once here, so that neither side pays for it
    work = Path(tempfile.mkdtemp(prefix="kb-overhead-"))
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        sizes = {n: _dataset(work / f"rows-{n}.parquet", n) for n in (args.rows, 2 * args.rows)}
        for repeat in range(args.repeats):
            for n, data in sizes.items():
                for system, runner in (("bare", _run_bare), ("job", _run_job)):
                    outdir = work / f"{system}-{n}-{repeat}"
                    load = os.getloadavg()[0]
                    result = {**runner(data, outdir, args.threads), "loadavg_before": load}
                    shutil.rmtree(outdir, ignore_errors=True)
                    runs.setdefault((system, n), []).append(result)
                    print(f"{system} {n} rows: {result}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n, n2 = args.rows, 2 * args.rows
    # A run that lost rows (a replica killed from outside, say) measures something else: it never counts.
    complete = {key: [r for r in v if r.get("ok", key[1]) == key[1]] or v for key, v in runs.items()}
    best = {key: min(v, key=lambda r: r["wall_s"]) for key, v in complete.items()}
    marginal = {s: (best[(s, n2)]["wall_s"] - best[(s, n)]["wall_s"]) / n for s in ("bare", "job")}
    bare_loop = (best[("bare", n2)]["loop_s"] - best[("bare", n)]["loop_s"]) / n
    job_drain = (min(r["drain_s"] for r in complete[("job", n2)]) - min(r["drain_s"] for r in complete[("job", n)])) / n
    ratio = marginal["job"] / marginal["bare"]
    print(table(["measure", "bare loop s/video", "job s/video", "job / bare"], [
        ["marginal wall (start-up cancelled)", marginal["bare"], marginal["job"], ratio],
        ["marginal inside the loop / drain", bare_loop, job_drain, job_drain / bare_loop],
    ]))
    print(table(["run", "bare wall s", "job wall s", "bare load s", "job drain s"], [
        [f"{k} rows (fastest of {args.repeats})", best[("bare", k)]["wall_s"], best[("job", k)]["wall_s"],
         best[("bare", k)]["load_s"], best[("job", k)]["drain_s"]] for k in (n, n2)
    ]))
    path = write_json("overhead", {
        "benchmark": "overhead", "machine": machine(), "params": {"rows": [n, n2], "repeats": args.repeats,
                                                                  "threads": args.threads, **RENDER},
        "target": {"ratio_max": 1.05}, "marginal_s_per_video": marginal, "ratio": ratio,
        "marginal_loop_vs_drain": {"bare_loop": bare_loop, "job_drain": job_drain, "ratio": job_drain / bare_loop},
        "runs": {f"{s}-{k}": v for (s, k), v in runs.items()},
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_bare":
        print(json.dumps(bare(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        sys.exit(0)
    sys.exit(main())
