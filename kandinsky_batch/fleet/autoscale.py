"""Asking the cluster's autoscaler for the replicas the remaining work can use, without wiping other jobs' asks.

`ray.autoscaler.sdk.request_resources` holds one cluster-wide target, the last caller's (v1 overwrites the
`autoscaler_resource_request` KV entry, v2 replaces the GCS constraint: `ray/autoscaler/_private/commands.py`,
`request_resources`), so a job that cleared it at its end would clear every other job's ask too. Ray 2.60's
answer is one named detached actor, `AutoscalingCoordinator` (namespace `AutoscalingCoordinator`), that Ray Data
and Ray Train both register with: it keeps each requester's bundles, sends their union, drops a requester on
`cancel_request`, and purges one whose `expire_after_s` lapsed on its 20 s tick
(`ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py`: `_AutoscalingCoordinatorActor.
request_resources`, `_merge_and_send_requests`, `_purge_expired_requests`, `get_or_create_autoscaling_coordinator`).
A job registers there too, as one more requester, so its asks, Ray Data's and Ray Train's add up; its TTL,
refreshed by the driver, lets the ask of a killed driver lapse.

The work queue's tick calls the job's `Autoscale` (injected: queue tests use fakes); the bundles it asks for are a
pure function of the queue's state (`wanted`), one per replica the work can use, each shaped like its gang.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from kandinsky_batch.config.schema import INPROCESS, ClusterConfig
from kandinsky_batch.fleet import rebalance

logger = logging.getLogger(__name__)

EVERY_SECONDS = 2.0
"""How often the wanted bundles are worked out again (the queue ticks about once a second)."""
TTL_SECONDS = 60.0
"""A job's ask lapses this long after its last refresh (its driver died): Ray Data's own requester's timeout
(`ray/data/_internal/execution/autoscaling_requester.py`, `RESOURCE_REQUEST_TIMEOUT`), three refreshes missed."""
REFRESH_SECONDS = 20.0
"""An unchanged ask is sent again this often (the coordinator's own tick is 20 s)."""
CANCEL_SECONDS = 1.0
"""How long the end of a job waits for its ask to be withdrawn (a stop has 3 s in all; the TTL covers a miss)."""


@dataclass(frozen=True)
class PoolWork:
    """What one pool (a model's replicas of one group) could use now."""

    name: str
    group: str
    ranks: int
    bundle: dict
    """One replica's resources as one bundle: its whole gang, which a placement group packs on one node."""
    batches: int
    """Batches left (waiting and on replicas): more replicas than this would idle."""
    work: float
    """Rows left in the cost model's units: splits a capped group between models."""


def gang_bundle(ranks: int, num_gpus: float, num_cpus: float) -> dict:
    """A replica of `ranks` ranks, each asking `num_gpus`/`num_cpus`, as one bundle (zeros left out)."""
    bundle = {"CPU": num_cpus * ranks, "GPU": num_gpus * ranks}
    return {name: amount for name, amount in bundle.items() if amount}


def caps(cfg: ClusterConfig) -> dict[str, int | None]:
    """Units (GPUs, or CPU ranks) each replica group may take at most: its `replicas` times its gang; None: no cap
    but the work's (and the autoscaler's own `max_workers`)."""
    return {g.name: g.replicas * g.parallel().world_size if g.replicas else None for g in cfg.replica_groups()}


def wanted(pools: list[PoolWork], limits: dict[str, int | None]) -> list[dict]:
    """One bundle per replica the remaining work can use: each pool's batches left, each group within its cap,
    a capped group split between its models by the most work per unit (D'Hondt, as the work queue splits it)."""
    count = {p.name: 0 for p in pools}
    for group in dict.fromkeys(p.group for p in pools):
        members = [p for p in pools if p.group == group]
        cap = limits.get(group)
        if cap is None:
            count.update({p.name: p.batches for p in members})
            continue
        free = cap
        while True:
            open_ = [p for p in members if count[p.name] < p.batches and p.ranks <= free]
            if not open_:
                break
            best = max(open_, key=lambda p: p.work / ((count[p.name] + 1) * p.ranks))
            count[best.name] += 1
            free -= best.ranks
    return [dict(p.bundle) for p in pools for _ in range(count[p.name])]


def demand(queue, bundles: dict[str, dict], batch_size: int) -> list[PoolWork]:
    """The work queue's pools as `PoolWork`: rows waiting and on live replicas, in batches of `batch_size`."""
    found = []
    for name, pool in queue.pools.items():
        rows = len(pool.pending) + sum(len(f.batch) for s in queue.live(pool) for f in s.flights)
        found.append(PoolWork(name, pool.group, pool.ranks, bundles[name], math.ceil(rows / max(batch_size, 1)),
                              rebalance.work(queue, pool)))
    return found


class Coordinator(Protocol):
    """Where a job's ask goes (`RayCoordinator`; tests use fakes)."""

    def request(self, bundles: list[dict], ttl: float) -> None: ...
    def cancel(self) -> None: ...


class RayCoordinator:
    """The job as one requester of Ray's shared AutoscalingCoordinator actor (created on first use)."""

    def __init__(self, requester: str):
        self.requester = requester
        self._actor = None

    def _handle(self):
        if self._actor is None:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                get_or_create_autoscaling_coordinator,
            )

            self._actor = get_or_create_autoscaling_coordinator()
        return self._actor

    def request(self, bundles: list[dict], ttl: float) -> None:
        # Fire and forget, as Ray Data's client does (`DefaultAutoscalingCoordinator.request_resources`): the
        # actor runs calls in order, so a later cancel still lands after it.
        self._handle().request_resources.remote(requester_id=self.requester, resources=bundles, expire_after_s=ttl)

    def cancel(self) -> None:
        import ray

        ray.get(self._handle().cancel_request.remote(self.requester), timeout=CANCEL_SECONDS)


