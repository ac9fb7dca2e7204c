"""Finding and stopping the processes a test started (by a marker), never anyone else's. No heavy imports:
the fleet scenarios import this inside their network namespace."""

from __future__ import annotations

import psutil


def marked(marker: str) -> list[psutil.Process]:
    """Live processes (zombies aside) whose command line names `marker` (e.g. the test's Ray temp dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def kill_all(procs: list[psutil.Process], timeout: float = 10) -> None:
    """SIGKILL each process by pid (one already gone is fine) and wait for them to go."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)
