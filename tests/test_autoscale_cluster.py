"""A job on an empty GPU pool gets nodes from Ray's fake multi-node autoscaler, renders on them, and leaves no ask.

`tests/autoscale_scenario.py` runs in a subprocess inside a private network namespace (`unshare -n`, root only),
as the fleet scenarios do, and reports one JSON line; this test holds it to the promises: every row ok once, every
replica on a launched GPU node (the head has none), the ask shaped like a replica and within `cluster.replicas`,
and the stored request empty at the end. Node counts are not asserted (upstream's launcher can double-launch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.autoscale_scenario import REPLICAS
from tests.fleet_harness import MARKER
from tests.test_fleet import _PROBLEM, _kill_marked

ROOT = Path(__file__).resolve().parents[1]
ROWS = 16
SCENARIO_TIMEOUT = 300  # the scenario's own limits: head 90 s, job 150 s, plus teardown

pytestmark = [pytest.mark.slow, pytest.mark.fleet, pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")]


def test_an_empty_gpu_pool_is_grown_for_the_work_and_the_ask_is_withdrawn(tmp_path):
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env[MARKER] = marker
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    log = tmp_path / "scenario.log"
    cmd = ["unshare", "-n", sys.executable, "-m", "tests.autoscale_scenario", str(tmp_path / "work"),
           "--rows", str(ROWS)]
    with open(log, "w") as stderr:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                              timeout=SCENARIO_TIMEOUT, check=False)
    left = _kill_marked(marker)
    assert not left, f"the scenario left processes running: {left}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 0 and len(lines) == 1, f"exit {proc.returncode}; log tail:\n{log.read_text()[-3000:]}"
    report = json.loads(lines[0])
    summary = json.dumps({k: v for k, v in report.items() if k != "reaped"}, default=str, indent=1)
    assert "harness_error" not in report and not report.get("cleanup_errors"), summary
    assert not report["hung"] and report["error"] is None, summary

    assert report["manifest"] == {"rows": ROWS, "by_status": {"ok": ROWS}, "distinct_ids": ROWS}, summary
    assert report["result"]["ok"] == ROWS and report["result"]["failed"] == 0, summary
    # The head has no GPU: every replica ran on a node the autoscaler launched for the ask.
    assert report["max_gpu_nodes_alive"] >= 1 and set(report["replica_nodes"]) == {"worker"}, summary
    asks = [entry["ask"] for entry in report["asks"] if entry["ask"]]
    assert asks, summary  # something was asked while rows were left
    assert all(ask == [{"CPU": 1, "GPU": 1}] * len(ask) and len(ask) <= REPLICAS for ask in asks), summary
    assert report["final_ask"] == [], summary  # withdrawn: the stored request is empty at the end
