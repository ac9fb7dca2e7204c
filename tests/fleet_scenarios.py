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
import re
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
from typing import Callable

from tests.processes import kill_all

SCENARIOS = ("baseline", "node_loss", "scale_up", "drain")
MARKER = "KB_FLEET_MARKER"
GPUS_PER_NODE = 2
CPUS_PER_NODE = 2

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

_WORKER_PID = re.compile(r"@[^:]*:(\d+):")
DRAIN_REASON = "spot instance reclaimed (fleet scenario)"


def _now(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def _only_loopback() -> list[str]:
    """Names of the network interfaces other than `lo` (empty inside `unshare -n`)."""
    return [name for _, name in socket.if_nameindex() if name != "lo"]


def _marked(marker: str) -> list:
    """Processes (but this one) whose environment carries our marker: every Ray process this run started."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _describe(proc) -> str:
    import psutil

    try:
        return f"{proc.pid} {proc.name()} {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def in_private_namespace(report: dict, scenario: Callable[[], None]) -> None:
    """Run `scenario` with loopback up, only as root inside a network namespace of its own (`unshare -n`)."""
    others = _only_loopback()
    if os.geteuid() != 0 or others:
        report["harness_error"] = ("refusing to run: needs root inside a private network namespace "
                                   f"(`unshare -n`); euid={os.geteuid()}, other interfaces: {others}")
        return
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    scenario()


def finish(report: dict, workdir: str, stdout) -> None:
    """The report as `workdir/result.json` and as the one line on `stdout`; then exit at once (2: the harness
    failed), so Ray's and the job's threads (a hung one included) cannot keep the process alive."""
    text = json.dumps(report, default=str, sort_keys=True)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "result.json").write_text(text + "\n")
    stdout.write(text + "\n")
    stdout.flush()
    sys.stderr.flush()
    os._exit(0 if "harness_error" not in report else 2)


def shutdown_ray(report: dict) -> None:
    """Disconnect this driver from Ray if it joined; a failure is the report's `cleanup_errors`, not the harness's."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # noqa: BLE001
        report.setdefault("cleanup_errors", []).append(f"ray.shutdown: {exc!r}")


def _reap(marker: str, grace: float) -> list[str]:
    """Wait up to `grace` s for the marked processes to exit; SIGKILL and list the ones that did not."""
    import psutil

    def alive() -> list:
        found = []
        for proc in _marked(marker):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive():
            return []
        time.sleep(0.2)
    survivors = alive()
    listed = [_describe(p) for p in survivors]
    kill_all(survivors, timeout=5)
    return listed


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


def _objects(videos: Path) -> set[str]:
    """Committed objects (whole files; in-flight temp files skipped)."""
    from kandinsky_batch.output.leftovers import TEMP_PREFIX

    try:
        return {name for name in os.listdir(videos) if not name.startswith(TEMP_PREFIX)}
    except FileNotFoundError:
        return set()


class Fleet:
    """The cluster, the nodes it ever had, and which worker process ran on which node."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        # initialize_head=False: the object exists before any process starts, so a failed start is cleaned up.
        self.cluster = Cluster(initialize_head=False, shutdown_at_exit=True)
        self.nodes: list[dict] = []
        self.pid_node: dict[int, str] = {}  # worker pid -> node role
        self.actors: dict[str, dict] = {}  # actor id -> what the GCS last said of it
        self._handles: dict[str, object] = {}

    def add(self, role: str, t0: float) -> float:
        from ray._private import ray_constants

        started = time.monotonic()
        node = self.cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE, include_dashboard=False)
        seconds = round(time.monotonic() - started, 2)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        self._handles[role] = node
        self.nodes.append({"role": role, "node_id": node.node_id, "raylet_pid": raylet,
                           "start_seconds": seconds, "added_at_s": _now(t0), "removed_at_s": None,
                           "exited_at_s": None, "marked_dead_at_s": None})
        return seconds

    def kill(self, role: str, t0: float) -> None:
        """SIGKILL every Ray process of the node (raylet, agents): a machine lost, no goodbye."""
        self.cluster.remove_node(self._handles.pop(role), allow_graceful=False)
        self._info(role)["removed_at_s"] = _now(t0)

    def drain(self, role: str, deadline_s: float, reason: str) -> None:
        """Drain the node for preemption through the GCS, as the hidden `ray drain-node --reason
        DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` does (`ray.scripts.scripts.drain_node`: a
        `GcsClient.drain_node` call with the hex node id and the deadline in ms since the epoch)."""
        import ray
        from ray.core.generated import autoscaler_pb2

        client = ray._raylet.GcsClient(address=self.cluster.address)
        accepted, why = client.drain_node(self._info(role)["node_id"],
                                          autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                          reason, int((time.time() + deadline_s) * 1000))
        if not accepted:
            raise RuntimeError(f"the drain of {role} was refused: {why}")

    def alive(self, role: str) -> bool:
        """Whether the node's raylet still runs (it exits by itself once a drained node holds nothing)."""
        import psutil

        try:
            return psutil.Process(self._info(role)["raylet_pid"]).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def death(self, role: str) -> dict:
        """What the GCS recorded of the node's death: the reason's name and message."""
        from ray.core.generated import common_pb2

        node = next((n for n in self.cluster.global_state.node_table()
                     if n.get("NodeID") == self._info(role)["node_id"]), {})
        reason = node.get("DeathReason")
        return {"alive": node.get("Alive"), "message": node.get("DeathReasonMessage"),
                "reason": common_pb2.NodeDeathInfo.Reason.Name(reason) if isinstance(reason, int) else reason}

    def _info(self, role: str) -> dict:
        return next(n for n in self.nodes if n["role"] == role)

    def sample(self, t0: float) -> None:
        """Note the worker processes under each live raylet, and when the GCS marks a removed node dead."""
        import psutil

        for info in self.nodes:
            if info["removed_at_s"] is None and info["exited_at_s"] is None:
                if not self.alive(info["role"]):
                    info["exited_at_s"] = _now(t0)
                    continue
                try:
                    for child in psutil.Process(info["raylet_pid"]).children(recursive=True):
                        self.pid_node.setdefault(child.pid, info["role"])
                except psutil.Error:
                    pass
            elif info["marked_dead_at_s"] is None:
                try:
                    table = self.cluster.global_state.node_table()
                except Exception:  # noqa: BLE001 - a developer API; tolerate its changes
                    table = []
                if any(n.get("NodeID") == info["node_id"] and not n.get("Alive") for n in table):
                    info["marked_dead_at_s"] = _now(t0)

    def poll_actors(self, t0: float) -> None:
        """Every actor the GCS knows: its state and the node it is (or was) on; pending ones have no node."""
        try:
            table = self.cluster.global_state.actor_table(None)
        except Exception:  # noqa: BLE001 - a developer API; tolerate its changes
            return
        for actor_id, info in table.items():
            node = (info.get("Address") or {}).get("NodeID")
            entry = self.actors.setdefault(actor_id, {"class": info.get("ActorClassName"), "seen_at_s": _now(t0),
                                                      "node_role": None, "pid": None, "states": []})
            entry["node_role"] = self.role_of(node) or entry["node_role"]
            entry["pid"] = info.get("Pid") or entry["pid"]
            if entry["pid"] and entry["node_role"]:
                self.pid_node.setdefault(entry["pid"], entry["node_role"])
            if not entry["states"] or entry["states"][-1][0] != info.get("State"):
                entry["states"].append((info.get("State"), _now(t0)))

    def actor_summary(self) -> dict:
        """Counts of actors by (current state, node); PENDING_CREATION with no node = could not be placed."""
        counts = Counter(f"{a['states'][-1][0]}@{a['node_role'] or 'nowhere'}" for a in self.actors.values())
        return dict(sorted(counts.items()))

    def role_of(self, node_id: str | None) -> str | None:
        return next((n["role"] for n in self.nodes if n["node_id"] == node_id), None)

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _record_manifest_adds(sinks: dict) -> None:
    """Keep every manifest row the job hands its writer (the final compaction drops superseded ones) in
    `sinks["added"]`, the current step's list."""
    from kandinsky_batch.output import manifest

    writer = getattr(manifest, "ManifestWriter", None)
    if writer is None or not hasattr(writer, "add"):
        return
    original = writer.add

    def add(self, row: dict) -> None:
        sinks["added"].append({k: row.get(k) for k in ("id", "status", "worker", "attempts", "error")})
        return original(self, row)

    writer.add = add


def _record_hand_backs(sinks: dict, fleet: Fleet, t0: float) -> None:
    """Keep every batch the work queue takes back from a replica (a drain's) in `sinks["handed_back"]`: when, how
    many rows, from which node."""
    from kandinsky_batch.fleet.scheduler import WorkQueue

    original = getattr(WorkQueue, "take_back", None)
    if original is None:  # a work queue that knows no drains (the comparison run of an older checkout)
        return

    def take_back(self, slot, flights):
        rows = original(self, slot, flights)
        if rows:
            sinks["handed_back"].append({"at_s": _now(t0), "rows": rows,
                                         "node_role": fleet.role_of(slot.info.get("node")),
                                         "ids": [task.id for flight in flights for task, _ in flight.batch]})
        return rows

    WorkQueue.take_back = take_back


def _done_on(added: list[dict], fleet: Fleet, role: str) -> int:
    """Rows the job has settled that a replica on the node `role` rendered (known from its worker's pid)."""
    pids = [_WORKER_PID.search(str(row.get("worker") or "")) for row in added]
    return sum(1 for match in pids if match and fleet.pid_node.get(int(match.group(1))) == role)


def _report_rows(out: Path, ids: list[str], added: list[dict], fleet: Fleet | None,
                 replicas: list[dict]) -> dict:
    """What the output prefix and the job's manifest rows say happened to each input row."""
    from kandinsky_batch.output.manifest import read_manifest
    from kandinsky_batch.output.storage import Storage

    report: dict = {}
    try:
        rows = read_manifest(Storage(f"file://{out}")).to_pylist() if (out / "manifest").exists() else []
    except Exception as exc:  # noqa: BLE001 - report, don't crash the harness
        rows = []
        report["manifest_error"] = f"{type(exc).__name__}: {exc}"
    by_id = Counter(r["id"] for r in rows)
    ok_ids = [r["id"] for r in rows if r["status"] == "ok"]
    missing = [i for i in ids if i not in by_id]
    report["manifest"] = {
        "rows": len(rows),
        "by_status": dict(Counter(r["status"] for r in rows)),
        "missing_ids": missing[:10], "n_missing": len(missing),
        "ids_with_several_rows": sorted(i for i, n in by_id.items() if n > 1)[:10],
        "unknown_ids": sorted(set(by_id) - set(ids))[:10],
        "ok_rows": len(ok_ids), "ok_distinct_ids": len(set(ok_ids)),
        "max_attempts_seen": max((r["attempts"] or 0 for r in rows), default=0),
        "failed_errors": sorted({(r["error"] or "")[:160] for r in rows if r["status"] == "failed"})[:5],
    }
    ok_added = Counter(r["id"] for r in added if r["status"] == "ok")
    report["rows_added"] = {
        "total": len(added),
        "by_status": dict(Counter(r["status"] for r in added)),
        "ok_ids_twice": sorted(i for i, n in ok_added.items() if n > 1)[:10],
        "n_ok_ids_twice": sum(1 for n in ok_added.values() if n > 1),
        "failed_errors": sorted({(r["error"] or "")[:160] for r in added if r["status"] == "failed"})[:5],
    }
    objects = _objects(out / "videos")
    stems = {name.rsplit(".", 1)[0] for name in objects}
    report["objects"] = {
        "count": len(objects), "ok_rows": len(ok_ids),
        "without_ok_row": sorted(stems - set(ok_ids))[:10],
        "ok_rows_without_object": sorted(set(ok_ids) - stems)[:10],
    }
    # Which worker (and so which node) rendered the rows that ended ok.
    workers: dict[str, dict] = {}
    for row in rows:
        if row["status"] != "ok" or not row.get("worker"):
            continue
        entry = workers.setdefault(row["worker"], {"rows": 0, "node_role": None})
        entry["rows"] += 1
        # The node of a worker: from the job's own replica info ("node"), else from its pid.
        entry["node_role"] = next((r["node_role"] for r in replicas if r.get("worker") == row["worker"]), None)
        match = _WORKER_PID.search(row["worker"])
        if entry["node_role"] is None and match and fleet is not None:
            entry["node_role"] = fleet.pid_node.get(int(match.group(1)))
    report["workers"] = workers
    report["ok_worker_by_id"] = {row["id"]: row["worker"] for row in rows if row["status"] == "ok"}
    by_role: Counter = Counter()
    for entry in workers.values():
        by_role[entry["node_role"] or "unknown"] += entry["rows"]
    report["ok_rows_by_node"] = dict(by_role)
    return report


def _replicas(result, fleet: Fleet | None) -> list[dict]:
    """`result.workers` (one info dict per replica slot), with the node each ran on where it can be told."""
    found = []
    for info in list(getattr(result, "workers", None) or []):
        info = dict(info) if isinstance(info, dict) else {"info": repr(info)}
        node = info.get("node")
        role = fleet.role_of(node) if (fleet and node) else None
        if role is None and fleet is not None:
            match = _WORKER_PID.search(str(info.get("worker", "")))
            role = fleet.pid_node.get(int(match.group(1))) if match else None
        info["node_role"] = role
        info.setdefault("node", next((n["node_id"] for n in fleet.nodes if n["role"] == role), None)
                        if fleet is not None else None)
        found.append(info)
    return found


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
        _record_manifest_adds(sinks)
        fleet = Fleet()
        _record_hand_backs(sinks, fleet, t0)
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
        report["leftover_processes"] = _reap(marker, grace=15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        report["timings"]["total_s"] = _now(t0)


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
    timings["cluster_start_s"] = _now(t0)

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
        count = len(_objects(out / "videos"))
        if count != last_count:
            last_count, last_change = count, time.monotonic()
            if first_commit is None:
                first_commit = _now(t0)
                timings["first_commit_s"] = first_commit
        # A drain waits until the second node has rows done too: its replicas then have rows running and a speed.
        due = count >= fault_after and (scenario != "drain" or _done_on(added, fleet, second) > 0)
        if not fault_done and due:
            fault_done = True
            what = {"node_loss": "kill", "drain": "drain"}.get(scenario, "add") + f" {second}"
            report["events"].append({"at_s": _now(t0), "what": what, "objects": count})
            if scenario == "node_loss":
                fleet.kill(second, t0)
            elif scenario == "drain":
                deadline_at = time.monotonic() + step["deadline"]
                report["drain"] = {"at_s": _now(t0), "deadline_at_s": round(deadline_at - t0, 2)}
                fleet.drain(second, step["deadline"], DRAIN_REASON)
            else:
                timings["node_start_s"] = fleet.add(second, t0)
            report["events"].append({"at_s": _now(t0), "what": what + " done"})
        if deadline_at is not None and time.monotonic() >= deadline_at:
            # Ray never removes a drained node at its deadline: its owner (the cloud) kills it.
            deadline_at = None
            report["drain"]["alive_at_deadline"] = fleet.alive(second)
            if report["drain"]["alive_at_deadline"]:
                fleet.kill(second, t0)
            report["events"].append({"at_s": _now(t0), "what": "deadline", "objects": count})
        stalled = first_commit is not None and time.monotonic() - last_change > step["stall"]
        if stalled or time.monotonic() - job_started > step["timeout"]:
            report["hung"] = True
            report["hang_reason"] = (f"no new object for {step['stall']:.0f} s at {count}/{len(ids)} objects"
                                     if stalled else f"job still running after {step['timeout']:.0f} s")
            report["events"].append({"at_s": _now(t0), "what": "hang: ray.shutdown()", "objects": count})
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
    replicas = _replicas(result, fleet) if result is not None else []
    if result is not None:
        report["result"] = {k: v for k, v in vars(result).items() if k != "workers"}
        report["replicas"] = replicas
    report.update(_report_rows(out, ids, added, fleet, replicas))
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
