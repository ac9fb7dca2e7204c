"""Joining Ray and placing replicas: a local Ray bound to loopback, or an existing cluster.

A replica of several ranks (a gang) is placed with a placement group on one node, one GPU per rank
(one CPU slot per rank on a host without GPUs), and its ranks rendezvous at rank 0's address.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from kandinsky_batch.config.schema import ClusterConfig, ReplicaGroup
from kandinsky_batch.errors import ConfigError
from kandinsky_batch.fleet.local_ray import start_local
from kandinsky_batch.fleet.slot import ReplicaDrained, ReplicaLost
from kandinsky_batch.fleet.worker import RenderWorker, WorkerSpec
from pipelines import QUIET_ENV, SIMULATED, ParallelSpec, cpu_numerics_env


@contextmanager
def connect(cfg: ClusterConfig, *others: ClusterConfig, verbose: bool = False,
            phase: Callable[[str], None] = lambda text: None) -> Iterator[None]:
    """Join `cluster.address`, or start a local loopback-only Ray; shut down only what we started.

    A local Ray gets CPUs for the largest fleet among `cfg` and `others` (a sweep's models' gang shapes).
    `phase` hears what is being done; Ray's own start-up warnings show only when `verbose`."""
    clusters = (cfg, *others)
    import ray

    if ray.is_initialized():
        yield
        return
    # Ray's driver-side warnings at start (token auth switched on by default, ...) are advice to an operator of
    # Ray, not to a user of this job, and land inside the progress bar; errors still show. Actors' own output
    # still reaches the driver (`log_to_driver`): a replica's traceback is a real error.
    level = logging.WARNING if verbose else logging.ERROR
    with _callers_sigterm():
        if cfg.address:
            phase(f"joining Ray at {cfg.address}…")
            ray.init(address=cfg.address, logging_level=level, log_to_driver=True)
        else:
            phase("starting Ray…")
            ranks = max(sum(g.parallel().world_size * (g.replicas or 1) for g in c.replica_groups())
                        for c in clusters)
            start_local(num_cpus=cfg.num_cpus or max(os.cpu_count() or 1, ranks), include_dashboard=False,
                        logging_level=level, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _callers_sigterm() -> Iterator[None]:
    """Keep the caller's SIGTERM handler through `ray.init` (the job's, kandinsky_batch.interrupt).

    `ray.init` installs two of its own: `sys.exit(15)`, then for a local node one that drains the node for up to
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) and exits 1. Both go through this one function. (The core
    worker's C++ handler, which aborts, is installed too: the caller takes SIGTERM back once `init` returns.)
    """
    from ray._private import utils

    saved = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = saved


@dataclass(frozen=True)
class Placement:
    """One replica group and what each rank of its replicas asks of Ray."""

    group: ReplicaGroup
    parallel: ParallelSpec
    num_gpus: float
    num_cpus: float
    threads: int | None


def plan(cfg: ClusterConfig) -> list[Placement]:
    """What each group's ranks ask of Ray: one GPU each on a GPU cluster, an even share of the CPUs otherwise."""
    import ray

    groups = cfg.replica_groups()
    if cfg.device == "gpu" and not cfg.address and not ray.cluster_resources().get("GPU", 0):
        raise ConfigError(f"cluster.device={cfg.device!r}: the local Ray this job started has no GPU and no node can "
                          f"join it; join a cluster that can add GPU nodes (cluster.address), or use cpu/auto")
    if cfg.device == "gpu" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0)):
        return [Placement(g, g.parallel(), num_gpus=1, num_cpus=1, threads=None) for g in groups]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ranks = sum(g.parallel().world_size * (g.replicas or 1) for g in groups)
    # Share the cores evenly for scheduling, but render with one thread each: CPU GEMMs over a few rows
    # (text tokens) round differently with 1 and 2 threads, and the seed contract must hold whatever the
    # fleet's shape. CPU parallelism comes from replicas.
    share = max(1, cpus // ranks)
    return [Placement(g, g.parallel(), num_gpus=0, num_cpus=min(share, cpus), threads=1) for g in groups]


def fleet_size(groups: list[ReplicaGroup], gpus: int) -> dict[str, int]:
    """Replicas per group that `gpus` GPUs hold: fixed groups first (their `replicas` is a cap), the rest
    split evenly among the groups without one. A cluster without GPUs runs each group's `replicas` (or 1)."""
    if not gpus:
        return {g.name: g.replicas or 1 for g in groups}
    size, left = {}, gpus
    for group in [g for g in groups if g.replicas]:
        size[group.name] = min(group.replicas, left // group.parallel().world_size)
        left -= size[group.name] * group.parallel().world_size
    flexible = [g for g in groups if not g.replicas]
    for group in flexible:
        size[group.name] = left // len(flexible) // group.parallel().world_size
    return size


class RayFleet:
    """The fleet the cluster holds now: GPUs of the nodes alive (joined or lost mid-job), asked every call."""

    def __init__(self, cfg: ClusterConfig, gangs: dict[str, int] | None = None):
        self.groups = cfg.replica_groups()
        self.gangs = gangs or {}
        """Largest gang per group (a sweep's model may run wider gangs than the group's own shape)."""
        self.device = cfg.device
        """`gpu`: no GPU, no room (an autoscaler adds some); `cpu`: sized as on a host without GPUs."""

    def capacity(self) -> dict[str, int]:
        """Units (GPUs, or CPU ranks) per replica group: its replicas times their ranks. Without GPUs, at least
        the group's largest gang, so that every model of a sweep can run."""
        import ray

        gpus = total = int(ray.cluster_resources().get("GPU", 0)) if self.device != "cpu" else 0
        if self.device == "gpu" and not gpus:
            return {g.name: 0 for g in self.groups}
        gone = _draining_table(max_age=2.0)  # the queue reads it every second
        if gone:
            # A draining node's GPUs are going: replacements go elsewhere (Ray places nothing new there anyway).
            gpus -= sum(int(node["Resources"].get("GPU", 0)) for node in ray.nodes()
                        if node["Alive"] and node["NodeID"] in gone)
            if total and gpus <= 0:
                return {g.name: 0 for g in self.groups}
        size = fleet_size(self.groups, gpus)
        units = {g.name: size[g.name] * g.parallel().world_size for g in self.groups}
        return units if gpus else {name: max(n, self.gangs.get(name, 0)) for name, n in units.items()}


Fleet = RayFleet  # the name `job.run` asks every transport for (see kandinsky_batch.fleet.inprocess)

_table: tuple[float, dict[str, int]] = (float("-inf"), {})


def _draining_table(max_age: float = 0.0) -> dict[str, int]:
    """Ray's draining nodes, hex node id -> deadline in ms since the epoch (0: no deadline); one read at most
    `max_age` s old.

    Ray 2.60 has no public API for it: Ray Data (`ray.data._internal.utils.cached_ray_internals.get_draining_nodes`,
    cached for 1 s) and Train (`ray.train.v2._internal.execution.preemption._get_draining_nodes`) read
    `ray._private.state.state.get_draining_nodes()` (`GlobalState.get_draining_nodes`: the GCS's table), as here.
    """
    global _table
    from ray._private import state

    read_at, table = _table
    if time.monotonic() - read_at > max_age:
        table = dict(state.state.get_draining_nodes())
        _table = (time.monotonic(), table)
    return table


def draining() -> dict[str, float | None]:
    """The work queue's view of the drains: node id -> its deadline on `time.monotonic()`'s clock (None: none).

    `ray drain-node --deadline-remaining-seconds N` (`ray.scripts.scripts.drain_node`, a hidden CLI) stores
    now + N s in ms; without the option it stores 0, no deadline. Ray never removes a node at its deadline: its
    raylet exits once nothing runs there, with the drain's death reason (`LocalResourceManager::
    OnResourceOrStateChanged`, C++, not in the wheel; tests/test_fleet.py sees it happen), or its owner kills it."""
    offset = time.monotonic() - time.time()
    return {node: (ms / 1000 + offset if ms else None) for node, ms in _draining_table().items()}


def wait(refs: list, timeout: float) -> list:
    """Ray's wait for the work queue: a ref that finished within `timeout`, or none (an empty list pauses briefly).
    One at a time: the queue's loop per result is cheaper than a second `ray.wait` over every ref."""
    import time

    import ray

    if not refs:
        time.sleep(min(timeout, 0.05))
        return []
    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    return ready


def get(ref):
    """Ray's get for the work queue: a dead actor or a raising call becomes `ReplicaLost` with its cause, an actor
    lost to a drain of its node `ReplicaDrained`."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except (RayActorError, ActorDiedError, ActorUnavailableError, RayTaskError) as exc:
        # `RayActorError.preempted` (ray.exceptions): set by `ActorDiedError.__init__` when the node's death reason
        # is AUTOSCALER_DRAIN_PREEMPTED, i.e. the node was drained for preemption before it went.
        lost = ReplicaDrained if getattr(exc, "preempted", False) else ReplicaLost
        raise lost(_cause(exc)) from None


def _cause(exc: BaseException) -> str:
    """A one-line reason from a Ray exception (its cause's message, not the whole traceback)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip()


class ActorReplica:
    """One model replica: a single actor, or a gang of actors placed together on one node. `worker` is the actor's
    class: `RenderWorker`, or `ScoreWorker` for the scoring stage (the same calls)."""

    def __init__(self, placement: Placement, spec: WorkerSpec, index: int, worker: type = RenderWorker):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ranks = placement.parallel.world_size
        self.tickets = itertools.count()
        # Renders get their own threads (`render` group); rendezvous/join/ready run on the default one,
        # so rows queued ahead can never take the thread a gang's `join` needs to load the model.
        options = dict(num_gpus=placement.num_gpus, num_cpus=placement.num_cpus)
        if not spec.model_path.startswith(SIMULATED):
            # Every replica's download and loading bars would reach the driver's console through Ray's log
            # forwarding; on CPUs, one BLAS code path on every x86 CPU (AMD or Intel). Both are read when the
            # actor's process imports the libraries.
            env = {**QUIET_ENV, **({} if placement.num_gpus else cpu_numerics_env())}
            options["runtime_env"] = {"env_vars": env}
        actor_cls = ray.remote(max_restarts=0, max_task_retries=0,
                               concurrency_groups={"render": worker.CONCURRENCY})(worker)
        self.group = None
        if self.ranks == 1:
            self.members = [actor_cls.options(**options).remote(spec, index)]
            self._ready = [self.members[0].ready.remote()]
            return
        bundle = {"CPU": placement.num_cpus, **({"GPU": placement.num_gpus} if placement.num_gpus else {})}
        # STRICT_PACK: all ranks on one node, where NVLink (or shared memory) carries the all-to-alls.
        self.group = placement_group([bundle] * self.ranks, strategy="STRICT_PACK")
        self.members = [
            actor_cls.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=rank)).remote(spec, index, rank)
            for rank in range(self.ranks)
        ]
        address = self.members[0].rendezvous.remote()
        self._ready = [member.join.remote(address) for member in self.members]

    def ready(self) -> list:
        return self._ready

    def submit(self, batch: list) -> list:
        """Every rank gets the same rows and ticket; rank 0's result carries the manifest rows."""
        ticket = next(self.tickets)
        return [member.render.options(concurrency_group="render").remote(batch, ticket) for member in self.members]

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for member in self.members:
            ray.kill(member, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)


def spawner(placement: Placement, spec: WorkerSpec, pool: str | None = None, worker: type = RenderWorker):
    """A function index -> new replica of this group (of the work queue's pool `pool`, which names its replicas)."""
    ranked = replace(spec, num_threads=placement.threads, parallel=placement.parallel,
                     group=pool or placement.group.name)
    return lambda index: ActorReplica(placement, ranked, index, worker)


def gpus() -> int:
    """GPUs in the cluster now (the scoring stage puts model metrics on them)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))
