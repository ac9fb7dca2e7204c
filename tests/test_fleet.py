"""A real multi-node Ray fleet: a node lost mid-job, a node added mid-job, a node drained mid-job, and the
fault-free baseline.

The scenarios of `tests/fleet_scenarios.py` run one after another on one cluster, in a subprocess inside a private
network namespace (`unshare -n`, root only): Ray must listen on every interface for a second node to join, and
there the only interface is the namespace's own loopback. Each scenario reports what happened; these tests hold
it to the job's promises: every input row ends with exactly one manifest row, ok, and exactly one object, and no
Ray process of the scenarios outlives them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.fleet_harness import MARKER

ROOT = Path(__file__).resolve().parents[1]
ROWS = 40


def _unshare_problem() -> str | None:
    """Why a private network namespace cannot be made here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root for `unshare -n` (a private network namespace for a multi-node Ray)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (util-linux / iproute2) for a private network namespace"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                           timeout=30, check=False)
    if probe.returncode != 0:
        return f"`unshare -n` does not work here: {probe.stderr.strip()[:200]}"
    return None


_PROBLEM = _unshare_problem()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fleet,
    pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or ""),
]


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return [p for p in found if p.pid != os.getpid()]


def _kill_marked(marker: str) -> list[str]:
    """SIGKILL whatever the scenario left behind (by pid, only processes carrying its marker); list them."""
    procs = _marked(marker)
    names = []
    for proc in procs:
        try:
            names.append(f"{proc.pid} {proc.name()}")
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return names


def run_scenarios(steps: str, work: Path, timeout: float) -> dict[str, dict]:
    """Run scenarios in sequence on one cluster in one network namespace (`steps`: the harness's
    `name[:key=value...],...`); each one's report, with the run's own checks (a cluster, a clean teardown, no
    process left behind) made first."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env[MARKER] = marker
    # Ray's workers import this checkout, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    log = work / "scenarios.log"
    cmd = ["unshare", "-n", sys.executable, "-m", "tests.fleet_scenarios", steps, str(work / "run")]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            left = _kill_marked(marker)
            pytest.fail(f"scenarios {steps} ran past {timeout} s (their own hang detection failed); "
                        f"killed {left}; log tail:\n{log.read_text()[-3000:]}")
    left = _kill_marked(marker)
    assert not left, f"scenarios {steps} left Ray processes running: {left}"
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert proc.returncode == 0 and len(lines) == 1, \
        f"scenarios {steps}: exit {proc.returncode}, stdout {stdout[-2000:]!r}; log tail:\n{log.read_text()[-3000:]}"
    run = json.loads(lines[0])
    # The harness itself worked: a cluster, the jobs, a clean teardown.
    assert "harness_error" not in run, run
    assert run["leftover_processes"] == [], run["leftover_processes"]
    assert not run.get("cleanup_errors"), run["cleanup_errors"]
    return {step["scenario"]: step for step in run["steps"]}


DRAIN_ROWS = 12
DRAIN_DEADLINE = 3.0
# Every row 121 frames at 0.84 s per megaunit: 4 s each (`pipelines.simulated`), longer than the deadline.
DRAIN_STEP = f"drain:rows={DRAIN_ROWS}:frames=121:seconds_per_megaunit=0.84:deadline={DRAIN_DEADLINE}"
# One cluster for the four (one head start instead of four): the baseline's and the loss's second node is started
# for them, the scale-up starts on the head alone (the lost node does not come back) and adds one, which the drain
# then takes away. Each step has its own job and output and starts once the step before it left no replica.
# The scale-up adds its node at the first commit: a node's start takes seconds on a loaded host, and rows must be
# left for it when its replicas are up.
STEPS = f"baseline,node_loss,scale_up:fault_after=1,{DRAIN_STEP}"
STEPS_TIMEOUT = 600  # the steps' own limits: each job 120 s, stall 20 s; start-up and teardown


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict[str, dict]:
    return run_scenarios(STEPS, tmp_path_factory.mktemp("fleet"), STEPS_TIMEOUT)


def scenario(scenarios: dict[str, dict], name: str, rows: int = ROWS) -> dict:
    """One step's report, after checking that it ran (an earlier step's hang cuts the later ones off)."""
    report = scenarios[name]
    assert "harness_error" not in report, report["harness_error"]
    assert report["rows_in"] == rows
    return report


def _summary(report: dict) -> str:
    keep = ("hung", "hang_reason", "error", "events", "result", "manifest", "rows_added", "objects",
            "ok_rows_by_node", "actors_at_end", "timings", "drain", "handed_back", "success_counts", "second_node")
    return json.dumps({k: report.get(k) for k in keep}, default=str, indent=1)


def assert_every_row_once(report: dict, rows: int = ROWS) -> None:
    """The job finished, and each input row has exactly one manifest row, ok, and exactly one object."""
    summary = _summary(report)
    assert not report["hung"], summary
    assert report["job_finished"] and report["error"] is None, summary + report.get("traceback", "")
    manifest = report["manifest"]
    assert manifest["rows"] == rows and manifest["n_missing"] == 0, summary
    assert manifest["by_status"] == {"ok": rows}, summary
    assert manifest["ok_distinct_ids"] == rows and not manifest["ids_with_several_rows"], summary
    assert report["rows_added"]["n_ok_ids_twice"] == 0, summary  # no row committed ok twice
    objects = report["objects"]
    assert objects["count"] == rows == objects["ok_rows"], summary
    assert not objects["without_ok_row"] and not objects["ok_rows_without_object"], summary
    result = report["result"]
    assert (result["rows"], result["ok"], result["failed"], result["invalid"]) == (rows, rows, 0, 0), summary


def test_baseline_two_nodes(scenarios):
    """Head and a second node, 2 logical GPUs each, no fault: one replica per GPU, rows on both nodes."""
    report = scenario(scenarios, "baseline")
    assert_every_row_once(report)
    assert len(report["replicas"]) == 4, _summary(report)
    assert report["ok_rows_by_node"].get("head", 0) > 0, _summary(report)
    assert report["ok_rows_by_node"].get(report["second_node"], 0) > 0, _summary(report)


def test_node_lost_mid_job(scenarios):
    """SIGKILL of the second node's Ray processes mid-job: the job still renders every row, once."""
    report = scenario(scenarios, "node_loss")
    summary = _summary(report)
    second = report["second_node"]
    node = next(n for n in report["nodes"] if n["role"] == second)  # as the step left it
    assert node["removed_at_s"] is not None, summary
    assert node["marked_dead_at_s"] is not None, summary  # the GCS noticed within the step
    assert any(e["what"] == f"kill {second}" and e["objects"] < ROWS for e in report["events"]), summary
    assert_every_row_once(report)


