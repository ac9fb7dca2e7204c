"""A render job on a cluster whose GPU pool starts empty and is grown by Ray's fake multi-node autoscaler.

Run as root inside a private network namespace, from the repository root:

    unshare -n .venv/bin/python -m tests.autoscale_scenario WORKDIR [--rows 16] [--timeout 150]

The head is `RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=<ours>`: a head with one CPU and no
GPU, and a worker type `gpu` (2 CPUs, 2 logical GPUs) from 0 to 1 node, which the autoscaler's fake provider
starts as real raylets on 127.0.0.1 (`ray/autoscaler/_private/fake_multi_node/node_provider.py`,
`FakeMultiNodeProvider`). Not `ray.cluster_utils.AutoscalingCluster`: its 2.60 wheel lacks the example config it
reads, and its start and shutdown run `ray stop --force` on the whole host. The job (`kandinsky_batch.job.run`,
`simulated` model, `cluster.device=gpu`) runs in a thread while the main thread watches what is asked of the
autoscaler (the v1 request in the GCS KV) and which nodes exist. One JSON line goes to stdout (and WORKDIR/
result.json); every process carrying this run's marker (`KB_FLEET_MARKER`) is gone before the script exits.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path

from tests.fleet_harness import MARKER, finish, in_private_namespace, reap, shutdown_ray

WORKER_TYPE = {"resources": {"CPU": 2, "GPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}
REPLICAS = 2
# `ray/autoscaler/_private/commands.py`, `request_resources`: the v1 autoscaler's target, one JSON list in the KV.
REQUEST_KEY = b"autoscaler_resource_request"


def autoscaling_config(gcs_address: str) -> dict:
    """The cluster Ray's fake provider runs: the keys its example config has, our node types, and the head's GCS
    (without `gcs_address` the provider's nodes join port 6379)."""
    return {
        "cluster_name": "kb-autoscale", "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                                 "gpu": WORKER_TYPE},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the head's GCS did not listen on {port} within {seconds:.0f} s")


def _write_dataset(path: Path, rows: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"clip-{i:03d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"an autoscaled scene {i}" for i in range(rows)]}), path)
    return ids


def _cpu_seconds() -> float:
    """CPU time of this process and of every live process of the run (Ray's daemons, actors), for the record."""
    import psutil

    from tests.fleet_harness import marked_processes

    total = sum(os.times()[:2])
    for proc in marked_processes(os.environ[MARKER]):
        try:
            total += sum(proc.cpu_times()[:2])
        except psutil.Error:
            continue
    return round(total, 1)


def run_scenario(args, report: dict) -> None:
    t0 = time.monotonic()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ids = _write_dataset(work / "prompts.parquet", args.rows)
    report["rows_in"] = len(ids)
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    ray_tmp = tempfile.mkdtemp(prefix="kba-", dir="/tmp")  # Ray's unix sockets must fit in 107 bytes
    for name in [n for n in os.environ if n.startswith("RAY_")]:
        del os.environ[name]
    os.environ.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # a second node is refused otherwise (we are in a netns)
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # the drain on SIGTERM is not the point here
    })
    port = _free_port()
    (work / "autoscaling.json").write_text(json.dumps(autoscaling_config(f"127.0.0.1:{port}")))  # YAML ⊃ JSON
    head = None
    state: dict = {}
    try:
        with open(work / "head.log", "w") as log:
            head = subprocess.Popen(
                [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
                 f"--autoscaling-config={work / 'autoscaling.json'}", "--num-cpus=1", "--num-gpus=0",
                 "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                stdout=log, stderr=subprocess.STDOUT)
        _wait_port(port, 90)  # a busy 2-core CI host has taken 37 s
        import ray
        from ray.experimental.internal_kv import _internal_kv_get

        ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR")
        report["timings"]["head_up_s"] = round(time.monotonic() - t0, 2)
        from kandinsky_batch.config.load import load_config
        from kandinsky_batch.job import run

        out = work / "out"
        cfg = load_config(None, [
            f"input.path={work / 'prompts.parquet'}", f"output.uri=file://{out}", "output.format=npy",
            f"model.path=simulated:{args.seconds_per_megaunit}", f"cluster.address=127.0.0.1:{port}",
            "cluster.device=gpu", f"cluster.replicas={REPLICAS}", "cluster.no_replica_timeout=90",
        ])

        def job_main() -> None:
            try:
                state["result"] = run(cfg, progress=False)
            except BaseException as exc:  # noqa: BLE001 - reported, not raised
                state["error"] = f"{type(exc).__name__}: {exc}"
                state["traceback"] = traceback.format_exc()[-3000:]

        job = threading.Thread(target=job_main, name="autoscale-job", daemon=True)
        job.start()
        job_started = time.monotonic()
        asks, gpu_nodes = [], 0
        while job.is_alive() and time.monotonic() - job_started < args.timeout:
            job.join(0.5)
            value = _internal_kv_get(REQUEST_KEY)
            ask = json.loads(value) if value else None
            if not asks or asks[-1]["ask"] != ask:
                asks.append({"at_s": round(time.monotonic() - t0, 2), "ask": ask})
            gpu_nodes = max(gpu_nodes, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")))
        report["hung"] = job.is_alive()
        report["asks"] = asks
        report["max_gpu_nodes_alive"] = gpu_nodes
        final = _internal_kv_get(REQUEST_KEY)
        report["final_ask"] = json.loads(final) if final else None
        report["error"], report["traceback"] = state.get("error"), state.get("traceback")
        result = state.get("result")
        if result is not None:
            report["result"] = {k: v for k, v in vars(result).items() if k not in ("workers", "reasons")}
            head_id = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
            report["replica_nodes"] = dict(Counter("head" if w.get("node") == head_id else "worker"
                                                   for w in result.workers))
            from kandinsky_batch.output.manifest import read_manifest
            from kandinsky_batch.output.storage import Storage

            rows = read_manifest(Storage(f"file://{out}")).to_pylist()
            report["manifest"] = {"rows": len(rows), "by_status": dict(Counter(r["status"] for r in rows)),
                                  "distinct_ids": len({r["id"] for r in rows})}
        report["timings"]["job_s"] = round(time.monotonic() - t0, 2)
    except BaseException as exc:  # noqa: BLE001 - the harness reports its own failures too
        report["harness_error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-3000:]
    finally:
        report["cpu_seconds"] = _cpu_seconds()
        shutdown_ray(report)
        if head is not None:
            head.terminate()  # `ray start --block` stops the head's processes on SIGTERM
            try:
                head.wait(30)
            except subprocess.TimeoutExpired:
                head.kill()
        # The fake provider's worker nodes are the monitor's children, not the head command's: they outlive
        # it, so they are SIGKILLed here by marker (listed for the record).
        report["reaped"] = reap(os.environ[MARKER], grace=1)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        report["timings"]["total_s"] = round(time.monotonic() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seconds-per-megaunit", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=150.0, help="the job's own limit, head start aside")
    args = parser.parse_args(argv)

    stdout = os.fdopen(os.dup(1), "w")  # exactly one line on stdout; Ray's and the job's logs go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault(MARKER, uuid.uuid4().hex)
    report: dict = {"hung": False, "error": None, "timings": {}}
    in_private_namespace(report, lambda: run_scenario(args, report))
    finish(report, args.workdir, stdout)


if __name__ == "__main__":
    main()
