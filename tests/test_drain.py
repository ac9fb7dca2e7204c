"""Drains driven without Ray: fake nodes with GPUs, renders that take their cost's time on a fake clock, a fake
draining-node table.

The oracle: every row gets exactly one final manifest row; a row handed back for a drain (or lost with a
preempted actor) renders again elsewhere with its attempt count unchanged; a draining replica gets no row after
the drain is seen, keeps its running row exactly when that row's cost at its measured speed ends `MARGIN` before
the deadline, and retires; nothing new starts on the draining node.
"""

from __future__ import annotations

import itertools

import pytest

from kandinsky_batch.fleet.drain import MARGIN
from kandinsky_batch.fleet.scheduler import WorkQueue
from kandinsky_batch.fleet.slot import Pool, ReplicaDrained, ReplicaLost, SlotState
from kandinsky_batch.fleet.source import WindowList
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.output.record import BatchResult



def _task(i: int) -> Task:
    return Task(id=f"r{i}", row_index=i, prompt=f"p{i}", negative_prompt=None, seed=i, height=64, width=64,
                num_frames=33, num_inference_steps=64, guidance_scale=5.0)


SECONDS_PER_UNIT = 10.0 / _task(0).cost()  # every row renders in 10 s on every replica


class Ref:
    ids = itertools.count()

    def __init__(self, replica: "Replica", kind: str, done_at: float, batch=None):
        self.replica, self.kind, self.done_at, self.batch = replica, kind, done_at, batch
        self.n = next(self.ids)


class Replica:
    """A replica on a node: its renders run one after the other, each taking its rows' cost in seconds."""

    ranks = 1

    def __init__(self, world: "Cluster", index: int, node: str | None):
        self.world, self.index, self.node = world, index, node
        self.name = f"default#{index}@{node}"
        # Loads its model in a second, once placed: with no node to go to it waits, as Ray's pending actors do.
        self.busy_until = world.time + 1.0 if node else float("inf")
        self.received: list[tuple[float, list[str]]] = []  # (clock, row ids) per batch
        self.lost: str | None = None  # how it died: "preempted" or "crash"
        self.killed_at: float | None = None
        self._ready = [Ref(self, "ready", self.busy_until)]

    def ready(self) -> list:
        return self._ready

    def submit(self, batch: list) -> list:
        assert self.killed_at is None and self.lost is None, f"{self.name} got rows after it was gone"
        self.received.append((self.world.time, [task.id for task, _ in batch]))
        self.busy_until = max(self.world.time, self.busy_until) + sum(t.cost() for t, _ in batch) * SECONDS_PER_UNIT
        return [Ref(self, "render", self.busy_until, batch)]

    def kill(self) -> None:
        self.killed_at = self.world.time if self.killed_at is None else self.killed_at


class Cluster:
    """Fake Ray: nodes with one GPU each, placement on a node with room that is not draining, the draining table,
    a clock that jumps to the next render that ends."""

    def __init__(self, nodes: list[str], capacity_follows_drains: bool = True):
        self.nodes = list(nodes)
        self.follows = capacity_follows_drains  # False: a fixed fleet, as on a Ray cluster without GPUs
        self.time = 0.0
        self.spawned: list[Replica] = []
        self.drains: dict[str, float | None] = {}
        self.events: list[tuple[float, callable]] = []  # (clock, action) run once the clock reaches it

    def placeable(self) -> list[str]:
        taken = {r.node for r in self.spawned if r.killed_at is None and r.lost is None}
        return [n for n in self.nodes if n not in self.drains and n not in taken]

    def spawn(self, index: int) -> Replica:
        replica = Replica(self, index, next(iter(self.placeable()), None))
        self.spawned.append(replica)
        return replica

    def capacity(self) -> dict[str, int]:
        return {"default": len([n for n in self.nodes if n not in self.drains or not self.follows])}

    def draining(self) -> dict[str, float | None]:
        return dict(self.drains)

    def clock(self) -> float:
        return self.time

    def at(self, when: float, action) -> None:
        self.events.append((when, action))

    def lose(self, node: str, how: str) -> None:
        self.nodes.remove(node)
        for replica in self.spawned:
            if replica.node == node and replica.killed_at is None:
                replica.lost, replica.busy_until = how, self.time

    def _due(self, ref: Ref) -> float:
        return ref.replica.busy_until if ref.replica.lost else ref.done_at

    def wait(self, refs: list, timeout: float) -> list:
        live = [r for r in refs if r.replica.killed_at is None]
        until = self.time + timeout
        upcoming = min((when for when, _ in self.events), default=until)
        first = min(live, key=self._due, default=None)
        if first is not None and self._due(first) <= min(until, upcoming):
            self.time = max(self.time, self._due(first))
            return [first]
        self.time = min(until, upcoming)
        for event in [e for e in self.events if e[0] <= self.time]:
            self.events.remove(event)
            event[1]()
        return []

    def get(self, ref: Ref):
        replica = ref.replica
        if replica.lost == "preempted":
            raise ReplicaDrained(f"ActorDiedError: {replica.name} preempted")
        if replica.lost:
            raise ReplicaLost(f"ActorDiedError: {replica.name} died")
        if ref.kind == "ready":
            return {"worker": replica.name, "node": replica.node}
        return BatchResult([{**task.row(), "status": "ok", "attempts": attempt, "worker": replica.name,
                             "finished": self.time} for task, attempt in ref.batch])


