"""What a fleet scenario's job did, read back: the manifest rows it handed its writer, the batches taken back from
draining replicas, the objects under the output prefix, and which node rendered each row."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from tests.fleet_cluster import Fleet, since

_WORKER_PID = re.compile(r"@[^:]*:(\d+):")


def committed_objects(videos: Path) -> set[str]:
    """Committed objects (whole files; in-flight temp files skipped)."""
    from kandinsky_batch.output.leftovers import TEMP_PREFIX

    try:
        return {name for name in os.listdir(videos) if not name.startswith(TEMP_PREFIX)}
    except FileNotFoundError:
        return set()


def record_manifest_adds(sinks: dict) -> None:
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


def record_hand_backs(sinks: dict, fleet: Fleet, t0: float) -> None:
    """Keep every batch the work queue takes back from a replica (a drain's) in `sinks["handed_back"]`: when, how
    many rows, from which node."""
    from kandinsky_batch.fleet.scheduler import WorkQueue

    original = getattr(WorkQueue, "take_back", None)
    if original is None:  # a work queue that knows no drains (the comparison run of an older checkout)
        return

    def take_back(self, slot, flights):
        rows = original(self, slot, flights)
        if rows:
            sinks["handed_back"].append({"at_s": since(t0), "rows": rows,
                                         "node_role": fleet.role_of(slot.info.get("node")),
                                         "ids": [task.id for flight in flights for task, _ in flight.batch]})
        return rows

    WorkQueue.take_back = take_back


def done_on(added: list[dict], fleet: Fleet, role: str) -> int:
    """Rows the job has settled that a replica on the node `role` rendered (known from its worker's pid)."""
    pids = [_WORKER_PID.search(str(row.get("worker") or "")) for row in added]
    return sum(1 for match in pids if match and fleet.pid_node.get(int(match.group(1))) == role)


def report_rows(out: Path, ids: list[str], added: list[dict], fleet: Fleet | None,
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
    found = committed_objects(out / "videos")
    stems = {name.rsplit(".", 1)[0] for name in found}
    report["objects"] = {
        "count": len(found), "ok_rows": len(ok_ids),
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


def replicas_of(result, fleet: Fleet | None) -> list[dict]:
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
