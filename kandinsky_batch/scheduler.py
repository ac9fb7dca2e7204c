"""The driver's work queue: rows go to whichever replica of their pool is free, never in fixed shards.

A replica is one actor or a gang of actors (sequence/CFG parallel) fed the same rows in lockstep; a
pool is a group of same-shaped replicas with its own queue of rows. Each replica keeps `prefetch`
rows queued so its next row is ready the moment a render ends. A replica that dies (any rank of a
gang) is torn down and rebuilt; the row it was running counts an attempt and goes back to the queue,
rows queued behind it go back without one. A row is tried at most `max_attempts` times.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from kandinsky_batch.rows import Task

_FAILED = (RayActorError, ActorDiedError, ActorUnavailableError, RayTaskError)


class WorkersFailed(RuntimeError):
    """Replicas could not be started or keep dying; the job cannot make progress."""


class StorageOutage(RuntimeError):
    """The output store stayed unreachable beyond its retry budget; progress so far is kept."""


class Replica(Protocol):
    """One model replica as the queue sees it (see `cluster.ActorReplica`)."""

    ranks: int

    def ready(self) -> list[ray.ObjectRef]: ...            # resolve once every rank has its model loaded
    def submit(self, batch: list[tuple[Task, int]]) -> list[ray.ObjectRef]: ...  # [0] carries the rows
    def kill(self) -> None: ...


@dataclass
class Pool:
    """Same-shaped replicas and the rows routed to them."""

    name: str
    spawn: Callable[[int], Replica]
    replicas: int
    tasks: list[Task] = field(default_factory=list)


@dataclass(eq=False)
class _Flight:
    slot: int
    seq: int
    batch: list  # [(task, attempt)]: rows rendered together, each counting its own attempts
    refs: list


class WorkQueue:
    """Feed each pool's tasks to its replicas and hand each final row to `on_row`."""

    def __init__(self, pools: list[Pool], max_attempts: int, on_row: Callable[[dict], None], prefetch: int = 2,
                 on_tick: Callable[[], None] = lambda: None, tick_seconds: float = 1.0, batch_size: int = 1):
        self.pools = [p for p in pools if p.tasks]
        self.max_attempts, self.on_row, self.prefetch = max_attempts, on_row, prefetch
        self.batch_size = batch_size
        self.on_tick, self.tick_seconds = on_tick, tick_seconds
        # slot -> (pool index, replica index within the pool)
        self.slots = [(i, r) for i, p in enumerate(self.pools) for r in range(min(p.replicas, len(p.tasks)))]
        self.restarts = 0
        self.retries = 0
        self.workers: list[dict] = []
        self.drain_seconds = 0.0
        """Wall time from every replica ready to the last row settled (start-up excluded)."""

    def _spawn(self, slot: int) -> Replica:
        pool, index = self.slots[slot]
        return self.pools[pool].spawn(index)

    def run(self) -> None:
        # 1. Start every replica; wait until each has its model loaded.
        replicas = self._start()
        started = time.perf_counter()
        try:
            self._drain(replicas)
            self.drain_seconds = time.perf_counter() - started
        finally:
            # Release GPUs now, not whenever the handles are collected: the next job may be waiting.
            for replica in replicas:
                replica.kill()

    def _start(self) -> list[Replica]:
        """Spawn all replicas at once; a slot whose replica dies while loading is retried, a bad model fails fast."""
        replicas = [self._spawn(slot) for slot in range(len(self.slots))]
        self.workers = [{} for _ in replicas]
        tries = [1] * len(replicas)
        waiting = {ref: slot for slot, replica in enumerate(replicas) for ref in replica.ready()}
        while waiting:
            [ref], _ = ray.wait(list(waiting), num_returns=1)
            slot = waiting.pop(ref)
            try:
                info = ray.get(ref)
            except _FAILED as exc:
                if tries[slot] >= self.max_attempts:
                    raise WorkersFailed(f"replica {slot} failed to start {tries[slot]} times: {_cause(exc)}") from None
                tries[slot] += 1
                self.restarts += 1
                for other in [r for r, s in waiting.items() if s == slot]:
                    del waiting[other]
                replicas[slot].kill()
                replicas[slot] = self._spawn(slot)
                waiting.update({r: slot for r in replicas[slot].ready()})
                continue
            if not self.workers[slot]:
                self.workers[slot] = info
        return replicas

    def _drain(self, replicas: list[Replica]) -> None:
        """Feed tasks until every one has its final row (or storage stays down)."""
        pending = [deque((t, 0) for t in pool.tasks) for pool in self.pools]
        in_flight = [0] * len(replicas)
        waiting: dict[ray.ObjectRef, _Flight] = {}
        seq = itertools.count()
        outage: str | None = None

        def take(queue: deque) -> list[tuple[Task, int]]:
            """The next row and, up to batch_size, rows further on that can share its forward."""
            batch = [queue.popleft()]
            if self.batch_size > 1:
                key = batch[0][0].batch_key()
                # Look a bounded way ahead: rows are sorted by cost, so alike rows sit close together.
                for item in list(itertools.islice(queue, 8 * self.batch_size)):
                    if len(batch) == self.batch_size:
                        break
                    if item[0].batch_key() == key:
                        queue.remove(item)
                        batch.append(item)
            return [(task, attempts + 1) for task, attempts in batch]

        def feed(slot: int) -> None:
            queue = pending[self.slots[slot][0]]
            while outage is None and queue and in_flight[slot] < self.prefetch:
                batch = take(queue)
                flight = _Flight(slot, next(seq), batch, replicas[slot].submit(batch))
                waiting.update({ref: flight for ref in flight.refs})
                in_flight[slot] += 1

        def land(flight: _Flight) -> None:
            in_flight[flight.slot] -= 1
            for ref in flight.refs:
                waiting.pop(ref, None)

        def requeue(flight: _Flight) -> None:
            """Back to the front of its pool's queue, the attempt not counted (it never ran)."""
            for task, attempt in reversed(flight.batch):
                pending[self.slots[flight.slot][0]].appendleft((task, attempt - 1))

        def settle(slot: int, attempt: int, task: Task, row: dict) -> None:
            if row["status"] == "failed" and attempt < self.max_attempts:
                self.retries += 1
                pending[self.slots[slot][0]].appendleft((task, attempt))
            else:
                self.on_row(row)

        def rebuild(slot: int) -> None:
            self.restarts += 1
            if self.restarts > len(replicas) * self.max_attempts + 8:
                raise WorkersFailed(f"replicas died {self.restarts} times; giving up")
            replicas[slot].kill()
            replicas[slot] = self._spawn(slot)

        # 2. Keep every replica `prefetch` rows deep until the queues drain.
        for slot in range(len(replicas)):
            feed(slot)
        while waiting:
            # A timeout lets the driver publish buffered manifest rows even while renders take minutes.
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=self.tick_seconds)
            self.on_tick()
            if not ready:
                continue
            ref = ready[0]
            flight = waiting[ref]
            try:
                value = ray.get(ref)
            except _FAILED as exc:
                # 3. A rank died or raised: its rows count an attempt, rows queued behind them don't,
                #    and the whole replica is rebuilt (a gang's collectives are out of step now).
                lost = sorted({id(f): f for f in waiting.values() if f.slot == flight.slot}.values(),
                              key=lambda f: f.seq)
                for f in lost:
                    land(f)
                for f in reversed(lost[1:]):
                    requeue(f)
                for task, attempt in lost[0].batch:
                    settle(flight.slot, attempt, task, {**task.row(), "status": "failed", "attempts": attempt,
                                                        "error": f"worker died: {_cause(exc)}"})
                rebuild(flight.slot)
                feed(flight.slot)
                continue
            if ref != flight.refs[0]:
                waiting.pop(ref)  # another rank finished its part; rank 0 carries the rows
                continue
            land(flight)
            for (task, attempt), row in zip(flight.batch, value):
                if row.pop("storage_outage", False):
                    # 4. Storage is down beyond its retry budget: stop feeding, drain, keep progress.
                    outage = row["error"]
                    pending[self.slots[flight.slot][0]].appendleft((task, attempt - 1))
                else:
                    settle(flight.slot, attempt, task, row)
            if any(row["status"] == "failed" for row in value) and replicas[flight.slot].ranks > 1:
                # Other ranks may still wait in a collective for this one: start the gang afresh.
                for f in sorted({id(f): f for f in waiting.values() if f.slot == flight.slot}.values(),
                                key=lambda f: -f.seq):
                    land(f)
                    requeue(f)
                rebuild(flight.slot)
            feed(flight.slot)
        if outage is not None:
            raise StorageOutage(outage)


def _cause(exc: BaseException) -> str:
    """A one-line reason from a Ray exception (its cause's message, not the whole traceback)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()
