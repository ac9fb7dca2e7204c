"""What the multi-node scenario scripts (tests/fleet_scenarios.py, tests/autoscale_scenario.py) share: the private
network namespace they insist on, the marker every process of a run carries and the reaping of those processes,
and the one-line report. No heavy imports: they run inside the namespace before Ray is imported."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from tests.processes import kill_all

MARKER = "KB_FLEET_MARKER"


def _only_loopback() -> list[str]:
    """Names of the network interfaces other than `lo` (empty inside `unshare -n`)."""
    return [name for _, name in socket.if_nameindex() if name != "lo"]


def marked_processes(marker: str) -> list:
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


def reap(marker: str, grace: float) -> list[str]:
    """Wait up to `grace` s for the marked processes to exit; SIGKILL and list the ones that did not."""
    import psutil

    def alive() -> list:
        found = []
        for proc in marked_processes(marker):
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
