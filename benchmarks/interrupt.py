"""How fast `kandinsky-batch run` stops on SIGINT / SIGTERM: signal -> its lease released, -> its one line, -> exit.

Cases: a 16-row tiny job mid-render; a 1 M-row tiny job 28 videos in (the case that was reported); a 1 M-row
dataset whose front end is busy recording rows (all but the last 8 invalid, simulated model, no Ray yet).
Each is the real CLI in its own session with its own Ray temp dir. Prints a table, writes results/interrupt.json.

    .venv/bin/python benchmarks/interrupt.py [--rows 1000000] [--only small,large,frontend]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import REPO, machine, table, write_json  # noqa: E402

TINY = ["output.format=npy", "render.height=32", "render.width=32", "render.num_frames=5",
        "render.num_inference_steps=2", "render.fps=8"]


def _dataset(path: Path, rows: int, invalid_but_last: int | None = None) -> str:
    numbers = pa.array(np.arange(rows)).cast(pa.string())
    columns = {"id": pc.binary_join_element_wise("r", numbers, ""),
               "prompt": pc.binary_join_element_wise("scene number ", numbers, ", a slow pan over a field", "")}
    if invalid_but_last is not None:  # height 100: not a multiple of 16, so `invalid`
        columns["height"] = pa.array([100] * (rows - invalid_but_last) + [None] * invalid_but_last, pa.int32())
    pq.write_table(pa.table(columns), path)
    return str(path)


def _objects(out: Path) -> int:
    videos = out / "videos"
    return len([p for p in os.listdir(videos) if p.endswith(".npy")]) if videos.is_dir() else 0


def _parts(out: Path) -> int:
    return len(os.listdir(out / "manifest")) if (out / "manifest").is_dir() else 0


def _released(out: Path) -> bool:
    lease = out / "_LEASE"
    return lease.is_dir() and any(name.endswith(".released") for name in os.listdir(lease))


def stop_once(data: str, out: Path, signum: int, ready, extra=()) -> dict:
    """One CLI job, `signum` once `ready(out)`; times from the signal to the lease's release, the line, the exit."""
    ray_tmp = tempfile.mkdtemp(prefix="kbb-", dir="/tmp")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp}
    args = [sys.executable, "-m", "kandinsky_batch", "run", "configs/tiny.yaml", f"input.path={data}",
            f"output.uri=file://{out}", "cluster.replicas=1", "--no-progress", *TINY, *extra]
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), line)) for line in proc.stderr])
    reader.start()
    try:
        while not ready(out):
            if proc.poll() is not None:
                raise RuntimeError(f"ended before the signal: {''.join(l for _, l in lines)[-2000:]}")
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signum)
        released, deadline = None, sent + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if released is None and _released(out):
                released = time.monotonic()
            time.sleep(0.01)
        proc.wait(timeout=1)
        exited = time.monotonic()
        if released is None and _released(out):
            released = exited  # in its last 10 ms
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    said = [(t, line.strip()) for t, line in lines if line.startswith("interrupted")]
    match = re.search(r"(\d+) rows committed", said[0][1]) if said else None
    return {"signal": signal.Signals(signum).name, "signal_after_s": sent - started, "exit_code": proc.returncode,
            "to_release_s": released - sent if released is not None else None,
            "to_line_s": said[0][0] - sent if said else None, "to_exit_s": exited - sent,
            "committed": int(match.group(1)) if match else None,
            "traceback": any("Traceback" in line for _, line in lines), "line": said[0][1] if said else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", default="small,large,frontend")
    args = parser.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="kb-interrupt-"))
    results = []
    try:
        cases = []
        if "small" in only:
            cases.append(("16 rows, tiny, 3 videos in", _dataset(work / "small.parquet", 16),
                          lambda out: _objects(out) >= 3, []))
        if "large" in only:
            cases.append((f"{args.rows:,} rows, tiny, 28 videos in", _dataset(work / "large.parquet", args.rows),
                          lambda out: _objects(out) >= 28, []))
        if "frontend" in only:
            cases.append((f"{args.rows:,} rows, front end busy (simulated)",
                          _dataset(work / "frontend.parquet", args.rows, invalid_but_last=8),
                          lambda out: _parts(out) >= 1, ["model.path=simulated:0"]))
        for name, data, ready, extra in cases:
            for signum in (signal.SIGINT, signal.SIGTERM):
                out = work / f"out-{len(results)}"
                results.append({"case": name, **stop_once(data, out, signum, ready, extra)})
                print(f"{name}, {results[-1]['signal']}: exit {results[-1]['exit_code']} "
                      f"in {results[-1]['to_exit_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(["case", "signal", "signal after (s)", "signal -> lease released (s)", "signal -> line (s)",
                 "signal -> exit (s)", "exit code", "rows committed", "traceback"],
                [[r["case"], r["signal"], r["signal_after_s"], r["to_release_s"], r["to_line_s"], r["to_exit_s"],
                  r["exit_code"], r["committed"], r["traceback"]] for r in results]))
    print(f"wrote {write_json('interrupt', {'machine': machine(), 'results': results})}")


if __name__ == "__main__":
    main()
