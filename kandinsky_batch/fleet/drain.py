"""Preemption drains: replicas on a node Ray is draining take no new rows, finish what they can, then retire.

Spot GPUs are reclaimed with a grace period: Ray marks the node draining with a deadline (`ray drain-node`, or
SIGTERM to `ray start --block`). Every `poll_seconds` the work queue reads the draining-node table through an
injected callable (`cluster.draining`, Ray's GCS; `{}` in-process), node -> deadline on the queue's clock (None:
no deadline). A ready replica on such a node:

- takes no new rows; the batches queued behind the one it is running never started and go back at once;
- keeps the running batch if its cost (`Task.cost`) at the replica's measured speed (seconds per cost unit over
  the batches it finished; its pool's where it has none yet) ends `MARGIN` seconds before the deadline, asked
  again at every poll; otherwise that batch goes back too. Without a deadline it always finishes;
- then retires, and its units are no longer the pool's: `Fleet.capacity()` leaves draining nodes out, so
  replacements start where GPUs remain.

Rows handed back for a drain, or lost with a replica that was draining or whose actor was preempted
(`ReplicaDrained`), go back **without counting an attempt**: losing a node to its owner is not the row's fault.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from kandinsky_batch.fleet.slot import Flight, Slot, SlotState

logger = logging.getLogger(__name__)

MARGIN = 2.0
"""Seconds a kept batch must end before the deadline: its encode, upload and answer, and the estimate's error."""


class Queue(Protocol):
    """What the drain policy reads of the work queue, and the changes it makes to it."""

    slots: list[Slot]
    hungry: set[Slot]

    def retire(self, slot: Slot) -> None: ...
    def take_back(self, slot: Slot, flights: list[Flight]) -> int: ...  # rows back to the pool, no attempt counted


class Drains:
    """The draining nodes as last polled, what the queue did about them, and the counts `_SUCCESS` reports."""

    def __init__(self, draining: Callable[[], dict[str, float | None]] = dict, poll_seconds: float = 1.0):
        self.draining, self.poll_seconds = draining, poll_seconds
        self.nodes: dict[str, float | None] = {}
        self.next_poll = float("-inf")
        self.drains = 0
        """Replicas retired because their node was drained or their actor preempted (not in `restarts`)."""
        self.drained = 0
        """Rows handed back by a drain, no attempt counted (each renders again elsewhere)."""

    def due(self, now: float) -> float:
        """Seconds until the next poll (the queue waits no longer, so the table is read at least once a second)."""
        return max(0.0, self.next_poll - now)

    def poll(self, queue: Queue, now: float) -> None:
        """Read the table when due; drain the ready replicas on draining nodes; settle the draining ones.

        Runs on every turn of the queue's loop, before it feeds replicas: one that just became ready on a
        draining node retires before it gets a row."""
        if now >= self.next_poll:
            self.next_poll = now + self.poll_seconds
            try:
                self.nodes = dict(self.draining())
            except Exception:  # noqa: BLE001 - a GCS hiccup: keep the last table, try again at the next poll
                logger.warning("could not read the draining nodes; keeping the last known", exc_info=True)
        if not self.nodes and not any(s.state is SlotState.DRAINING for s in queue.slots):
            return
        for slot in list(queue.slots):
            node = slot.info.get("node")
            if slot.state is SlotState.READY and node in self.nodes:
                self._begin(queue, slot, now)
            elif slot.state is SlotState.DRAINING:
                if node in self.nodes:
                    slot.deadline = self.nodes[node]
                self.settle(queue, slot, now)

    def _begin(self, queue: Queue, slot: Slot, now: float) -> None:
        deadline = self.nodes[slot.info["node"]]
        queue.hungry.discard(slot)
        back = queue.take_back(slot, slot.drain(deadline))
        self.drained += back
        left = "no deadline" if deadline is None else f"{deadline - now:.0f} s left"
        logger.warning("replica %s#%d: its node %s is draining (%s); it takes no new rows, %d go back",
                       slot.pool.name, slot.index, slot.info["node"], left, back)
        self.settle(queue, slot, now)

    def settle(self, queue: Queue, slot: Slot, now: float) -> None:
        """A draining replica: hand its running batch back if it cannot end in time; retire it once it holds none."""
        if slot.flights and slot.deadline is not None:
            end = self.estimated_end(queue, slot, now)
            if end is None or end > slot.deadline - MARGIN:
                self.drained += queue.take_back(slot, slot.hand_back())
        if not slot.flights:
            queue.retire(slot)
            self.drains += 1

    def estimated_end(self, queue: Queue, slot: Slot, now: float) -> float | None:
        """When the running batch should end: its cost at the replica's speed (its pool's, before its first
        batch), from when it began; None without any speed measured."""
        flight = slot.flights[0]
        speed = slot.seconds_per_unit()
        if speed is None:
            peers = [s for s in queue.slots if s.pool is slot.pool and s.cost_done]
            if peers:
                speed = sum(s.flight_seconds for s in peers) / sum(s.cost_done for s in peers)
        if speed is None:
            return None
        return max(now, (flight.started if flight.started is not None else now) + speed * flight.cost())

    def lost(self, queue: Queue, slot: Slot, now: float) -> None:
        """A draining or preempted replica died: all its rows go back without an attempt, and it retires."""
        queue.hungry.discard(slot)
        self.drained += queue.take_back(slot, slot.fail(now))
        queue.retire(slot)
        self.drains += 1
