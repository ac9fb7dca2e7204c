"""A job's console: the `checking input…` line, the phase and progress bar on stderr, and the live metrics fed
from the rows as they settle."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

from kandinsky_batch.fleet.metrics import JobMetrics
from kandinsky_batch.fleet.scheduler import WorkQueue
from kandinsky_batch.intake.windows import Intake

METRICS_SECONDS = 2.0


@contextmanager
def checking(enabled: bool, stream=None):
    """`checking input…` on a terminal while the input is checked, erased after: a refused job's stderr stays
    its one `error:` line. Not written to a file or a pipe, where it could not be taken back."""
    stream = stream or sys.stderr
    shown = enabled and stream.isatty()
    if shown:
        stream.write("checking input…")
        stream.flush()
    try:
        yield
    finally:
        if shown:
            stream.write("\r\x1b[K")  # back to the line's start, erase it
            stream.flush()


def loading(labels: list[str], replicas: int) -> str:
    """The phase while replicas load their models: `loading model tiny on 2 replicas…`."""
    return (f"loading model{'s' if len(labels) > 1 else ''} {', '.join(labels)} "
            f"on {replicas} replica{'' if replicas == 1 else 's'}…")


class Progress:
    """The progress bar and the live metrics, fed from the manifest rows as they are committed.

    Until the first batch goes to a replica the bar cannot move (Ray starts, models load: tens of seconds), so
    its description names the phase the job is in; then it says `rendering`."""

    def __init__(self, total: int, run_id: str, enabled: bool, stream=None):
        stream = stream or sys.stderr
        self.bar = tqdm(total=total, unit="row", disable=not enabled, desc="reading rows…", file=stream,
                        mininterval=0.5 if stream.isatty() else 10)
        self.metrics = JobMetrics(run_id)
        self.counts = {"ok": 0, "failed": 0, "invalid": 0, "skipped": 0}
        self._next_metrics = 0.0
        self.rendering = False

    def phase(self, text: str) -> None:
        """Show what the job is doing now, at once (not at the bar's next refresh)."""
        self.bar.set_description_str(text, refresh=True)

    def settled(self, status: str) -> None:
        self.counts[status] += 1
        self.metrics.settled(status)

    def update(self, intake: Intake, queue: WorkQueue | None = None) -> None:
        if queue is not None and queue.first_dispatch is not None and not self.rendering:
            self.rendering = True
            self.phase("rendering")
        self.counts["skipped"] = intake.counts.skipped
        done = sum(self.counts.values())
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(failed=self.counts["failed"], invalid=self.counts["invalid"], refresh=False)
        now = time.monotonic()
        if queue is not None and now >= self._next_metrics:
            self._next_metrics = now + METRICS_SECONDS
            self.metrics.queued(queue.queued())
            self.metrics.replicas_lost(restarts=queue.restarts, drains=queue.drains.drains)
            for slot in queue.slots:
                if slot.info:
                    self.metrics.busy(slot.info["worker"], slot.busy_fraction(now))
            self.metrics.tick()
