"""The autoscaler's ask: what the remaining work wants (pure), how a job sends and withdraws it (fakes), and how
Ray's shared AutoscalingCoordinator unions jobs' asks, keeps one job's when another withdraws, and lets a dead
driver's lapse (the coordinator itself, driven without Ray through the clock and sender it takes for tests)."""

from __future__ import annotations

import pytest

from kandinsky_batch.config.schema import ClusterConfig, ReplicaGroup
from kandinsky_batch.fleet import autoscale
from kandinsky_batch.fleet.autoscale import Autoscale, PoolWork, gang_bundle, wanted
from tests.test_queue import World, _queue, _task

GPU1 = {"CPU": 1, "GPU": 1}
GANG2 = {"CPU": 2, "GPU": 2}


def _dhondt(works: dict[str, float], batches: dict[str, int], cap: int) -> dict[str, int]:
    """The reference split of `cap` single-unit replicas: the `cap` largest quotients work/k, k <= batches."""
    quotients = sorted(((w / k, name) for name, w in works.items() for k in range(1, batches[name] + 1)),
                       reverse=True)[:cap]
    return {name: sum(1 for _, n in quotients if n == name) for name in works}


def test_gang_bundle_is_the_whole_gang_without_zero_resources():
    assert gang_bundle(1, 1, 1) == GPU1
    assert gang_bundle(4, 1, 1) == {"CPU": 4, "GPU": 4}
    assert gang_bundle(2, 0, 3) == {"CPU": 6}


def test_caps_are_each_groups_replicas_times_its_gang():
    assert autoscale.caps(ClusterConfig()) == {"default": None}
    assert autoscale.caps(ClusterConfig(replicas=3)) == {"default": 3}
    cfg = ClusterConfig(groups=[ReplicaGroup(name="short", replicas=4),
                                ReplicaGroup(name="long", replicas=2, sequence_parallel=2), ReplicaGroup(name="any")])
    assert autoscale.caps(cfg) == {"short": 4, "long": 4, "any": None}


@pytest.mark.parametrize("batches, cap, expected", [(10, 3, 3), (2, 4, 2), (0, 4, 0), (7, None, 7)])
def test_one_bundle_per_replica_the_work_can_use_within_the_cap(batches, cap, expected):
    pools = [PoolWork("default", "default", 1, GPU1, batches, float(batches))]
    assert wanted(pools, {"default": cap}) == [GPU1] * expected


def test_a_gang_is_one_bundle_and_the_cap_counts_its_gpus():
    pools = [PoolWork("default", "default", 2, GANG2, batches=10, work=10.0)]
    assert wanted(pools, {"default": 6}) == [GANG2] * 3
    assert wanted(pools, {"default": 5}) == [GANG2] * 2  # a third gang does not fit in the 1 unit left


def test_a_capped_group_is_split_between_models_by_their_work():
    works, batches = {"a": 30.0, "b": 12.0}, {"a": 9, "b": 9}
    pools = [PoolWork(n, "default", 1, {**GPU1, "tag": i}, batches[n], works[n]) for i, n in enumerate(works)]
    asked = wanted(pools, {"default": 4})
    split = _dhondt(works, batches, 4)
    assert asked == [pools[0].bundle] * split["a"] + [pools[1].bundle] * split["b"]


def test_each_group_has_its_own_cap():
    pools = [PoolWork("short", "short", 1, GPU1, 9, 9.0), PoolWork("long", "long", 2, GANG2, 9, 9.0)]
    assert wanted(pools, {"short": 2, "long": None}) == [GPU1] * 2 + [GANG2] * 9


class Recorder:
    """A coordinator that keeps every ask and withdrawal."""

    def __init__(self, fail: bool = False):
        self.asks: list[list[dict]] = []
        self.cancels = 0
        self.fail = fail

    def request(self, bundles, ttl):
        if self.fail:
            raise ConnectionError("coordinator unreachable")
        self.asks.append(bundles)

    def cancel(self):
        self.cancels += 1


def test_the_ask_follows_the_work_queue_down_and_is_withdrawn_at_the_end():
    world = World({"default": 3})
    tasks = [_task(i) for i in range(30)]
    coordinator = Recorder()
    scaler = Autoscale(coordinator, {"default": GPU1}, {"default": 4}, clock=world.clock, every=0.0)
    queue, rows = _queue(world, tasks, on_tick=scaler)
    queue.run()
    scaler.close()
    assert len(rows) == 30
    sizes = [len(ask) for ask in coordinator.asks]
    assert sizes[0] == 4  # the cap, while rows outnumber it
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 4  # lowered as work ran out, never raised
    assert all(ask == [GPU1] * len(ask) for ask in coordinator.asks)
    assert coordinator.cancels == 1 and scaler.sent is None


def test_an_unchanged_ask_is_sent_again_only_to_refresh_it():
    clock = [0.0]
    world = World({"default": 1})
    queue, _ = _queue(world, [_task(i) for i in range(20)])
    queue._pull()
    coordinator = Recorder()
    scaler = Autoscale(coordinator, {"default": GPU1}, {"default": 2}, clock=lambda: clock[0], every=2.0, refresh=20.0)
    for t in (0.0, 1.0, 2.0, 10.0, 21.0):
        clock[0] = t
        scaler(queue)
    assert coordinator.asks == [[GPU1] * 2, [GPU1] * 2]  # t=0, then the refresh at t=21


