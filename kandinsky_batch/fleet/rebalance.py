"""How many replicas each pool has: the work queue's policy that follows the fleet and rebalances between models.

- It follows the fleet: every few seconds it asks `Fleet.capacity()` how many units (GPUs) each replica group
  may use now, starts slots up to it (GPUs joined) and retires starting slots beyond it (a node was lost). A
  slot gets rows only once its replica is ready, so a replacement that cannot be placed never holds rows.
- It splits a group among the pools of several models (a sweep) by their remaining work: each new slot goes
  to the pool with the most work per replica (D'Hondt apportionment, the cost model's units). A replica
  keeps its model while its pool has rows; once its pool has none left and none can come now (every row
  is known, or the queue is full of other models' rows), it is torn down and reloaded as the model with
  the most work per replica (`switches`), so no GPU idles while any model has rows waiting.
"""

from __future__ import annotations

import logging
from typing import Protocol

from kandinsky_batch.fleet.slot import Pool, Slot, SlotState

logger = logging.getLogger(__name__)


class Fleet(Protocol):
    def capacity(self) -> dict[str, int]: ...  # units (GPUs) each replica group may use now


class Replicas(Protocol):
    """What the policy reads of the work queue, and the two changes it makes to it (start and retire a slot)."""

    pools: dict[str, Pool]
    slots: list[Slot]
    fleet: Fleet
    no_replica_timeout: float
    warned: set[str]   # groups already warned of having no room
    switches: int      # replicas torn down to reload as another model

    @property
    def exhausted(self) -> bool: ...       # no more rows will come from the front end
    def full(self) -> bool: ...            # the queue holds as many waiting rows as it takes
    def live(self, pool: Pool) -> list[Slot]: ...
    def start(self, pool: Pool, now: float) -> Slot: ...
    def retire(self, slot: Slot) -> None: ...


def groups(queue: Replicas) -> dict[str, list[Pool]]:
    """The queue's pools by replica group."""
    found: dict[str, list[Pool]] = {}
    for pool in queue.pools.values():
        found.setdefault(pool.group, []).append(pool)
    return found


def used(queue: Replicas, group: str) -> int:
    """Units (GPUs) the group's live slots take; a draining one's are its node's, which the fleet no longer counts."""
    return sum(s.pool.ranks for s in queue.slots
               if s.pool.group == group and s.state not in (SlotState.RETIRED, SlotState.DRAINING))


def work(queue: Replicas, pool: Pool) -> float:
    """Rows left for the pool, in the cost model's units: waiting and on its replicas."""
    flying = sum(t.cost() for s in queue.live(pool) for f in s.flights for t, _ in f.batch)
    return flying + sum(task.cost() for task, _ in pool.pending)


def neediest(queue: Replicas, pools: list[Pool], free: int, remaining: dict[str, float]) -> Pool | None:
    """The pool a new replica of this group should serve: the most work per GPU (a gang of 2 counts twice),
    among pools with rows a new replica would get. A group of one pool keeps its replicas while rows may
    still come."""
    best, best_score = None, -1.0
    for pool in pools:
        live = queue.live(pool)
        if pool.ranks > free:
            continue
        if (queue.exhausted or len(pools) > 1) and \
                len(live) >= len(pool.pending) + sum(1 for s in live if s.flights):
            continue  # every row it has is on a replica already
        score = remaining[pool.name] / ((len(live) + 1) * pool.ranks)  # work per GPU once it has one more
        if score > best_score:
            best, best_score = pool, score
    return best


def reconcile(queue: Replicas, now: float) -> None:
    """Start slots where the fleet offers room, each for the neediest pool; retire starting ones beyond it."""
    capacity = queue.fleet.capacity()
    for group, pools in groups(queue).items():
        budget, taken = capacity.get(group, 0), used(queue, group)
        if not budget and not taken and group not in queue.warned:
            queue.warned.add(group)
            logger.warning("replica group %r has no room in the cluster now (%s); waiting up to %.0f s "
                           "(cluster.no_replica_timeout) for GPUs to join", group, capacity, queue.no_replica_timeout)
        remaining = {p.name: work(queue, p) for p in pools} if taken < budget else {}
        while taken < budget:
            pool = neediest(queue, pools, budget - taken, remaining)
            if pool is None:
                break
            queue.start(pool, now)
            taken += pool.ranks
        # Retire the newest starting slots beyond capacity: they hold no rows.
        for slot in reversed([s for s in queue.slots if s.pool.group == group]):
            if taken <= budget:
                break
            if slot.state is SlotState.STARTING:
                queue.retire(slot)
                taken -= slot.pool.ranks


def switch(queue: Replicas, now: float) -> None:
    """Ready replicas with nothing to do whose pools are empty reload as the model of their group with the most
    work per GPU, if any has rows waiting for a replica (a gang takes as many idle replicas as it needs GPUs).
    Only once no more rows can come for their own models now: every row is known, or the queue holds as many
    rows as it takes (other models' backlog)."""
    if len(queue.pools) == 1 or not (queue.exhausted or queue.full()):
        return
    idle = [s for s in queue.slots if s.state is SlotState.READY and not s.flights and not s.pool.pending]
    if not idle:
        return
    capacity = queue.fleet.capacity()
    for group, pools in groups(queue).items():
        spare = [s for s in idle if s.pool.group == group]
        while spare:
            free = capacity.get(group, 0) - used(queue, group)
            remaining = {p.name: work(queue, p) for p in pools}
            target = neediest(queue, pools, free + sum(s.pool.ranks for s in spare), remaining)
            if target is None:
                break
            while free < target.ranks:
                slot = spare.pop()
                queue.retire(slot)
                free += slot.pool.ranks
                queue.switches += 1
                logger.info("replica %s#%d reloads as %s (%d rows waiting)", slot.pool.name, slot.index,
                            target.name, len(target.pending))
            queue.start(target, now)
