"""Joining Ray and placing replicas: a local Ray bound to loopback, or an existing cluster.

A replica of several ranks (a gang) is placed with a placement group on one node, one GPU per rank
(one CPU slot per rank on a host without GPUs), and its ranks rendezvous at rank 0's address.
"""

from __future__ import annotations

import itertools
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

from kandinsky_batch.config import ClusterConfig, ReplicaGroup
from kandinsky_batch.scheduler import WorkersFailed
from kandinsky_batch.worker import RenderWorker, WorkerSpec
from pipelines import SIMULATED, ParallelSpec, cpu_numerics_env


def loopback_only() -> None:
    """Make the local Ray we are about to start a single-machine instance bound to 127.0.0.1 only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when `ray` is first imported, and on Linux an unset
    value means "bind the host's network address". So set the variable (for every Ray process we spawn)
    and the constant already read from it (for this one), whatever the caller's environment says.
    Only for a local Ray: a driver joining a real cluster must keep advertising its network address.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def connect(cfg: ClusterConfig) -> Iterator[None]:
    """Join `cluster.address`, or start a local loopback-only Ray; shut down only what we started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg.address:
        ray.init(address=cfg.address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ranks = sum(g.parallel().world_size * (g.replicas or 1) for g in cfg.replica_groups())
        loopback_only()
        ray.init(address="local", num_cpus=cfg.num_cpus or max(os.cpu_count() or 1, ranks),
                 include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Placement:
    """One replica group's size and what each of its ranks asks of Ray."""

    group: ReplicaGroup
    parallel: ParallelSpec
    replicas: int
    num_gpus: float
    num_cpus: float
    threads: int | None


def plan(cfg: ClusterConfig) -> list[Placement]:
    """Size every replica group: one rank per GPU on a GPU cluster, CPU slots shared evenly otherwise."""
    import ray

    groups = cfg.replica_groups()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    placements = []
    if gpus:
        fixed = sum(g.parallel().world_size * g.replicas for g in groups if g.replicas)
        flexible = [g for g in groups if not g.replicas]
        for group in groups:
            width = group.parallel().world_size
            replicas = group.replicas or max(0, (gpus - fixed) // len(flexible) // width)
            if replicas < 1:
                raise WorkersFailed(f"replica group {group.name!r} needs {width} GPU(s) per replica; "
                                    f"the cluster has {gpus} GPU(s) and other groups take {fixed}")
            placements.append(Placement(group, group.parallel(), replicas, num_gpus=1, num_cpus=1, threads=None))
        return placements
    ranks = sum(g.parallel().world_size * (g.replicas or 1) for g in groups)
    # Share the cores evenly for scheduling, but render with one thread each: CPU GEMMs over a few rows
    # (text tokens) round differently with 1 and 2 threads, and the seed contract must hold whatever the
    # fleet's shape. CPU parallelism comes from replicas.
    share = max(1, cpus // ranks)
    return [Placement(g, g.parallel(), g.replicas or 1, num_gpus=0, num_cpus=min(share, cpus), threads=1)
            for g in groups]


class ActorReplica:
    """One model replica: a single actor, or a gang of actors placed together on one node."""

    def __init__(self, placement: Placement, spec: WorkerSpec, index: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ranks = placement.parallel.world_size
        self.tickets = itertools.count()
        # Renders get their own threads (`render` group); rendezvous/join/ready run on the default one,
        # so rows queued ahead can never take the thread a gang's `join` needs to load the model.
        options = dict(num_gpus=placement.num_gpus, num_cpus=placement.num_cpus)
        if not placement.num_gpus and cpu_numerics_env() and not spec.model_path.startswith(SIMULATED):
            # One BLAS code path on every x86 CPU (AMD or Intel), read when the actor's process loads torch.
            options["runtime_env"] = {"env_vars": cpu_numerics_env()}
        actor_cls = ray.remote(max_restarts=0, max_task_retries=0,
                               concurrency_groups={"render": RenderWorker.CONCURRENCY})(RenderWorker)
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


def spawner(placement: Placement, spec: WorkerSpec):
    """A function index -> new replica of this group, as the work queue wants it."""
    ranked = replace(spec, num_threads=placement.threads, parallel=placement.parallel, group=placement.group.name)
    return lambda index: ActorReplica(placement, ranked, index)
