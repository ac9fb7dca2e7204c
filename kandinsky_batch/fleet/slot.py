"""A replica's place in the work queue: the `Slot` state machine, the `Pool` it serves, its in-flight batches.

A slot holds one replica (an actor, or a gang of actors fed in lockstep) and moves starting -> ready -> dead ->
starting ..., or retired (ready -> draining -> retired on a node Ray drains); its transitions are its methods, the
only way its state changes, and it keeps its in-flight batches (`Flight`) in dispatch order so that a lost
replica's batches go back in the order they left.
The work queue (`scheduler.py`) decides when each transition happens.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from kandinsky_batch.intake.rows import Task
from kandinsky_batch.output.record import Stamp


class ReplicaLost(RuntimeError):
    """A replica's actor died or a call on it raised (what `get` raises for it)."""


class ReplicaDrained(ReplicaLost):
    """A replica's actor was lost to a drain of its node (Ray's `RayActorError.preempted`): not the rows' fault."""


class Replica(Protocol):
    """One model replica as the queue sees it (see `cluster.ActorReplica`)."""

    ranks: int

    def ready(self) -> list: ...                             # resolve once every rank has its model loaded
    def submit(self, batch: list[tuple[Task, int]]) -> list: ...  # refs; [0] resolves to a BatchResult
    def kill(self) -> None: ...


@dataclass
class Pool:
    """Same-shaped replicas of one model: how to start one, and the rows waiting for them.

    Pools of several models (a sweep) share their replica group's capacity: `group` names it, and a replica
    of this pool takes `ranks` units of it (GPUs; a gang of 2 takes 2).
    """

    name: str
    spawn: Callable[[int], Replica]
    pending: deque = field(default_factory=deque)  # (task, attempts so far)
    group: str = ""
    ranks: int = 1
    stamp: Stamp | None = None
    """The job-level values of its model's manifest rows: the rows the queue settles itself carry them too."""

    def __post_init__(self) -> None:
        self.group = self.group or self.name


class SlotState(enum.Enum):
    STARTING = "starting"  # replica spawned, model loading (or waiting for resources); holds no rows
    READY = "ready"        # takes batches
    DRAINING = "draining"  # its node is being drained: no new rows, the running one finishes or goes back
    DEAD = "dead"          # replica lost; its batches were handed back
    RETIRED = "retired"    # gone for good (the fleet shrank, or the job ended)


@dataclass(eq=False)
class Flight:
    """One batch on a replica: the rows, their attempt numbers, and the refs still outstanding."""

    seq: int
    batch: list  # [(task, attempt)]
    refs: list
    outstanding: set = field(default_factory=set)
    started: float | None = None
    """Clock time it began rendering, as far as the driver can tell: dispatched to an idle replica, or the batch
    ahead of it came back."""

    def cost(self) -> float:
        return sum(task.cost() for task, _ in self.batch)


class Slot:
    """One replica slot of a pool; the transitions below are the only way its state changes."""

    def __init__(self, pool: Pool, index: int, replica: Replica, now: float):
        self.pool, self.index, self.replica = pool, index, replica
        self.state = SlotState.STARTING
        self.flights: deque[Flight] = deque()
        self.starting = set(replica.ready())
        self.start_failures = 0
        self.info: dict = {}
        self.busy_seconds, self._busy_since, self.ready_at = 0.0, None, now
        self.deadline: float | None = None  # draining: when its node goes (None: no deadline)
        self.flight_seconds = self.cost_done = 0.0  # the measured speed: seconds per cost unit of batches landed

    def __repr__(self) -> str:
        return f"Slot({self.pool.name}#{self.index}, {self.state.value}, {len(self.flights)} in flight)"

    def _expect(self, *states: SlotState) -> None:
        if self.state not in states:
            raise RuntimeError(f"{self!r}: transition needs state {[s.value for s in states]}")

    def started(self, info: dict, now: float) -> None:
        """STARTING -> READY once every rank answered `ready`."""
        self._expect(SlotState.STARTING)
        self.state, self.info, self.start_failures, self.ready_at = SlotState.READY, info, 0, now
        self.busy_seconds, self._busy_since = 0.0, None
        self.flight_seconds = self.cost_done = 0.0  # a new replica (maybe elsewhere): its own speed

    def dispatch(self, flight: Flight, now: float) -> None:
        """READY: one more batch queued on the replica."""
        self._expect(SlotState.READY)
        if not self.flights:
            self._busy_since = flight.started = now
        flight.outstanding = set(flight.refs)
        self.flights.append(flight)

    def land(self, flight: Flight, now: float) -> None:
        """READY/DRAINING: a batch came back."""
        self._expect(SlotState.READY, SlotState.DRAINING)
        self.flights.remove(flight)
        if flight.started is not None:
            self.flight_seconds += now - flight.started
            self.cost_done += flight.cost()
        if self.flights and self.flights[0].started is None:
            self.flights[0].started = now
        if not self.flights and self._busy_since is not None:
            self.busy_seconds += now - self._busy_since
            self._busy_since = None

    def seconds_per_unit(self) -> float | None:
        """Seconds per cost unit (`Task.cost`) over the batches this replica finished; None before the first."""
        return self.flight_seconds / self.cost_done if self.cost_done else None

    def drain(self, deadline: float | None) -> list[Flight]:
        """READY -> DRAINING: no more batches; returns those queued behind the running one (they never started)."""
        self._expect(SlotState.READY)
        self.state, self.deadline = SlotState.DRAINING, deadline
        queued = list(self.flights)[1:]
        for flight in queued:
            self.flights.remove(flight)
        return queued

    def hand_back(self) -> list[Flight]:
        """DRAINING: give up the running batch (it would not end before the deadline); returns it."""
        self._expect(SlotState.DRAINING)
        running, self.flights = list(self.flights), deque()
        return running

    def fail(self, now: float) -> list[Flight]:
        """STARTING/READY/DRAINING -> DEAD: the replica is lost; returns its batches in dispatch order (first was
        running)."""
        self._expect(SlotState.STARTING, SlotState.READY, SlotState.DRAINING)
        if self._busy_since is not None:
            self.busy_seconds += now - self._busy_since
            self._busy_since = None
        lost, self.flights, self.starting = list(self.flights), deque(), set()
        self.state = SlotState.DEAD
        self.replica.kill()
        return lost

    def rebuild(self, replica: Replica) -> None:
        """DEAD -> STARTING with a new replica."""
        self._expect(SlotState.DEAD)
        self.replica, self.state, self.starting = replica, SlotState.STARTING, set(replica.ready())

    def retire(self) -> None:
        """STARTING/DEAD/READY/DRAINING without batches -> RETIRED; the replica is released."""
        self._expect(SlotState.STARTING, SlotState.DEAD, SlotState.READY, SlotState.DRAINING)
        if self.flights:
            raise RuntimeError(f"{self!r}: cannot retire a slot with batches in flight")
        if self.state is not SlotState.DEAD:
            self.replica.kill()
        self.state, self.starting = SlotState.RETIRED, set()

    def busy_fraction(self, now: float) -> float:
        """Share of the time since it became ready that the replica had a batch."""
        busy = self.busy_seconds + (now - self._busy_since if self._busy_since is not None else 0.0)
        return busy / max(now - self.ready_at, 1e-9)
