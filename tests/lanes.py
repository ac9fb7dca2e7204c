"""pytest-xdist's `--dist loadfile` with a lane for the modules that mostly wait.

A few modules spend most of their wall time waiting on other processes and clocks, not computing: a multi-node
Ray in a network namespace, drivers killed and rerun, leases going stale by the store's clock, an autoscaler's
requests, a metrics scrape. On two cores and two workers, a worker in one of them leaves its core about half idle.
With three workers, the first is their lane: it takes those modules (in collection order), the other two take the
rest, and each lane takes from the other's once its own is empty. So the waits overlap with work on both cores
instead of holding a worker, and the CPU-heavy modules (gangs above all, whose ranks stall each other when the
cores are shared) run two at once, not three, until only the short modules at the end of the order are left. With fewer than three workers it is plain `loadfile`.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

# Modules that use about half a core or less, alone on this 2-core kind of host (wall / CPU seconds, AMD EPYC,
# 2026-12-04): fleet 74 / 31, faults 70 / 42, autoscale_cluster 23 / 16, lease_cli 22 / 11, metrics 15 / 11.
WAITING = frozenset({
    "tests/test_fleet.py",
    "tests/test_faults.py",
    "tests/test_autoscale_cluster.py",
    "tests/test_lease_cli.py",
    "tests/test_metrics.py",
})
LANE_WORKERS = 3  # the least number of workers with a waiting lane


class WaitingLane(LoadFileScheduling):
    """`loadfile`, each module still whole on one worker, with the first worker's lane for `WAITING` modules."""

    def _assign_work_unit(self, node) -> None:
        if len(self.nodes) >= LANE_WORKERS:
            lane = node is min(self.nodes, key=lambda n: n.gateway.id)
            own = [scope for scope in self.workqueue if (scope in WAITING) == lane]
            if own:  # else the other lane's next module: no worker idles while work is queued
                self.workqueue.move_to_end(own[0], last=False)
        super()._assign_work_unit(node)