def _run(cluster: Cluster, rows: int) -> tuple[WorkQueue, dict[str, dict]]:
    settled: list[dict] = []
    tasks = [_task(i) for i in range(rows)]
    queue = WorkQueue([Pool("default", cluster.spawn)], cluster, WindowList([{"default": tasks}]), max_attempts=3,
                      on_row=settled.append, wait=cluster.wait, get=cluster.get, clock=cluster.clock,
                      draining=cluster.draining, tick_seconds=1.0, fleet_seconds=1.0, no_replica_timeout=120.0)
    queue.run()
    by_id: dict[str, dict] = {}
    for row in settled:
        assert row["id"] not in by_id, f"{row['id']} settled twice"
        by_id[row["id"]] = row
    assert sorted(by_id) == sorted(t.id for t in tasks)
    assert all(r["status"] == "ok" for r in by_id.values())
    return queue, by_id


def _on(cluster: Cluster, node: str) -> list[Replica]:
    return [r for r in cluster.spawned if r.node == node]


def _rows_after(replica: Replica, when: float) -> list[str]:
    return [i for at, ids in replica.received if at > when for i in ids]


def test_a_far_deadline_lets_the_running_row_finish_then_the_replica_retires():
    cluster = Cluster(["head", "n2"])
    drained_at = 25.5  # n2 has finished two rows (its speed is measured) and runs its third, t = 21..31
    cluster.at(drained_at, lambda: cluster.drains.update(n2=drained_at + 60.0))
    queue, by_id = _run(cluster, rows=12)
    (n2,) = _on(cluster, "n2")
    running = n2.received[2][1][0]
    assert by_id[running]["worker"] == n2.name and by_id[running]["finished"] == pytest.approx(31.0)
    assert _rows_after(n2, drained_at) == []  # nothing new once the drain was seen
    queued = n2.received[3][1][0]  # prefetched behind the running row: it never started, so it went back
    assert by_id[queued]["worker"] != n2.name
    assert all(r["attempts"] == 1 for r in by_id.values())  # a drain costs no row an attempt
    assert n2.killed_at == pytest.approx(31.0)  # retired as soon as its row landed
    assert (queue.drains.drains, queue.drains.drained, queue.restarts, queue.retries) == (1, 1, 0, 0)
    assert [r.node for r in cluster.spawned] == ["head", "n2"]  # no replacement on the draining node
    assert [s.state for s in queue.slots] == [SlotState.RETIRED, SlotState.RETIRED]


def test_a_near_deadline_hands_the_running_row_back_before_it_without_an_attempt():
    cluster = Cluster(["head", "n2"])
    drained_at, deadline = 25.5, 29.0  # the running row needs until t = 31: past the deadline
    cluster.at(drained_at, lambda: cluster.drains.update(n2=deadline))
    queue, by_id = _run(cluster, rows=12)
    (n2,) = _on(cluster, "n2")
    running, queued = n2.received[2][1][0], n2.received[3][1][0]
    assert n2.killed_at is not None and n2.killed_at < deadline  # handed back and released before the deadline
    for row in (running, queued):
        assert by_id[row]["worker"] != n2.name and by_id[row]["attempts"] == 1  # rendered elsewhere, once
    assert (queue.drains.drains, queue.drains.drained, queue.restarts, queue.retries) == (1, 2, 0, 0)


