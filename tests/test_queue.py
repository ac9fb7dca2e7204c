"""The work queue as a state machine, driven without Ray: fake replicas, an injected `wait`/`get`, a fake clock.

Every fault path runs in milliseconds. The oracle is the same as the real-Ray tests': every row gets exactly
one final manifest row, attempts are counted as documented, and no row is ever handed to a replica that is
not ready.
"""

from __future__ import annotations

import itertools

import pytest

from kandinsky_batch.output.record import BatchResult, Stamp
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.errors import StorageOutage, WorkersFailed
from kandinsky_batch.fleet.scheduler import WorkQueue
from kandinsky_batch.fleet.source import WindowList
from kandinsky_batch.fleet.slot import Pool, ReplicaLost, SlotState
from pipelines.request import RenderOptions


def _task(i: int, frames: int = 5) -> Task:
    return Task(id=f"r{i}", row_index=i, prompt=f"p{i}", negative_prompt=None, seed=i, height=32, width=32,
                num_frames=frames, num_inference_steps=2, guidance_scale=1.0)


class Ref:
    ids = itertools.count()

    def __init__(self, replica: "FakeReplica", kind: str, batch=None, rank: int = 0):
        self.replica, self.kind, self.batch, self.rank = replica, kind, batch, rank
        self.n = next(self.ids)

    def __repr__(self) -> str:
        return f"Ref({self.replica.name}, {self.kind}, #{self.n})"


class FakeReplica:
    """A replica whose calls resolve when the test (or the world's default policy) says so."""

    def __init__(self, world: "World", pool: str, index: int, ranks: int = 1):
        self.world, self.pool, self.index, self.ranks = world, pool, index, ranks
        self.name = f"{pool}#{index}/{len(world.spawned)}"
        self.node = world.next_node
        self.alive, self.killed = True, False
        self.received: list[list] = []
        self._ready = [Ref(self, "ready", rank=r) for r in range(ranks)]

    def ready(self) -> list:
        return self._ready

    def submit(self, batch: list) -> list:
        assert self.alive and not self.killed, f"{self.name} got rows after it was lost"
        self.received.append(batch)
        return [Ref(self, "render", batch, rank=r) for r in range(self.ranks)]

    def kill(self) -> None:
        self.killed = True


class World:
    """Fake Ray: which refs are done, what `get` returns, nodes that come and go."""

    def __init__(self, capacity: dict[str, int], ranks: int = 1):
        self.cap = dict(capacity)
        self.ranks = ranks
        self.spawned: list[FakeReplica] = []
        self.unplaceable: set[str] = set()   # nodes where nothing can start
        self.next_node = "head"
        self.fail_rows: dict[str, int] = {}  # row id -> times its render fails
        self.crash_rows: dict[str, int] = {}  # row id -> times the replica dies rendering it
        self.outage_rows: set[str] = set()
        self.crash_nodes: dict[str, int] = {}  # node -> renders that kill the replica there
        self.broken_model = False
        self.time = 0.0

    def spawn(self, pool: str):
        def make(index: int) -> FakeReplica:
            replica = FakeReplica(self, pool, index, self.ranks)
            self.spawned.append(replica)
            return replica
        return make

    def capacity(self) -> dict[str, int]:
        return dict(self.cap)

    def clock(self) -> float:
        return self.time

    def lose_node(self, node: str) -> None:
        for replica in self.spawned:
            if replica.node == node:
                replica.alive = False

    def _done(self, ref: Ref) -> bool:
        replica = ref.replica
        if replica.killed and replica.alive:
            return False  # nobody waits for a killed replica's refs
        if ref.kind == "ready":
            return replica.node not in self.unplaceable or not replica.alive
        return True

    def wait(self, refs: list, timeout: float) -> list:
        self.time += timeout if not refs else 0.5
        done = [r for r in refs if self._done(r)]
        return done[:1]

    def get(self, ref: Ref):
        replica = ref.replica
        if not replica.alive:
            raise ReplicaLost(f"ActorDiedError: {replica.name} died with its node")
        if ref.kind == "ready":
            if self.broken_model:
                raise ReplicaLost("RuntimeError: cannot load the model")
            return {"worker": replica.name, "node": replica.node}
        if self.crash_nodes.get(replica.node, 0) > 0:
            self.crash_nodes[replica.node] -= 1
            replica.alive = False
            raise ReplicaLost(f"ActorDiedError: {replica.name} died")
        rows = []
        unstored = []
        for position, (task, attempt) in enumerate(ref.batch):
            if self.crash_rows.get(task.id, 0) > 0:
                self.crash_rows[task.id] -= 1
                replica.alive = False
                raise ReplicaLost(f"ActorDiedError: {replica.name} crashed on {task.id}")
            if task.id in self.outage_rows:
                unstored.append(position)
                continue
            if self.fail_rows.get(task.id, 0) > 0:
                self.fail_rows[task.id] -= 1
                rows.append({**task.row(), "status": "failed", "attempts": attempt, "error": "boom",
                             "worker": replica.name})
            else:
                rows.append({**task.row(), "status": "ok", "attempts": attempt, "worker": replica.name})
        if ref.rank != 0:
            return None
        return BatchResult(rows, tuple(unstored), "storage unavailable: down" if unstored else None)


