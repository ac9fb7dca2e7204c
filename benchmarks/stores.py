"""Object-store requests per stage on S3 (moto behind the counting proxy of `tests/s3_proxy.py`), their price at
1 M rows, and how fast a 1 M-row job on S3 stops on SIGINT / SIGTERM.

Requests: an output of each of `--rows` sizes (the simulated model at zero cost, in-process replicas, npy
32x32x5), then each stage on it with the proxy's counters reset: run, resume (the same run again: nothing left to
render), verify, report (to a local folder, videos presigned) and export (webdataset to another prefix of the
bucket). Each stage's count of each kind is fitted as fixed + per-row x rows through the two smallest sizes (objects
go one request each, listings a page per 1,000 keys) and read at 10,000 and 1 M rows, priced at AWS S3 Standard's
list prices: $0.005 per 1,000 PUT, COPY, POST and LIST, $0.0004 per 1,000 GET and other requests (HEAD); DELETE
is free.

Stop: the real CLI renders a `--stop-rows` dataset to S3 through the proxy (simulated model, in-process replicas)
and gets the signal once 28 videos have landed; timed to its `interrupted` line and to its exit.

    .venv/bin/python benchmarks/stores.py [--rows 250,1000] [--stop-rows 1000000] [--only requests,stop]
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
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import REPO, machine, table, write_json  # noqa: E402

BUCKET = "kb-bench"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TINY = ["output.format=npy", "render.height=32", "render.width=32", "render.num_frames=5",
        "render.num_inference_steps=2", "render.fps=8"]
PRICE = {"PUT": 0.005, "POST": 0.005, "LIST": 0.005, "GET": 0.0004, "HEAD": 0.0004, "DELETE": 0.0}
"""US dollars per 1,000 requests (AWS S3 Standard, us-east-1 list prices)."""
KINDS = ["PUT", "POST", "GET", "HEAD", "LIST", "DELETE"]


def _dataset(path: Path, rows: int) -> str:
    numbers = pa.array(np.arange(rows)).cast(pa.string())
    pq.write_table(pa.table({"id": pc.binary_join_element_wise("r", numbers, ""),
                             "prompt": pc.binary_join_element_wise("scene number ", numbers, ", a slow pan", "")}),
                   path)
    return str(path)


def _servers():
    """A moto S3 server on loopback with the bucket, and the counting proxy in front of it (started)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.s3_proxy import SlowDownProxy

    os.environ.update(AWS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    upstream = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=upstream).create_bucket(Bucket=BUCKET)
    proxy = SlowDownProxy(upstream).__enter__()
    return server, proxy


def _cost(counts: dict) -> float:
    return sum(PRICE[k] * n / 1000 for k, n in counts.items())


def requests(rows: int, work: Path, tag: str) -> list[dict]:
    """Each stage's requests by kind on one `rows`-row output (under prefixes named by `tag`)."""
    import logging

    from kandinsky_batch.config.load import load_config
    from kandinsky_batch.export.stage import ExportArgs
    from kandinsky_batch.export.stage import run as export
    from kandinsky_batch.job import run
    from kandinsky_batch.output.report import write_report
    from kandinsky_batch.output.verify import verify

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server, proxy = _servers()
    options = {"client_kwargs": {"endpoint_url": proxy.endpoint}, "key": "testing", "secret": "testing"}
    data = _dataset(work / f"requests-{tag}.parquet", rows)
    uri = f"s3://{BUCKET}/out-{tag}"

    def job():
        cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", "model.path=simulated:0",
                                 "cluster.address=inprocess", "cluster.replicas=4", *TINY])
        cfg.output.storage_options = options
        result = run(cfg, progress=False)
        return f"{result.rendered} rendered, {result.skipped} skipped"

    def checked():
        problems = verify(uri, options)
        return f"{len(problems)} problems"

    stages = [("run", job), ("resume", job), ("verify", checked),
              ("report", lambda: str(write_report(uri, work / f"report-{tag}", storage_options=options))),
              ("export", lambda: export(ExportArgs(uri, f"s3://{BUCKET}/set-{tag}", "webdataset",
                                                   storage_options=options, address="inprocess")).__class__.__name__)]
    results = []
    try:
        for name, stage in stages:
            proxy.reset()
            started = time.perf_counter()
            said = stage()
            seconds = time.perf_counter() - started
            counts = {k: proxy.counts.get(k, 0) for k in KINDS}
            results.append({"stage": name, "rows": rows, "seconds": seconds, "counts": counts, "said": said})
            print(f"{rows} rows, {name}: {sum(counts.values())} requests in {seconds:.1f} s ({said})", flush=True)
    finally:
        proxy.__exit__(None, None, None)
        server.stop()
    return results


