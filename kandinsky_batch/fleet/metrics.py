"""Live figures of a running job, exported through `ray.util.metrics` to Ray's Prometheus endpoint.

Ray exports every metric under the `ray_` namespace and gives counters the `_total` suffix, so a scrape shows
`ray_kandinsky_batch_rows_total{run_id,status}`, `ray_kandinsky_batch_rows_queued{run_id}`,
`ray_kandinsky_batch_replica_busy_fraction{run_id,replica}`, `ray_kandinsky_batch_videos_per_hour{run_id}` and
`ray_kandinsky_batch_replicas_lost_total{run_id,cause}` (cause `failure`: a replica died and was rebuilt;
`drain`: its node was drained or its actor preempted, it retired) (plus Ray's own labels: SessionName, ...).

Metrics are a view of the job, never part of it: every export is guarded, and a failure is logged once.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

ROWS = "kandinsky_batch_rows_total"  # named with its suffix: the same Prometheus name on Ray's OpenCensus path
QUEUED = "kandinsky_batch_rows_queued"
BUSY = "kandinsky_batch_replica_busy_fraction"
RATE = "kandinsky_batch_videos_per_hour"
LOST = "kandinsky_batch_replicas_lost_total"
CAUSES = ("failure", "drain")
STATUSES = ("ok", "failed", "invalid")


class JobMetrics:
    """Live job figures exported through ray.util.metrics (tagged with the job's run_id).

    Ray 2.60 forgets a gauge that is not set again within two export intervals (`metrics_report_interval_ms`,
    10 s by default), so the last values are kept here and `tick` sets every gauge again. Ray drops what is
    recorded before `ray.init`, so instruments are made on first use once Ray is up; until then values only
    accumulate here, and rows settled meanwhile are counted when the instruments appear.
    """

    def __init__(self, run_id: str, backend=None):
        # `backend` is anything with `Counter` and `Gauge` shaped like ray.util.metrics' (tests pass a fake).
        self.run_id = str(run_id)
        self.started = time.monotonic()  # the clock `tick(now)` takes
        self.counts = dict.fromkeys(STATUSES, 0)
        self.rows_queued = 0
        self.busy_fraction: dict[str, float] = {}
        self.videos_per_hour = 0.0
        self._backend = backend
        self._instruments = None  # (rows, queued, busy, rate, lost) once made; False once making them failed
        self._unexported = dict.fromkeys(STATUSES, 0)
        self.lost = dict.fromkeys(CAUSES, 0)
        self._lost_unexported = dict.fromkeys(CAUSES, 0)
        self._failed = False

    def settled(self, status: str, count: int = 1) -> None:
        """`count` rows reached a final status: ok, failed or invalid (another status is counted as given)."""
        if count <= 0:
            return
        status = str(status)
        self.counts[status] = self.counts.get(status, 0) + count
        self._unexported[status] = self._unexported.get(status, 0) + count
        made = self._made()
        if made:
            self._export_counts(made[0])

    def queued(self, count: int) -> None:
        """Rows waiting for a replica (not yet handed out, or handed back for a retry)."""
        self.rows_queued = count
        made = self._made()
        if made:
            self._guard(made[1].set, count, {"run_id": self.run_id})

    def replicas_lost(self, restarts: int, drains: int) -> None:
        """The job's totals so far of replicas lost to failures (`restarts`) and to drains, counted apart."""
        for cause, total in zip(CAUSES, (restarts, drains)):
            if total > self.lost[cause]:
                self._lost_unexported[cause] += total - self.lost[cause]
                self.lost[cause] = total
        made = self._made()
        if made:
            self._export_lost(made[4])

    def busy(self, replica: str, fraction: float) -> None:
        """Share of recent wall time `replica` spent rendering, 0..1."""
        replica = str(replica)
        self.busy_fraction[replica] = fraction
        made = self._made()
        if made:
            self._guard(made[2].set, fraction, {"run_id": self.run_id, "replica": replica})

    def tick(self, now: float | None = None) -> None:
        """Recompute videos per hour (ok rows this run / hours since start) and set every gauge again."""
        hours = ((time.monotonic() if now is None else now) - self.started) / 3600
        self.videos_per_hour = self.counts["ok"] / hours if hours > 0 else 0.0
        made = self._made()
        if not made:
            return
        rows, queued, busy, rate, lost = made
        if any(self._unexported.values()):
            self._export_counts(rows)
        self._export_lost(lost)
        tags = {"run_id": self.run_id}
        self._guard(rate.set, self.videos_per_hour, tags)
        self._guard(queued.set, self.rows_queued, tags)
        for replica, fraction in self.busy_fraction.items():
            self._guard(busy.set, fraction, {"run_id": self.run_id, "replica": replica})

    def _made(self):
        """The instruments, made on first use once the backend is there; None while it is not, or is broken."""
        if self._instruments is None:
            backend = self._backend
            if backend is None:
                import ray

                if not ray.is_initialized():
                    return None
                from ray.util import metrics as backend
            try:
                self._instruments = (
                    backend.Counter(ROWS, "Rows of the job that reached a final status this run.",
                                    tag_keys=("run_id", "status")),
                    backend.Gauge(QUEUED, "Rows waiting for a replica.", tag_keys=("run_id",)),
                    backend.Gauge(BUSY, "Share of recent wall time a replica spent rendering (0-1).",
                                  tag_keys=("run_id", "replica")),
                    backend.Gauge(RATE, "Rows rendered ok this run per hour since the job started.",
                                  tag_keys=("run_id",)),
                    backend.Counter(LOST, "Replicas lost this run: to a failure (rebuilt) or a drain of their node "
                                    "(retired, its rows back without an attempt).", tag_keys=("run_id", "cause")),
                )
            except Exception:  # noqa: BLE001 - metrics must never fail the job
                logger.warning("job metrics disabled: could not create them", exc_info=True)
                self._instruments = False
        return self._instruments or None

    def _export_counts(self, rows) -> None:
        for status, count in self._unexported.items():
            if count:
                self._unexported[status] = 0
                self._guard(rows.inc, count, {"run_id": self.run_id, "status": status})

    def _export_lost(self, lost) -> None:
        for cause, count in self._lost_unexported.items():
            if count:
                self._lost_unexported[cause] = 0
                self._guard(lost.inc, count, {"run_id": self.run_id, "cause": cause})

    def _guard(self, record, value, tags: dict) -> None:
        try:
            record(float(value), tags=tags)
        except Exception:  # noqa: BLE001 - metrics must never fail the job
            if not self._failed:
                self._failed = True
                logger.warning("could not export a job metric (further failures are not logged)", exc_info=True)