def _queue(world: World, tasks: list[Task], pools=("default",), **kwargs) -> tuple[WorkQueue, list[dict]]:
    rows: list[dict] = []
    source = WindowList([{pools[0]: tasks[i:i + 8]} for i in range(0, len(tasks), 8)])
    defaults = dict(max_attempts=3, on_row=rows.append, wait=world.wait, get=world.get, clock=world.clock,
                    tick_seconds=1.0, fleet_seconds=1.0, no_replica_timeout=60.0)
    stamp = kwargs.pop("stamp", None)
    queue = WorkQueue([Pool(name, world.spawn(name), stamp=stamp) for name in pools], world, source,
                      **{**defaults, **kwargs})
    return queue, rows


def _once(rows: list[dict], tasks: list[Task]) -> dict[str, dict]:
    by_id = {}
    for row in rows:
        assert row["id"] not in by_id, f"{row['id']} settled twice"
        by_id[row["id"]] = row
    assert sorted(by_id) == sorted(t.id for t in tasks)
    return by_id


def test_every_row_settles_once_across_replicas():
    world = World({"default": 3})
    tasks = [_task(i) for i in range(40)]
    queue, rows = _queue(world, tasks)
    queue.run()
    by_id = _once(rows, tasks)
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in by_id.values())
    assert len({r["worker"] for r in rows}) == 3
    assert all(r.killed for r in world.spawned)  # GPUs released at the end


def test_a_replica_dying_mid_batch_costs_that_row_one_attempt_and_the_queued_rows_none():
    world = World({"default": 1})
    world.crash_rows = {"r3": 1}
    tasks = [_task(i) for i in range(10)]
    queue, rows = _queue(world, tasks)
    queue.run()
    by_id = _once(rows, tasks)
    assert by_id["r3"]["attempts"] == 2 and by_id["r3"]["status"] == "ok"
    assert all(r["attempts"] == 1 for i, r in by_id.items() if i != "r3")  # r4 was queued behind r3: no attempt
    assert queue.restarts == 1 and len(world.spawned) == 2


def test_a_row_that_kills_every_replica_fails_after_max_attempts():
    world = World({"default": 2})
    world.crash_rows = {"r5": 99}
    tasks = [_task(i) for i in range(12)]
    stamp = Stamp(model="sft", format="mp4", fps=24, options=RenderOptions(cache="magcache"))
    queue, rows = _queue(world, tasks, stamp=stamp)
    queue.run()
    by_id = _once(rows, tasks)
    assert by_id["r5"]["status"] == "failed" and by_id["r5"]["attempts"] == 3
    assert "worker died" in by_id["r5"]["error"]
    # The row the queue settles itself carries the job's values like a replica's own rows (`Stamp.row`).
    row = by_id["r5"]
    assert {k: row[k] for k in stamp.fields} == stamp.fields and row["options"] == '{"cache": "magcache"}'
    assert row["worker"].startswith("default#") and "gang" in row
    assert all(r["status"] == "ok" for i, r in by_id.items() if i != "r5")