@pytest.mark.parametrize("slack, kept", [(MARGIN + 0.5, True), (MARGIN - 0.5, False)])
def test_the_running_row_is_kept_exactly_when_its_cost_at_the_measured_speed_ends_a_margin_before(slack, kept):
    cluster = Cluster(["head", "n2"])
    # n2's third row began at t = 21 (its second landed) and costs 10 s at its measured speed: it ends at 31.
    cluster.at(25.5, lambda: cluster.drains.update(n2=21.0 + _task(0).cost() * SECONDS_PER_UNIT + slack))
    queue, by_id = _run(cluster, rows=12)
    (n2,) = _on(cluster, "n2")
    assert (by_id[n2.received[2][1][0]]["worker"] == n2.name) is kept


def test_a_drain_without_a_deadline_finishes_the_running_row_and_retires():
    cluster = Cluster(["head", "n2"])
    cluster.at(22.0, lambda: cluster.drains.update(n2=None))  # the running row only began: 9 s left
    queue, by_id = _run(cluster, rows=12)
    (n2,) = _on(cluster, "n2")
    assert by_id[n2.received[2][1][0]]["worker"] == n2.name
    assert _rows_after(n2, 22.0) == [] and n2.killed_at == pytest.approx(31.0)
    assert all(r["attempts"] == 1 for r in by_id.values())
    assert (queue.drains.drains, queue.drains.drained) == (1, 1)


def test_a_preempted_actor_is_a_drain_its_rows_back_without_an_attempt():
    cluster = Cluster(["head", "n2"])
    cluster.at(25.5, lambda: cluster.lose("n2", "preempted"))  # no drain seen first: the node just went
    queue, by_id = _run(cluster, rows=12)
    (n2,) = _on(cluster, "n2")
    for row in (n2.received[2][1][0], n2.received[3][1][0]):
        assert by_id[row]["worker"] != n2.name and by_id[row]["attempts"] == 1
    assert (queue.drains.drains, queue.drains.drained, queue.restarts, queue.retries) == (1, 2, 0, 0)


def test_a_crash_is_still_a_failure_that_costs_the_running_row_an_attempt():
    cluster = Cluster(["head", "n2"])
    cluster.at(25.5, lambda: cluster.lose("n2", "crash"))
    queue, by_id = _run(cluster, rows=12)
    (n2,) = _on(cluster, "n2")
    assert by_id[n2.received[2][1][0]]["attempts"] == 2 and by_id[n2.received[3][1][0]]["attempts"] == 1
    assert (queue.drains.drains, queue.restarts) == (0, 1)


def test_a_replica_that_becomes_ready_on_a_draining_node_retires_without_a_row():
    cluster = Cluster(["head", "n2"], capacity_follows_drains=False)
    cluster.at(0.5, lambda: cluster.drains.update(n2=100.0))  # while both replicas load their model
    queue, by_id = _run(cluster, rows=4)
    (n2,) = _on(cluster, "n2")
    assert n2.received == [] and n2.killed_at == pytest.approx(1.0)
    assert [r.node for r in cluster.spawned[2:]] == [None] * (len(cluster.spawned) - 2)  # never placed on n2
    assert {r["worker"] for r in by_id.values()} == {_on(cluster, "head")[0].name}
    assert (queue.drains.drains, queue.drains.drained) == (1, 0)


def test_a_drain_of_a_replica_without_a_measured_speed_uses_its_pools():
    cluster = Cluster(["head", "n2", "n3"])
    # n3 joins the fleet late (t = 1..12: capacity for two replicas), so its first row runs while head's and n2's
    # speed is known; drained then with 20 s left, that row (10 s at the pool's speed) is kept.
    cluster.drains["n3"] = None
    cluster.at(12.0, lambda: cluster.drains.pop("n3"))
    cluster.at(15.0, lambda: cluster.drains.update(n3=35.0))
    queue, by_id = _run(cluster, rows=12)
    (n3,) = _on(cluster, "n3")
    first = n3.received[0][1][0]
    assert by_id[first]["worker"] == n3.name and len(_rows_after(n3, 15.0)) == 0
    assert all(r["attempts"] == 1 for r in by_id.values())
