"""A running job's heartbeat: a small JSON object `_RUNNING` at the output root, for `kandinsky-batch status`.

`run` writes it once the job has passed preflight, refreshes it about every 10 s from the work queue's tick, and
deletes it after `_SUCCESS`. A driver that dies leaves it behind, ageing: a reader tells a live job from a dead
one by `updated_at`. It is information only: nothing waits on it or is refused because of it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone

from kandinsky_batch.output.layout import HEARTBEAT_KEY
from kandinsky_batch.output.storage import Storage

INTERVAL_SECONDS = 10.0
FRESH_SECONDS = 60.0
"""A heartbeat older than this is stale: its job most likely died."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Heartbeat:
    """Writes `_RUNNING` = {run_id, host, pid, started_at, updated_at, rows_total, rows_settled}."""

    def __init__(self, storage: Storage, run_id: str, rows_total: int, interval: float = INTERVAL_SECONDS,
                 clock=time.monotonic):
        self.storage, self.interval, self.clock = storage, interval, clock
        self.state = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": _now(),
                      "updated_at": None, "rows_total": rows_total, "rows_settled": 0}
        self._next = 0.0

    def _write(self) -> None:
        self.state["updated_at"] = _now()
        self.storage.put_bytes(HEARTBEAT_KEY, (json.dumps(self.state, indent=2) + "\n").encode("utf-8"))
        self._next = self.clock() + self.interval

    def start(self) -> "Heartbeat":
        self._write()
        return self

    def beat(self, rows_settled: int) -> None:
        """Record progress; written at most once per `interval` (call it as often as convenient)."""
        self.state["rows_settled"] = rows_settled
        if self.clock() >= self._next:
            self._write()

    def stop(self) -> None:
        """The job finished: remove the heartbeat (after `_SUCCESS`)."""
        self.storage.delete(HEARTBEAT_KEY)


def read(storage: Storage) -> dict | None:
    """The heartbeat an output prefix holds, or None."""
    try:
        return json.loads(storage.get_bytes(HEARTBEAT_KEY))
    except FileNotFoundError:
        return None


def age_seconds(beat: dict, now: datetime | None = None) -> float:
    """Seconds since the heartbeat was last written."""
    now = now or datetime.now(timezone.utc)
    return (now - datetime.fromisoformat(beat["updated_at"])).total_seconds()