class Autoscale:
    """A job's standing ask: worked out on the queue's tick, sent when it changes or before it lapses, withdrawn
    at the end. Autoscaling is advice: a failing coordinator is logged, never fatal."""

    def __init__(self, coordinator: Coordinator, bundles: dict[str, dict], limits: dict[str, int | None],
                 batch_size: int = 1, clock: Callable[[], float] = time.monotonic, every: float = EVERY_SECONDS,
                 ttl: float = TTL_SECONDS, refresh: float = REFRESH_SECONDS):
        self.coordinator, self.bundles, self.limits, self.batch_size = coordinator, bundles, limits, batch_size
        self.clock, self.every, self.ttl, self.refresh = clock, every, ttl, refresh
        self.sent: list[dict] | None = None
        """The last ask sent (None: none yet, or withdrawn)."""
        self._next = self._sent_at = float("-inf")
        self._warned = False

    def __call__(self, queue) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every
        ask = wanted(demand(queue, self.bundles, self.batch_size), self.limits)
        if ask == self.sent and now - self._sent_at < self.refresh:
            return
        try:
            self.coordinator.request(ask, self.ttl)
        except Exception as exc:  # noqa: BLE001 - advice to the autoscaler must not stop the job
            self._warn("ask the autoscaler for resources", exc)
            return
        self.sent, self._sent_at = ask, now

    def close(self) -> None:
        """Withdraw the ask (the other requesters' stay), if one was sent."""
        if self.sent is None:
            return
        try:
            self.coordinator.cancel()
        except Exception as exc:  # noqa: BLE001 - it lapses after `ttl` anyway
            self._warn(f"withdraw its autoscaler request (it lapses in {self.ttl:.0f} s)", exc)
        self.sent = None

    def _warn(self, what: str, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("could not %s: %s: %s", what, type(exc).__name__, exc)


class _Off:
    """No autoscaler to ask: a tick and a close that cost nothing."""

    sent = None

    def __call__(self, queue) -> None:
        return None

    def close(self) -> None:
        return None


OFF = _Off()


def for_job(cfg: ClusterConfig, bundles: dict[str, dict], batch_size: int, run_id: str,
            coordinator: Coordinator | None = None) -> Autoscale | _Off:
    """The job's `Autoscale` on a joined cluster; `OFF` on a local Ray the job started (nothing can join it), for
    in-process replicas, or without `ray[data]`."""
    if not cfg.address or cfg.address == INPROCESS:
        return OFF
    if coordinator is None and importlib.util.find_spec("pandas") is None:
        # Ray's coordinator lives in `ray.data`, which imports pandas (`ray[data]`): without it, nothing is asked.
        logger.warning("not asking the cluster's autoscaler for GPUs: its coordinator needs ray[data] "
                       "(pip install 'ray[data]==2.60.0'); replicas still follow the nodes that join")
        return OFF
    return Autoscale(coordinator or RayCoordinator(f"kandinsky-batch:{run_id}"), bundles, caps(cfg), batch_size)