def test_a_failing_coordinator_never_stops_the_job(caplog):
    world = World({"default": 2})
    tasks = [_task(i) for i in range(6)]
    scaler = Autoscale(Recorder(fail=True), {"default": GPU1}, {"default": 2}, clock=world.clock, every=0.0)
    queue, rows = _queue(world, tasks, on_tick=scaler)
    queue.run()
    scaler.close()
    assert len(rows) == 6
    assert sum("could not ask the autoscaler" in r.message for r in caplog.records) == 1  # warned once


def test_no_autoscaler_is_asked_on_a_local_ray_or_in_process():
    bundles = {"default": GPU1}
    assert autoscale.for_job(ClusterConfig(), bundles, 1, "r") is autoscale.OFF
    assert autoscale.for_job(ClusterConfig(address="inprocess"), bundles, 1, "r") is autoscale.OFF
    joined = autoscale.for_job(ClusterConfig(address="auto", replicas=3), bundles, 1, "run1")
    assert isinstance(joined, Autoscale) and joined.limits == {"default": 3}
    assert joined.coordinator.requester == "kandinsky-batch:run1" and joined.coordinator._actor is None  # lazy
    autoscale.OFF(None)
    autoscale.OFF.close()


class Direct:
    """One job's end of Ray's coordinator actor, called directly (no Ray): the calls RayCoordinator makes."""

    def __init__(self, actor, requester: str):
        self.actor, self.requester = actor, requester

    def request(self, bundles, ttl):
        self.actor.request_resources(requester_id=self.requester, resources=bundles, expire_after_s=ttl)

    def cancel(self):
        self.actor.cancel_request(self.requester)


class Queue:
    """The little of a work queue `demand` reads: pools of pending rows, no replicas."""

    def __init__(self, pools):
        self.pools = {p.name: p for p in pools}

    def live(self, pool):
        return []


def _pending(rows: int):
    from kandinsky_batch.fleet.slot import Pool

    pool = Pool("default", spawn=lambda index: None)
    pool.pending.extend((_task(i), 0) for i in range(rows))
    return Queue([pool])


def test_rays_coordinator_unions_jobs_keeps_one_when_another_withdraws_and_lets_a_dead_drivers_lapse():
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor

    now, sent = [0.0], []
    actor = _AutoscalingCoordinatorActor(get_current_time=lambda: now[0],
                                         send_resources_request=lambda bundles, label_selectors=None:
                                         sent.append(bundles), get_cluster_nodes=lambda: [])
    a = Autoscale(Direct(actor, "kandinsky-batch:a"), {"default": GPU1}, {"default": 2}, clock=lambda: now[0],
                  ttl=60.0, refresh=20.0, every=0.0)
    b = Autoscale(Direct(actor, "kandinsky-batch:b"), {"default": GANG2}, {"default": None}, clock=lambda: now[0],
                  ttl=60.0, refresh=20.0, every=0.0)
    a(_pending(5))
    b(_pending(3))
    assert sent[-1] == [GPU1] * 2 + [GANG2] * 3  # the union, not the last caller's
    a.close()
    assert sent[-1] == [GANG2] * 3  # a's end keeps b's ask
    a2 = Autoscale(Direct(actor, "kandinsky-batch:a2"), {"default": GPU1}, {"default": 1}, clock=lambda: now[0],
                   ttl=60.0, refresh=20.0, every=0.0)
    queue = _pending(4)
    for t in range(0, 100, 10):  # a2 refreshes; b's driver is dead and never does again
        now[0] = float(t)
        a2(queue)
        actor._tick()
    assert sent[-1] == [GPU1]  # b lapsed after its 60 s TTL, a2 kept alive by its refreshes
    a2.close()
    assert sent[-1] == []  # nothing asked once every job is gone


@pytest.mark.parametrize("device, resources, gpu_ranks, room", [
    ("gpu", {"CPU": 4}, True, 0),               # a GPU pool scaled to zero: no room until GPUs join
    ("gpu", {"CPU": 4, "GPU": 2}, True, 2),
    ("auto", {"CPU": 4}, False, 1),             # a CPU host: one CPU replica
    ("auto", {"CPU": 4, "GPU": 3}, True, 3),
    ("cpu", {"CPU": 4, "GPU": 3}, False, 1),    # CPU ranks, sized as on a host without GPUs
])
def test_cluster_device_decides_what_a_rank_takes(monkeypatch, device, resources, gpu_ranks, room):
    import ray

    from kandinsky_batch.fleet import cluster

    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))
    monkeypatch.setattr(cluster, "_draining_table", lambda max_age=0.0: {})  # no node draining
    cfg = ClusterConfig(device=device, address="auto")
    (placement,) = cluster.plan(cfg)
    assert (placement.num_gpus == 1) is gpu_ranks
    assert cluster.RayFleet(cfg).capacity() == {"default": room}


def test_gpus_on_a_local_ray_without_any_are_refused_at_once(monkeypatch):
    import ray

    from kandinsky_batch.errors import ConfigError
    from kandinsky_batch.fleet import cluster

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4})
    with pytest.raises(ConfigError, match="cluster.device='gpu'"):
        cluster.plan(ClusterConfig(device="gpu"))


def test_an_unknown_device_is_refused_naming_the_key():
    from kandinsky_batch.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="cluster.device"):
        ClusterConfig(device="tpu")


def test_without_ray_data_nothing_is_asked_and_the_operator_is_told(monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pandas" else real(name, *a))
    assert autoscale.for_job(ClusterConfig(address="auto"), {"default": GPU1}, 1, "r") is autoscale.OFF
    assert any("ray[data]" in r.message for r in caplog.records)