def stop(rows: int, work: Path) -> list[dict]:
    """SIGINT and SIGTERM to the CLI rendering `rows` rows to S3, once 28 videos have landed."""
    server, proxy = _servers()
    data = _dataset(work / "stop.parquet", rows)
    results = []
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            proxy.reset()
            uri = f"s3://{BUCKET}/stop-{signal.Signals(signum).name.lower()}"
            args = [sys.executable, "-m", "kandinsky_batch", "run", "configs/tiny.yaml", f"input.path={data}",
                    f"output.uri={uri}", "model.path=simulated:0", "cluster.address=inprocess", "cluster.replicas=4",
                    f"output.storage_options.client_kwargs.endpoint_url={proxy.endpoint}",
                    "output.storage_options.key=testing", "output.storage_options.secret=testing", "--no-progress",
                    *TINY]
            started = time.monotonic()
            proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **AWS}, start_new_session=True, text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            lines: list[tuple[float, str]] = []
            reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), l)) for l in proc.stderr])
            reader.start()
            try:
                while sum(n for k, n in proxy.puts.items() if "/videos/" in k) < 28:
                    if proc.poll() is not None:
                        raise RuntimeError(f"ended before the signal: {''.join(l for _, l in lines)[-2000:]}")
                    time.sleep(0.05)
                sent = time.monotonic()
                proc.send_signal(signum)
                proc.wait(timeout=600)
                exited = time.monotonic()
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                reader.join()
            said = [(t, line.strip()) for t, line in lines if line.startswith("interrupted")]
            match = re.search(r"(\d+) rows committed", said[0][1]) if said else None
            results.append({"rows": rows, "signal": signal.Signals(signum).name, "signal_after_s": sent - started,
                            "to_line_s": said[0][0] - sent if said else None, "to_exit_s": exited - sent,
                            "exit_code": proc.returncode, "committed": int(match.group(1)) if match else None,
                            "requests": dict(Counter(proxy.counts)), "line": said[0][1] if said else None,
                            "traceback": any("Traceback" in line for _, line in lines)})
            print(f"{results[-1]['signal']}: exit {proc.returncode} in {results[-1]['to_exit_s']:.1f} s", flush=True)
    finally:
        proxy.__exit__(None, None, None)
        server.stop()
    return results


def fitted(measured: list[dict], small: int, large: int) -> list[dict]:
    """Each stage's requests of each kind as fixed + per row x rows through its counts at two sizes, read at
    10,000 and 1,000,000 rows."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in measured):
        a, b = (next(r["counts"] for r in measured if r["stage"] == stage and r["rows"] == n) for n in (small, large))
        per_row = {k: (b[k] - a[k]) / (large - small) for k in KINDS}
        fixed = {k: a[k] - per_row[k] * small for k in KINDS}
        out.append({"stage": stage, "per_row": per_row, "fixed": fixed,
                    "per_10k": {k: max(0, round(fixed[k] + per_row[k] * 10_000)) for k in KINDS},
                    "at_1m": {k: max(0, round(fixed[k] + per_row[k] * 1_000_000)) for k in KINDS}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="250,1000", help="output sizes measured (the two smallest are fitted)")
    parser.add_argument("--stop-rows", type=int, default=1_000_000)
    parser.add_argument("--only", default="requests,stop")
    args = parser.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="kb-stores-"))
    found: dict = {"machine": machine()}
    try:
        if "requests" in only:
            sizes = sorted(int(n) for n in args.rows.split(","))
            found["requests"] = [r for i, n in enumerate(sizes) for r in requests(n, work, str(i))]
        if "stop" in only:
            found["stop"] = stop(args.stop_rows, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "requests" in found:
        measured = found["requests"]
        print("\nrequests measured:")
        print(table(["rows", "stage", *KINDS, "all", "seconds"],
                    [[r["rows"], r["stage"], *(r["counts"][k] for k in KINDS), sum(r["counts"].values()),
                      r["seconds"]] for r in measured]))
        sizes = sorted({r["rows"] for r in measured})
        if len(sizes) >= 2:
            found["fitted"] = fitted(measured, sizes[0], sizes[1])
            print(f"\nper 10,000 rows and at 1 M rows (fixed + per row x rows, fitted at {sizes[0]:,} and "
                  f"{sizes[1]:,} rows):")
            print(table(["stage", *(f"{k} / 10 k" for k in KINDS), "all / 10 k", "all at 1 M", "price at 1 M"],
                        [[f["stage"], *(f["per_10k"][k] for k in KINDS), sum(f["per_10k"].values()),
                          sum(f["at_1m"].values()), f"${_cost(f['at_1m']):.2f}"] for f in found["fitted"]]))
    if "stop" in found:
        print(f"\nstop of a {args.stop_rows:,}-row job on S3:")
        print(table(["signal", "signal after (s)", "signal -> line (s)", "signal -> exit (s)", "exit code",
                     "rows committed", "traceback"],
                    [[r["signal"], r["signal_after_s"], r["to_line_s"], r["to_exit_s"], r["exit_code"],
                      r["committed"], r["traceback"]] for r in found["stop"]]))
    print(f"wrote {write_json('stores', found)}")


if __name__ == "__main__":
    main()