def test_render_errors_are_retried_then_recorded():
    world = World({"default": 2})
    world.fail_rows = {"r1": 1, "r2": 5}
    tasks = [_task(i) for i in range(6)]
    queue, rows = _queue(world, tasks)
    queue.run()
    by_id = _once(rows, tasks)
    assert (by_id["r1"]["status"], by_id["r1"]["attempts"]) == ("ok", 2)
    assert (by_id["r2"]["status"], by_id["r2"]["attempts"]) == ("failed", 3)
    assert queue.retries == 3 and queue.restarts == 0  # a render error is the row's, not the replica's


def test_a_gang_member_failure_rebuilds_the_gang_and_requeues_rows_behind():
    world = World({"default": 1}, ranks=2)
    world.fail_rows = {"r2": 1}
    tasks = [_task(i) for i in range(8)]
    queue, rows = _queue(world, tasks)
    queue.run()
    by_id = _once(rows, tasks)
    assert by_id["r2"]["attempts"] == 2 and by_id["r2"]["status"] == "ok"
    assert queue.restarts == 1 and len(world.spawned) == 2
    assert all(r["attempts"] == 1 for i, r in by_id.items() if i != "r2")


def test_a_storage_outage_stops_feeding_keeps_progress_and_unstored_rows_unsettled():
    world = World({"default": 1})
    world.outage_rows = {"r4"}
    tasks = [_task(i) for i in range(20)]
    queue, rows = _queue(world, tasks)
    with pytest.raises(StorageOutage, match="storage unavailable"):
        queue.run()
    settled = {r["id"] for r in rows}
    assert "r4" not in settled and {"r0", "r1", "r2", "r3"} <= settled
    assert len(settled) < 20  # stopped feeding: a re-run continues
    assert all(r.killed for r in world.spawned)


def test_a_lost_node_requeues_its_rows_and_the_job_finishes_on_the_rest():
    world = World({"default": 2})
    world.next_node = "head"
    tasks = [_task(i) for i in range(30)]
    queue, rows = _queue(world, tasks)
    # Replica 1 lives on node "n2": lose the node once a few rows have landed; its GPU never comes back.
    spawn = world.spawn("default")

    def placed(index: int) -> FakeReplica:
        world.next_node = "n2" if index == 1 else "head"
        return spawn(index)

    queue.pools["default"].spawn = placed
    original = queue.on_tick

    def tick(q):
        original(q)
        if len(rows) >= 6 and world.cap["default"] == 2:
            world.lose_node("n2")
            world.unplaceable.add("n2")
            world.cap["default"] = 1  # Ray notices the node is gone
    queue.on_tick = tick
    queue.run()
    by_id = _once(rows, tasks)
    assert all(r["status"] == "ok" for r in by_id.values())
    lost = [r for r in world.spawned if r.node == "n2"]
    assert lost and all(not r.alive for r in lost)
    # Nothing was handed to a replica on the lost node after it was lost, and the job did not wait for it.
    assert sum(1 for r in rows if r["worker"].startswith("default#1")) < 30
    assert [s.state for s in queue.slots].count(SlotState.RETIRED) == len(queue.slots)


def test_a_replacement_that_cannot_be_placed_holds_no_rows():
    world = World({"default": 2})
    tasks = [_task(i) for i in range(16)]
    queue, rows = _queue(world, tasks)
    spawn = world.spawn("default")
    made = []

    def placed(index: int) -> FakeReplica:
        # The first replica on node n2 dies at its first row; its replacement lands on n2 again, which has no room.
        world.next_node = "n2" if index == 1 else "head"
        replica = spawn(index)
        made.append(replica)
        return replica

    queue.pools["default"].spawn = placed
    world.crash_nodes = {"n2": 1}

    def tick(q):
        if len([r for r in made if r.node == "n2"]) > 1:
            world.unplaceable.add("n2")
    queue.on_tick = tick
    queue.run()
    _once(rows, tasks)
    stuck = [r for r in made if r.node == "n2"][1:]
    assert stuck and all(r.received == [] for r in stuck)