def test_node_added_mid_job(scenarios):
    """A node with 2 GPUs joins a head-only cluster mid-job: its new replicas take part of the rows."""
    report = scenario(scenarios, "scale_up")
    summary = _summary(report)
    second = report["second_node"]
    added = next(e for e in report["events"] if e["what"] == f"add {second}")
    assert added["objects"] < ROWS, summary  # rows were left for the new node
    assert_every_row_once(report)
    assert report["ok_rows_by_node"].get(second, 0) > 0, summary


def test_node_drained_mid_job(scenarios):
    """Node 2 drained for preemption through the GCS mid-job, its deadline shorter than the rows in flight: their
    replicas hand those rows back before the deadline without an attempt and retire, node 2 leaves by itself with
    the drain's death reason (or is SIGKILLed at the deadline), and every row is rendered once."""
    report = scenario(scenarios, "drain", rows=DRAIN_ROWS)
    summary = _summary(report)
    second = report["second_node"]
    assert_every_row_once(report, rows=DRAIN_ROWS)
    drain, result = report["drain"], report["result"]
    # No row lost to the drain counted an attempt: every row rendered at its first.
    assert report["manifest"]["max_attempts_seen"] == 1, summary
    assert result["restarts"] == 0 and result["retries"] == 0, summary
    # Both of node 2's replicas retired as drains; the rows running there went back before the deadline.
    assert result["drains"] == 2, summary
    back = [b for b in report["handed_back"] if b["node_role"] == second]
    assert back and result["drained"] == sum(b["rows"] for b in back), summary
    assert all(drain["at_s"] < b["at_s"] < drain["deadline_at_s"] for b in back), summary
    # Each was rendered again on the head node, once.
    handed = {i for b in back for i in b["ids"]}
    assert {report["workers"][report["ok_worker_by_id"][i]]["node_role"] for i in handed} == {"head"}, summary
    # No replacement started: the drained node's GPUs left the fleet, and the head's were taken.
    assert sorted(r["node_role"] for r in report["replicas"]) == ["head", "head", second, second], summary
    # _SUCCESS reports the drains apart from failures.
    counts = report["success_counts"]
    assert (counts["drains"], counts["drained"], counts["restarts"]) == (2, result["drained"], 0), summary
    # The replicas retired in time, so node 2 left by itself, before its deadline, and its death is the drain's.
    assert drain["alive_at_deadline"] is False, summary
    assert drain["death"]["reason"] == "AUTOSCALER_DRAIN_PREEMPTED", summary
    assert drain["death"]["message"] == "spot instance reclaimed (fleet scenario)", summary
