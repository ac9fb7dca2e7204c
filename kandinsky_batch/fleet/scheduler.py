"""The driver's work queue: rows go to whichever replica of their pool is free, never in fixed shards.

A pool is a group of same-shaped replicas with its own queue of rows; a replica is one actor or a gang
of actors (sequence/CFG parallel) fed the same rows in lockstep. Each replica lives in a `Slot`, a small
state machine (starting -> ready -> dead -> starting ..., draining, retired) that holds its in-flight
batches in dispatch order. The queue:

- follows the fleet and splits each replica group among the pools of several models by their remaining
  work, reloading a replica whose model has no rows left as one that has some (`rebalance.py`);
- keeps each ready replica `prefetch` batches deep, so its next row is ready the moment a render ends;
- on a replica's death (any rank of a gang, or its node): the batch it was running counts an attempt and
  goes back to the queue, batches queued behind it go back without one, and the slot is rebuilt (or
  retired if the fleet shrank). A row is tried at most `max_attempts` times;
- on a drain of a replica's node (`draining`, or its actor preempted), takes no new rows there and retires the
  replica once its running batch ends in time or goes back, with no attempt counted (`drain.py`);
- stops cleanly (`WorkersFailed`) when no replica has been ready for `no_replica_timeout` seconds while
  rows remain, and (`StorageOutage`) when the output store stays down; what landed is kept.

Ray is injected (`wait`, `get`, `draining`, the replicas' spawn functions), so tests drive every path with fakes.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Callable, Iterable

from kandinsky_batch.fleet import rebalance
from kandinsky_batch.fleet.drain import Drains
from kandinsky_batch.fleet.rebalance import Fleet
from kandinsky_batch.fleet.source import Source
from kandinsky_batch.fleet.slot import Flight, Pool, ReplicaDrained, ReplicaLost, Slot, SlotState
from kandinsky_batch.output.record import BatchResult, failed
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.errors import StorageOutage, WorkersFailed


class WorkQueue:
    """Feed each pool's rows to its ready replicas and hand each final manifest row to `on_row`."""

    def __init__(self, pools: list[Pool], fleet: Fleet, source: Source, *, max_attempts: int,
                 on_row: Callable[[dict], None], wait: Callable[[list, float], list], get: Callable[[Any], Any],
                 prefetch: int = 2, batch_size: int = 1, tick_seconds: float = 1.0, fleet_seconds: float = 2.0,
                 no_replica_timeout: float = 900.0, low_water: int = 4096,
                 on_tick: Callable[["WorkQueue"], None] = lambda queue: None,
                 clock: Callable[[], float] = time.monotonic, should_stop: Callable[[], bool] = lambda: False,
                 draining: Callable[[], dict[str, float | None]] = dict):
        self.pools = {p.name: p for p in pools}
        self.fleet, self.source = fleet, source
        self.max_attempts, self.on_row, self.wait, self.get = max_attempts, on_row, wait, get
        self.prefetch, self.batch_size = prefetch, batch_size
        self.tick_seconds, self.fleet_seconds, self.no_replica_timeout = tick_seconds, fleet_seconds, no_replica_timeout
        self.low_water, self.on_tick, self.clock, self.should_stop = low_water, on_tick, clock, should_stop
        self.stopped = False
        """`run` returned because `should_stop()` said so (a signal), with rows left."""
        self.slots: list[Slot] = []
        self.warned: set[str] = set()  # groups already warned of having no room
        self.hungry: set[Slot] = set()  # ready slots with room for another batch: only these are fed
        self.flying = 0                 # rows on replicas
        self.refs: dict[Any, tuple[Slot, Flight | None]] = {}  # outstanding ref -> its slot and batch (None: ready)
        self.seq = itertools.count()
        self.restarts = self.retries = self.switches = 0
        self.drains = Drains(draining)
        """The draining nodes (node id -> deadline on `clock`, None: none) and the replicas and rows they took."""
        self.storage_retries = 0  # the replicas' storage retries, reported with each batch
        self.workers: list[dict] = []
        self.outage: str | None = None
        self.first_dispatch: float | None = None
        """Clock time the first batch went to a replica."""
        self.drain_seconds = 0.0
        """Wall time from the first batch handed to a replica to the last row settled."""

    # -- what the queue knows -------------------------------------------------------------------------

    def queued(self) -> int:
        """Rows waiting for a replica or on one."""
        return sum(len(p.pending) for p in self.pools.values()) + self.flying

    def live(self, pool: Pool) -> list[Slot]:
        return [s for s in self.slots if s.pool is pool and s.state is not SlotState.RETIRED]

    @property
    def exhausted(self) -> bool:
        return self.source.exhausted

    def full(self) -> bool:
        return self._waiting() >= self.low_water

    def _finished(self) -> bool:
        return self.source.exhausted and self.queued() == 0

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until every row has its final manifest row (or the job cannot go on, or `should_stop()`)."""
        stalled_since = next_fleet = self.clock()
        try:
            while True:
                if self.should_stop():
                    self._land_finished()
                    self.stopped = True
                    return
                now = self.clock()
                # 1. Take rows the front end has ready, while few are waiting (memory stays bounded).
                self._pull()
                # 2. Follow the fleet: start replicas where GPUs joined, retire starting ones that cannot run.
                if now >= next_fleet:
                    rebalance.reconcile(self, now)
                    next_fleet = now + self.fleet_seconds
                # 3. Draining nodes' replicas take no new rows; a model with no rows left yields to one that has some.
                self.drains.poll(self, now)
                rebalance.switch(self, now)
                # 4. Keep every ready replica `prefetch` batches deep.
                for slot in list(self.hungry):
                    self._feed(slot, now)
                if self._finished() or (self.outage and not self.refs_in_flight()):
                    break
                # 5. Rows left but no replica ready for too long: stop, keeping what landed.
                if any(s.state is SlotState.READY for s in self.slots):
                    stalled_since = now
                elif now - stalled_since > self.no_replica_timeout:
                    raise WorkersFailed(self._stalled_reason())
                # 6. Handle whatever comes back first (a timeout lets the driver publish manifest rows).
                for ref in self.wait(list(self.refs), min(self.tick_seconds, self.drains.due(self.clock()))):
                    self._handle(ref)
                self.on_tick(self)
            if self.first_dispatch is not None:
                self.drain_seconds = self.clock() - self.first_dispatch
        finally:
            # Release GPUs now, not whenever handles are collected: the next job may be waiting.
            for slot in self.slots:
                if slot.state is not SlotState.RETIRED:
                    slot.flights.clear()
                    slot.retire()
        if self.outage is not None:
            raise StorageOutage(self.outage)

    def _land_finished(self) -> None:
        """Stopping: settle the results that are back already (their objects are stored), wait for no other."""
        for _ in range(len(self.refs)):
            ready = [ref for ref in self.wait(list(self.refs), 0) if ref in self.refs] if self.refs else []
            if not ready:
                return
            for ref in ready:
                self._handle(ref)

    def refs_in_flight(self) -> bool:
        return any(flight is not None for _, flight in self.refs.values())

    def _stalled_reason(self) -> str:
        wanted = {name: len(self.live(pool)) for name, pool in self.pools.items() if self.live(pool)}
        return (f"no replica has been ready for {self.no_replica_timeout:.0f} s (cluster.no_replica_timeout) with "
                f"{self.queued()} rows waiting; replicas starting per group: {wanted}, the cluster offers room for "
                f"{self.fleet.capacity()}")

    def _waiting(self) -> int:
        return sum(len(p.pending) for p in self.pools.values())

    def _pull(self) -> None:
        if self.full():
            return
        for window in self.source.poll():
            for name, tasks in window.items():
                self.pools[name].pending.extend((task, 0) for task in tasks)

    def start(self, pool: Pool, now: float) -> Slot:
        """A new slot of the pool, its replica starting."""
        index = sum(1 for s in self.slots if s.pool is pool)  # replica names stay unique in a job
        slot = Slot(pool, index, pool.spawn(index), now)
        self.slots.append(slot)
        self._track_start(slot)
        return slot

    def retire(self, slot: Slot) -> None:
        """Tear the slot's replica down for good: it gets no more rows and its answers are ignored."""
        self.hungry.discard(slot)
        self._forget(slot)
        slot.retire()

    def _track_start(self, slot: Slot) -> None:
        self.refs.update({ref: (slot, None) for ref in slot.starting})

    def _forget(self, slot: Slot) -> None:
        for ref in [r for r, (s, _) in self.refs.items() if s is slot]:
            del self.refs[ref]

    def _take(self, pending: deque) -> list[tuple[Task, int]]:
        """The next row and, up to batch_size, rows further on that can share its forward."""
        batch = [pending.popleft()]
        if self.batch_size > 1:
            key = batch[0][0].batch_key()
            # Look a bounded way ahead: rows are sorted by cost, so alike rows sit close together.
            for item in list(itertools.islice(pending, 8 * self.batch_size)):
                if len(batch) == self.batch_size:
                    break
                if item[0].batch_key() == key:
                    pending.remove(item)
                    batch.append(item)
        return [(task, attempts + 1) for task, attempts in batch]

    def _feed(self, slot: Slot, now: float) -> None:
        pending = slot.pool.pending
        while self.outage is None and pending and len(slot.flights) < self.prefetch:
            batch = self._take(pending)
            flight = Flight(next(self.seq), batch, slot.replica.submit(batch))
            slot.dispatch(flight, now)
            self.flying += len(batch)
            self.first_dispatch = self.first_dispatch or now
            self.refs.update({ref: (slot, flight) for ref in flight.refs})
        if len(slot.flights) >= self.prefetch:
            self.hungry.discard(slot)

    # -- what comes back ------------------------------------------------------------------------------

    def _handle(self, ref) -> None:
        if ref not in self.refs:
            return  # its slot was lost or retired meanwhile
        slot, flight = self.refs.pop(ref)
        now = self.clock()
        try:
            value = self.get(ref)
        except ReplicaLost as exc:
            self._lose(slot, exc, now)
            return
        if flight is None:
            slot.starting.discard(ref)
            if not slot.starting:
                slot.started(value, now)
                self.hungry.add(slot)
                self.workers.append(value)
            return
        flight.outstanding.discard(ref)
        if ref is not flight.refs[0]:
            return  # another rank finished its part; rank 0 carries the rows
        self._land(slot, flight, value, now)

    def _land(self, slot: Slot, flight: Flight, result: BatchResult, now: float) -> None:
        slot.land(flight, now)
        self.flying -= len(flight.batch)
        if slot.state is SlotState.READY:
            self.hungry.add(slot)
        for ref in flight.outstanding:
            self.refs.pop(ref, None)
        self.storage_retries += result.storage_retries
        rows = iter(result.rows)
        for position, (task, attempt) in enumerate(flight.batch):
            if position in result.unstored:
                # Storage is down beyond its retry budget: stop feeding, drain, keep progress.
                self.outage = result.outage
                slot.pool.pending.appendleft((task, attempt - 1))
            else:
                self._settle(slot.pool, task, attempt, next(rows))
        if slot.replica.ranks > 1 and any(row["status"] == "failed" for row in result.rows):
            # Other ranks may still wait in a collective for this one: start the gang afresh.
            self._lose(slot, None, now)
        elif slot.state is SlotState.DRAINING:
            self.drains.settle(self, slot, now)

    def _settle(self, pool: Pool, task: Task, attempt: int, row: dict) -> None:
        if row["status"] == "failed" and attempt < self.max_attempts:
            self.retries += 1
            pool.pending.appendleft((task, attempt))
        else:
            self.on_row(row)

    def _lose(self, slot: Slot, exc: BaseException | None, now: float) -> None:
        """The replica is gone (or must go): hand its batches back, then rebuild or retire the slot."""
        was_starting = slot.state is SlotState.STARTING
        self._forget(slot)
        if slot.state is SlotState.DRAINING or isinstance(exc, ReplicaDrained):
            self.drains.lost(self, slot, now)  # its node's owner took it back: no attempt counted
            return
        self.hungry.discard(slot)
        lost = slot.fail(now)
        self.flying -= sum(len(f.batch) for f in lost)
        if lost and exc is not None:
            # The running batch counts an attempt; rows queued behind it never ran.
            self._requeue(slot.pool, lost[1:])
            for task, attempt in lost[0].batch:
                # Built like the replica's own rows (`Stamp.failed`): a sweep's failed row still names its model.
                run = dict(attempts=attempt, worker=slot.info.get("worker"), gang=slot.info.get("gang"))
                build = slot.pool.stamp.failed if slot.pool.stamp else failed
                row = build(task.row(), f"worker died: {exc}", **run)
                self._settle(slot.pool, task, attempt, row)
        else:
            self._requeue(slot.pool, lost)
        if was_starting and exc is not None:
            slot.start_failures += 1
            if slot.start_failures >= self.max_attempts:
                raise WorkersFailed(f"replica {slot.pool.name}#{slot.index} failed to start "
                                    f"{slot.start_failures} times: {exc}")
        self.restarts += 1
        if rebalance.used(self, slot.pool.group) > self.fleet.capacity().get(slot.pool.group, 0):
            slot.retire()  # the fleet shrank (a node was lost): do not wait for a place that is gone
            return
        failures = slot.start_failures
        slot.rebuild(slot.pool.spawn(slot.index))
        slot.start_failures = failures
        self._track_start(slot)

    def take_back(self, slot: Slot, flights: list[Flight]) -> int:
        """Batches off a replica, answers ignored, back to the front of the queue, no attempt counted; their rows."""
        for ref in [ref for flight in flights for ref in flight.refs]:
            self.refs.pop(ref, None)
        rows = sum(len(flight.batch) for flight in flights)
        self.flying -= rows
        self._requeue(slot.pool, flights)
        return rows

    def _requeue(self, pool: Pool, flights: Iterable[Flight]) -> None:
        """Back to the front of the pool's queue in their order, the attempt not counted (they never ran)."""
        for flight in reversed(list(flights)):
            for task, attempt in reversed(flight.batch):
                pool.pending.appendleft((task, attempt - 1))