def test_new_gpus_get_replicas_and_rows():
    world = World({"default": 1})
    tasks = [_task(i) for i in range(60)]
    queue, rows = _queue(world, tasks)

    def tick(q):
        if len(rows) == 10:
            world.cap["default"] = 3  # two GPUs joined
    queue.on_tick = tick
    queue.run()
    _once(rows, tasks)
    workers = {r["worker"] for r in rows}
    assert len(world.spawned) == 3 and len(workers) == 3
    late = [r for r in rows[10:] if not r["worker"].startswith("default#0")]
    assert late, "the new replicas took no rows"


def test_the_fleet_cap_is_respected():
    world = World({"default": 2})
    tasks = [_task(i) for i in range(20)]
    queue, rows = _queue(world, tasks)
    queue.run()
    assert len(world.spawned) == 2


def test_no_replica_for_too_long_stops_with_workers_failed_and_keeps_rows(caplog):
    world = World({"default": 0})
    tasks = [_task(i) for i in range(5)]
    queue, rows = _queue(world, tasks, no_replica_timeout=30.0)
    with pytest.raises(WorkersFailed, match="no_replica_timeout"):
        queue.run()
    assert rows == [] and queue.queued() == 5
    # Said at once, not only when the wait ends.
    assert [r.message for r in caplog.records].count(
        "replica group 'default' has no room in the cluster now ({'default': 0}); waiting up to 30 s "
        "(cluster.no_replica_timeout) for GPUs to join") == 1


def test_a_model_that_cannot_load_fails_fast():
    world = World({"default": 2})
    world.broken_model = True
    tasks = [_task(i) for i in range(5)]
    queue, rows = _queue(world, tasks)
    with pytest.raises(WorkersFailed, match="failed to start 3 times: RuntimeError: cannot load the model"):
        queue.run()
    assert all(r.killed for r in world.spawned)


def test_rows_go_to_their_own_pool():
    world = World({"short": 1, "long": 1})
    short, long = [_task(i) for i in range(6)], [_task(i, frames=9) for i in range(6, 10)]
    rows: list[dict] = []
    source = WindowList([{"short": short, "long": long}])
    queue = WorkQueue([Pool("short", world.spawn("short")), Pool("long", world.spawn("long"))], world, source,
                      max_attempts=3, on_row=rows.append, wait=world.wait, get=world.get, clock=world.clock)
    queue.run()
    by_id = _once(rows, short + long)
    assert {by_id[t.id]["worker"].split("#")[0] for t in long} == {"long"}
    assert {by_id[t.id]["worker"].split("#")[0] for t in short} == {"short"}


def test_busy_fraction_counts_time_with_a_batch():
    world = World({"default": 1})
    tasks = [_task(i) for i in range(4)]
    queue, rows = _queue(world, tasks)
    queue.run()
    (slot,) = queue.slots
    assert 0.0 < slot.busy_seconds <= world.time


def test_illegal_transitions_raise():
    world = World({"default": 1})
    queue, _ = _queue(world, [_task(0)])
    from kandinsky_batch.fleet.slot import Flight, Slot

    slot = Slot(queue.pools["default"], 0, FakeReplica(world, "default", 0), 0.0)
    with pytest.raises(RuntimeError, match="transition needs state"):
        slot.dispatch(Flight(0, [], []), 0.0)  # still starting: no rows for it
    slot.started({}, 0.0)
    slot.dispatch(Flight(0, [(_task(0), 1)], ["ref"]), 0.0)
    with pytest.raises(RuntimeError, match="batches in flight"):
        slot.retire()


# -- several models in one group (a sweep) -------------------------------------------------------------------


def _models_queue(world: World, windows: list[dict], **kwargs) -> tuple[WorkQueue, list[dict]]:
    rows: list[dict] = []
    pools = [Pool(name, world.spawn(name), group="default") for name in windows[0]]
    defaults = dict(max_attempts=3, on_row=rows.append, wait=world.wait, get=world.get, clock=world.clock,
                    tick_seconds=1.0, fleet_seconds=1.0, no_replica_timeout=60.0)
    return WorkQueue(pools, world, WindowList(windows), **{**defaults, **kwargs}), rows


