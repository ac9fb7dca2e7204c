"""Multi-node fleet scenarios: a real Ray cluster of several nodes, a render job, and a fault mid-job.

Run as root inside a private network namespace, from the repository root:

    unshare -n .venv/bin/python -m tests.fleet_scenarios SCENARIO[,SCENARIO...] WORKDIR [--rows 40] [--timeout 120] ...

A second Ray node is refused unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with it Ray listens on every
interface, so this script refuses to run where any interface but loopback exists: the namespace's own `lo`
is all there is. The cluster is built like Ray's own multi-node tests build theirs (`ray.cluster_utils.Cluster`:
every node is a real raylet process of its own, all on 127.0.0.1), with token auth and logical GPUs
(2 per node) on a CPU-only host. The job is `kandinsky_batch.job.run` in a thread of this process, rendering
with the `simulated` model (sleeps, no torch), while the main thread watches the output prefix and acts:

- `baseline`:  head + a second node, no fault. The job must finish with every row ok once.
- `node_loss`: head + a second node; once some rows are committed, the node is SIGKILLed (all its Ray processes).
- `scale_up`:  head only; once some rows are committed, a node with 2 GPUs joins.
- `drain`:     head + a second node; once some rows are committed, the node is drained for preemption through the
               GCS with a deadline `--deadline` s away (as `ray drain-node` does); at the deadline it is SIGKILLed
               if it has not left by itself. Run with rows longer than the deadline (`--frames`).

Several scenarios given as `a,b:key=value:...` run in that order on one cluster (one head start for all), each
with its own job, output prefix and values (`--rows` etc. by default): a step that needs a second node starts a
fresh one if none is alive (a lost or drained node never comes back), `scale_up` needs the head alone (run it
first, or after a step that lost its node), and each step starts once the earlier steps' replicas are dead.

A job that makes no progress for `--stall` seconds after its first commit, or runs past `--timeout`, is reported
as hung and torn down (the steps after it are not run). Whatever happens, exactly one JSON line goes to stdout
(the steps' reports under `steps`, a single scenario's flat; everything else, Ray's and the job's logs included,
goes to stderr), the same object is written to WORKDIR/result.json, the cluster is shut
down and every process that carries this run's marker (`KB_FLEET_MARKER`, inherited by every Ray process) is
gone before the script exits; survivors are SIGKILLed and listed under `leftover_processes`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

from tests.fleet_cluster import Fleet, since
from tests.fleet_harness import MARKER, finish, in_private_namespace, reap, shutdown_ray
from tests.fleet_report import (committed_objects, done_on, record_hand_backs, record_manifest_adds, replicas_of,
                                report_rows)

SCENARIOS = ("baseline", "node_loss", "scale_up", "drain")
DRAIN_REASON = "spot instance reclaimed (fleet scenario)"

# Node-death detection (GCS -> raylet health checks; RAY_<name> overrides any RAY_CONFIG entry of
# src/ray/common/ray_config_def.h). Ray's defaults: first check after 5000 ms, every 3000 ms, 10000 ms timeout,
# dead after 5 misses (15-60 s). A SIGKILLed raylet refuses connections at once, so its checks fail fast whatever
# the timeout: with these a lost node is marked dead in ~2 s, while a live node on a busy 2-core host must miss
# four 2 s checks in a row first.
DETECTION_ENV = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "4",
}


def _write_dataset(path: Path, rows: int, frames: int = 0) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"clip-{i:03d}" for i in range(rows)]
    pq.write_table(pa.table({
        "id": ids,
        "prompt": [f"a fleet test scene number {i}" for i in range(rows)],
        # 10 s and 5 s clips, or every row `frames` long (rows of one known cost)
        "num_frames": [frames or (241 if i % 3 == 0 else 121) for i in range(rows)],
    }), path)
    return ids


STEP_KEYS = {"rows": int, "frames": int, "seconds_per_megaunit": float, "deadline": float, "fault_after": int,
             "stall": float, "timeout": float}
# What each scenario needs of the cluster when its job starts: a second node alive, or the head alone.
NEEDS_SECOND_NODE = {"baseline": True, "node_loss": True, "drain": True, "scale_up": False}


def parse_steps(text: str, defaults: dict) -> list[dict]:
    """`baseline,drain:rows=12:frames=121` -> one dict per step: `defaults` (the command line's), then the step's
    own `key=value`s."""
    steps = []
    for item in text.split(","):
        name, *pairs = item.split(":")
        if name not in SCENARIOS:
            raise SystemExit(f"scenario {name!r}: expected one of {', '.join(SCENARIOS)}")
        step = {**{k: defaults[k] for k in STEP_KEYS}, "scenario": name}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in STEP_KEYS:
                raise SystemExit(f"{item!r}: unknown key {key!r}; expected one of {', '.join(STEP_KEYS)}")
            step[key] = STEP_KEYS[key](value)
        steps.append(step)
    return steps


def _live_second_node(fleet: Fleet) -> str | None:
    return next((n["role"] for n in fleet.nodes
                 if n["role"] != "head" and n["removed_at_s"] is None and fleet.alive(n["role"])), None)


def _wait_actors_gone(fleet: Fleet, t0: float, seconds: float = 60) -> None:
    """Until every replica of the earlier steps is dead, so a step starts on the whole cluster's GPUs (Ray's own
    actors, such as the autoscaling coordinator the asks go to, stay)."""
    deadline = time.monotonic() + seconds
    while True:
        fleet.poll_actors(t0)
        alive = [a for a in fleet.actors.values() if a["class"] == "RenderWorker" and a["states"][-1][0] != "DEAD"]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"actors of an earlier step still not dead after {seconds:.0f} s: {alive[:3]}")
        time.sleep(0.5)


def run_plan(steps: list[dict], workdir: str, marker: str, report: dict) -> None:
    """The cluster (head, Ray's environment) started once; then each step's job and fault, in order, on it."""
    t0 = time.monotonic()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    # Every Ray process inherits this environment (the jobs' drivers connect with the same token).
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    # Ray's unix sockets must fit in 107 bytes, and its address file must not be /tmp/ray's: a short private dir.
    ray_tmp = tempfile.mkdtemp(prefix="kbf-", dir="/tmp")
    report["ray_tmpdir"] = ray_tmp
    for name in [n for n in os.environ if n.startswith("RAY_")]:
        del os.environ[name]
    os.environ.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # a second node is refused otherwise (we are in a netns)
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        **DETECTION_ENV,
    })
    report["detection_env"] = DETECTION_ENV

    fleet: Fleet | None = None
    try:
        # Ray is imported only now, after the environment is set: it reads some of it at import.
        import ray  # noqa: F401

        sinks: dict = {"added": [], "handed_back": []}
        record_manifest_adds(sinks)
        fleet = Fleet()
        record_hand_backs(sinks, fleet, t0)
        report["timings"]["head_start_s"] = fleet.add("head", t0)
        hung = None
        for index, step in enumerate(steps):
            step_report: dict = {"scenario": step["scenario"], "step": step, "hung": False, "hang_reason": None,
                                 "job_finished": False, "error": None, "events": [], "timings": {},
                                 "handed_back": []}
            report["steps"].append(step_report)
            if hung is not None:
                step_report["harness_error"] = f"not run: the step before it ({hung}) hung and cut the cluster off"
                continue
            _wait_actors_gone(fleet, t0)
            sinks["added"], sinks["handed_back"] = [], step_report["handed_back"]
            run_step(step, work / f"{index}-{step['scenario']}", fleet, sinks["added"], step_report, t0)
            if step_report["hung"]:
                hung = step["scenario"]
    except BaseException as exc:  # noqa: BLE001 - the harness reports its own failures too
        report["harness_error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-3000:]
    finally:
        shutdown_ray(report)
        if fleet is not None:
            try:
                fleet.shutdown()
            except Exception as exc:  # noqa: BLE001
                report.setdefault("cleanup_errors", []).append(f"cluster.shutdown: {exc!r}")
        report["leftover_processes"] = reap(marker, grace=15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        report["timings"]["total_s"] = since(t0)


def run_step(step: dict, work: Path, fleet: Fleet, added: list, report: dict, t0: float) -> None:
    """One scenario's job on the cluster as the earlier steps left it, and its fault; what happened, in `report`."""
    scenario = step["scenario"]
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    ids = _write_dataset(work / "prompts.parquet", step["rows"], step["frames"])
    report["rows_in"] = len(ids)
    timings = report["timings"]
    second = _live_second_node(fleet)
    if NEEDS_SECOND_NODE[scenario] and second is None:
        second = f"node{len(fleet.nodes)}"
        timings["node_start_s"] = fleet.add(second, t0)
    elif not NEEDS_SECOND_NODE[scenario]:
        if second is not None:
            raise RuntimeError(f"{scenario} starts on the head alone, but {second} is alive: run it first, or "
                               "after a step that lost its node")
        second = f"node{len(fleet.nodes)}"  # the node it adds
    report["second_node"] = second
    timings["cluster_start_s"] = since(t0)

    from kandinsky_batch.config.load import load_config
    from kandinsky_batch.job import run

    cfg = load_config(None, [
        f"input.path={work / 'prompts.parquet'}", f"output.uri=file://{out}", "output.format=npy",
        f"model.path=simulated:{step['seconds_per_megaunit']}", f"cluster.address={fleet.cluster.address}",
    ])
    state: dict = {}

    def job_main() -> None:
        try:
            state["result"] = run(cfg, progress=False)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: how ray.shutdown() ends a hung job
            state["error"] = f"{type(exc).__name__}: {exc}"
            state["traceback"] = traceback.format_exc()[-3000:]

    job_started = time.monotonic()
    job = threading.Thread(target=job_main, name="fleet-job", daemon=True)
    job.start()

    fault_after = step["fault_after"] or (max(1, step["rows"] // 5) if scenario == "node_loss" else 4)
    fault_done = scenario == "baseline"
    deadline_at = None  # drain: monotonic time of the drain's deadline, until it is handled
    last_count, last_change, first_commit, polled = 0, time.monotonic(), None, 0.0
    while job.is_alive():
        job.join(0.25)
        fleet.sample(t0)
        if time.monotonic() - polled >= 1.0:
            fleet.poll_actors(t0)
            polled = time.monotonic()
        count = len(committed_objects(out / "videos"))
        if count != last_count:
            last_count, last_change = count, time.monotonic()
            if first_commit is None:
                first_commit = since(t0)
                timings["first_commit_s"] = first_commit
        # A drain waits until the second node has rows done too: its replicas then have rows running and a speed.
        due = count >= fault_after and (scenario != "drain" or done_on(added, fleet, second) > 0)
        if not fault_done and due:
            fault_done = True
            what = {"node_loss": "kill", "drain": "drain"}.get(scenario, "add") + f" {second}"
            report["events"].append({"at_s": since(t0), "what": what, "objects": count})
            if scenario == "node_loss":
                fleet.kill(second, t0)
            elif scenario == "drain":
                deadline_at = time.monotonic() + step["deadline"]
                report["drain"] = {"at_s": since(t0), "deadline_at_s": round(deadline_at - t0, 2)}
                fleet.drain(second, step["deadline"], DRAIN_REASON)
            else:
                timings["node_start_s"] = fleet.add(second, t0)
            report["events"].append({"at_s": since(t0), "what": what + " done"})
        if deadline_at is not None and time.monotonic() >= deadline_at:
            # Ray never removes a drained node at its deadline: its owner (the cloud) kills it.
            deadline_at = None
            report["drain"]["alive_at_deadline"] = fleet.alive(second)
            if report["drain"]["alive_at_deadline"]:
                fleet.kill(second, t0)
            report["events"].append({"at_s": since(t0), "what": "deadline", "objects": count})
        stalled = first_commit is not None and time.monotonic() - last_change > step["stall"]
        if stalled or time.monotonic() - job_started > step["timeout"]:
            report["hung"] = True
            report["hang_reason"] = (f"no new object for {step['stall']:.0f} s at {count}/{len(ids)} objects"
                                     if stalled else f"job still running after {step['timeout']:.0f} s")
            report["events"].append({"at_s": since(t0), "what": "hang: ray.shutdown()", "objects": count})
            break
    fleet.poll_actors(t0)
    report["actors_at_end"] = fleet.actor_summary()
    if report["hung"]:
        # Disconnecting the driver ends the job thread's ray.wait (SystemExit); its finally flushes the manifest.
        # Ray calls made after that (the queue's replica.kill()) must fail, not silently ray.init() again.
        import ray
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
        ray.shutdown()
        job.join(15)
        report["job_thread_alive_after_shutdown"] = job.is_alive()
    fleet.sample(t0)
    timings["job_s"] = round(time.monotonic() - job_started, 2)
    report["job_finished"] = "result" in state
    if report["hung"]:
        # Whatever the job raised once its driver was cut off is an artifact of the teardown.
        report["error_after_teardown"] = state.get("error")
    else:
        report["error"] = state.get("error")
        if state.get("traceback"):
            report["traceback"] = state["traceback"]
    result = state.get("result")
    replicas = replicas_of(result, fleet) if result is not None else []
    if result is not None:
        report["result"] = {k: v for k, v in vars(result).items() if k != "workers"}
        report["replicas"] = replicas
    report.update(report_rows(out, ids, added, fleet, replicas))
    if scenario == "drain":
        report["drain"]["death"] = fleet.death(second)
        success = out / "_SUCCESS"
        report["success_counts"] = json.loads(success.read_text())["counts"] if success.exists() else None
    # The nodes as this step leaves them: what a later step does to them is not this step's.
    report["nodes"] = json.loads(json.dumps(fleet.nodes))
    report["actors"] = sorted(fleet.actors.values(), key=lambda a: a["seen_at_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", help=f"one of {', '.join(SCENARIOS)}, or several in sequence on one cluster, "
                                         "each with its own values: 'baseline,drain:rows=12:frames=121'")
    parser.add_argument("workdir")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--seconds-per-megaunit", type=float, default=0.15,
                        help="simulated cost: a 121-frame row sleeps 4.76x this, a 241-frame row 9.33x")
    parser.add_argument("--frames", type=int, default=0, help="every row this many frames (default: 241 and 121)")
    parser.add_argument("--deadline", type=float, default=3.0, help="drain: seconds from the drain to its deadline")
    parser.add_argument("--fault-after", type=int, default=0,
                        help="committed objects before the fault (default: rows/5 for node_loss, 4 for scale_up)")
    parser.add_argument("--stall", type=float, default=20.0,
                        help="seconds without a new object (after the first) that count as a hang")
    parser.add_argument("--timeout", type=float, default=120.0, help="hard limit on each job's wall time")
    args = parser.parse_args(argv)
    steps = parse_steps(args.scenario, vars(args))

    # Exactly one line on stdout: everything else (Ray, the job, warnings) goes to stderr.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    marker = os.environ.setdefault(MARKER, uuid.uuid4().hex)
    report: dict = {"marker": marker, "timings": {}, "steps": []}
    in_private_namespace(report, lambda: run_plan(steps, args.workdir, marker, report))
    if len(steps) == 1 and report["steps"]:  # one scenario: its report, flat, as a single-scenario caller reads it
        report = {**report["steps"][0], **{k: v for k, v in report.items() if k not in ("steps", "timings")},
                  "timings": {**report["timings"], **report["steps"][0]["timings"]}}
    finish(report, args.workdir, stdout)


if __name__ == "__main__":
    main()
