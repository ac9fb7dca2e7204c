"""The driver's work queue: rows go to whichever replica is free, never in fixed shards.

Each replica keeps `prefetch` rows queued so its next row is ready the moment a render ends. A
replica that dies is replaced; the row it was running counts an attempt and goes back to the queue,
rows queued behind it go back without one. A row is tried at most `max_attempts` times.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from kandinsky_batch.rows import Task

_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class WorkersFailed(RuntimeError):
    """Replicas could not be started or keep dying; the job cannot make progress."""


class StorageOutage(RuntimeError):
    """The output store stayed unreachable beyond its retry budget; progress so far is kept."""


@dataclass
class _Flight:
    slot: int
    generation: int
    seq: int
    task: Task
    attempt: int


class WorkQueue:
    """Feed tasks to replicas created by `spawn(slot)` and hand each final row to `on_row`."""

    def __init__(self, spawn: Callable[[int], Any], replicas: int, max_attempts: int,
                 on_row: Callable[[dict], None], prefetch: int = 2, on_tick: Callable[[], None] = lambda: None,
                 tick_seconds: float = 1.0):
        self.spawn, self.replicas, self.max_attempts = spawn, replicas, max_attempts
        self.on_row, self.prefetch = on_row, prefetch
        self.on_tick, self.tick_seconds = on_tick, tick_seconds
        self.restarts = 0
        self.retries = 0
        self.workers: list[dict] = []
        self.drain_seconds = 0.0
        """Wall time from every replica ready to the last row settled (start-up excluded)."""

    def _failed(self, task: Task, attempt: int, error: str) -> dict:
        return {**task.row(), "status": "failed", "error": error, "attempts": attempt}

    def run(self, tasks: list[Task]) -> None:
        # 1. Start every replica; wait until each has its model loaded.
        actors = self._start()
        started = time.perf_counter()
        try:
            self._drain(actors, tasks)
            self.drain_seconds = time.perf_counter() - started
        finally:
            # Release GPUs now, not whenever the handles are collected: the next job may be waiting.
            for actor in actors:
                ray.kill(actor, no_restart=True)

    def _start(self) -> list:
        """Spawn all replicas at once; a slot whose replica dies while loading is retried, a bad model fails fast."""
        actors = [self.spawn(slot) for slot in range(self.replicas)]
        self.workers = [{} for _ in range(self.replicas)]
        tries = [1] * self.replicas
        waiting = {actors[slot].ready.remote(): slot for slot in range(self.replicas)}
        while waiting:
            [ref], _ = ray.wait(list(waiting), num_returns=1)
            slot = waiting.pop(ref)
            try:
                self.workers[slot] = ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                if tries[slot] >= self.max_attempts:
                    raise WorkersFailed(f"replica {slot} failed to start {tries[slot]} times: {_cause(exc)}") from None
                tries[slot] += 1
                self.restarts += 1
                actors[slot] = self.spawn(slot)
                waiting[actors[slot].ready.remote()] = slot
        return actors

    def _drain(self, actors: list, tasks: list[Task]) -> None:
        """Feed tasks until every one has its final row (or storage stays down)."""
        generations = [0] * self.replicas
        pending: deque[tuple[Task, int]] = deque((t, 0) for t in tasks)
        flights: dict[ray.ObjectRef, _Flight] = {}
        seq = itertools.count()
        outage: str | None = None

        def feed(slot: int) -> None:
            while outage is None and pending and sum(f.slot == slot for f in flights.values()) < self.prefetch:
                task, attempts = pending.popleft()
                ref = actors[slot].render.remote(task, attempts + 1)
                flights[ref] = _Flight(slot, generations[slot], next(seq), task, attempts + 1)

        def settle(flight: _Flight, row: dict) -> None:
            if row["status"] == "failed" and flight.attempt < self.max_attempts:
                self.retries += 1
                pending.appendleft((flight.task, flight.attempt))
            else:
                self.on_row(row)

        # 2. Keep every replica `prefetch` rows deep until the queue drains.
        for slot in range(self.replicas):
            feed(slot)
        while flights:
            # A timeout lets the driver publish buffered manifest rows even while renders take minutes.
            ready, _ = ray.wait(list(flights), num_returns=1, timeout=self.tick_seconds)
            self.on_tick()
            if not ready:
                continue
            ref = ready[0]
            flight = flights.pop(ref)
            try:
                row = ray.get(ref)
            except _DEAD as exc:
                # 3. A dead replica: its running row counts an attempt, rows queued behind it don't.
                lost = [flight] + [flights.pop(r) for r, f in list(flights.items())
                                   if f.slot == flight.slot and f.generation == flight.generation]
                lost.sort(key=lambda f: f.seq)
                running, queued = lost[0], lost[1:]
                for f in reversed(queued):
                    pending.appendleft((f.task, f.attempt - 1))
                settle(running, self._failed(running.task, running.attempt, f"worker died: {_cause(exc)}"))
                if generations[flight.slot] == flight.generation:
                    self._respawn(actors, generations, flight.slot)
                feed(flight.slot)
                continue
            except RayTaskError as exc:
                row = self._failed(flight.task, flight.attempt, _cause(exc))
            if row.pop("storage_outage", False):
                # 4. Storage is down beyond its retry budget: stop feeding, drain, keep progress.
                outage = row["error"]
                pending.appendleft((flight.task, flight.attempt - 1))
            else:
                settle(flight, row)
            feed(flight.slot)
        if outage is not None:
            raise StorageOutage(outage)

    def _respawn(self, actors: list, generations: list[int], slot: int) -> None:
        self.restarts += 1
        if self.restarts > self.replicas * self.max_attempts + 8:
            raise WorkersFailed(f"replicas died {self.restarts} times; giving up")
        try:
            ray.kill(actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        generations[slot] += 1
        actors[slot] = self.spawn(slot)


def _cause(exc: BaseException) -> str:
    """A one-line reason from a Ray exception (its cause's message, not the whole traceback)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()