def test_models_split_a_group_by_their_remaining_work():
    world = World({"default": 4})
    a, b = [_task(i) for i in range(30)], [_task(i) for i in range(30, 40)]
    queue, rows = _models_queue(world, [{"a": a, "b": b}])
    queue.run()
    by_id = _once(rows, a + b)
    assert [r.pool for r in world.spawned[:4]].count("a") == 3  # 30 rows against 10: three replicas to one
    assert {by_id[t.id]["worker"].split("#")[0] for t in a} == {"a"}
    assert {by_id[t.id]["worker"].split("#")[0] for t in b} == {"b"}


def test_a_replica_whose_model_has_no_rows_left_reloads_as_one_that_has():
    world = World({"default": 2})
    a, b = [_task(i) for i in range(2)], [_task(i) for i in range(2, 22)]
    queue, rows = _models_queue(world, [{"a": a, "b": b}])
    queue.run()
    by_id = _once(rows, a + b)
    assert [r.pool for r in world.spawned[:2]] == ["b", "b"]  # b has ten times the work
    assert queue.switches >= 1 and len(world.spawned) == 2 + queue.switches
    assert {by_id[t.id]["worker"].split("#")[0] for t in a} == {"a"}
    switched = [r for r in world.spawned if r.pool == "b" and r.killed]
    # A b replica was torn down only once b had no rows waiting: every b row was handed out before the first a.
    first_a = next(i for i, r in enumerate(world.spawned) if r.pool == "a")
    assert switched and all(r.received for r in world.spawned[:first_a])


@pytest.mark.timeout(20)
def test_a_backlog_of_another_model_never_stalls_the_queue():
    """Streaming windows, one replica: its model runs dry while the queue is full of the other model's rows,
    so no more windows are pulled; it must switch rather than wait for rows that cannot come."""
    world = World({"default": 1})
    windows = [{"a": [_task(i) for i in range(w * 16, w * 16 + 8)], "b": [_task(i) for i in range(w * 16 + 8, w * 16 + 16)]}
               for w in range(4)]
    queue, rows = _models_queue(world, windows, low_water=4)
    queue.run()
    _once(rows, [t for w in windows for tasks in w.values() for t in tasks])
    assert queue.switches >= 1


def test_pools_take_units_of_their_group_by_their_gang_size():
    world = World({"default": 4})
    a, b = [_task(i) for i in range(20)], [_task(i) for i in range(20, 40)]
    rows: list[dict] = []
    pools = [Pool("a", world.spawn("a"), group="default", ranks=2), Pool("b", world.spawn("b"), group="default")]
    queue = WorkQueue(pools, world, WindowList([{"a": a, "b": b}]), max_attempts=3, on_row=rows.append,
                      wait=world.wait, get=world.get, clock=world.clock)
    queue.run()
    _once(rows, a + b)
    first = [r.pool for r in world.spawned[:3]]
    assert sorted(first) == ["a", "b", "b"]  # 4 units: a gang of 2 and two single replicas


def test_a_gang_model_takes_as_many_idle_replicas_as_it_needs_gpus():
    world = World({"default": 2})
    a, b = [_task(i) for i in range(20)], [_task(i) for i in range(20, 24)]
    rows: list[dict] = []
    pools = [Pool("a", world.spawn("a"), group="default"), Pool("b", world.spawn("b"), group="default", ranks=2)]
    queue = WorkQueue(pools, world, WindowList([{"a": a, "b": b}]), max_attempts=3, on_row=rows.append,
                      wait=world.wait, get=world.get, clock=world.clock)
    queue.run()
    by_id = _once(rows, a + b)
    assert [r.pool for r in world.spawned] == ["a", "a", "b"]  # b waits for both GPUs, then gets them
    assert queue.switches == 2
    assert {by_id[t.id]["worker"].split("#")[0] for t in b} == {"b"}
