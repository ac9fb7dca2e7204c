"""Joining Ray and placing replicas: a local Ray bound to loopback, or an existing cluster."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from kandinsky_batch.config import ClusterConfig
from kandinsky_batch.worker import RenderWorker, WorkerSpec



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


@dataclass(frozen=True)
class Placement:
    """How many replicas to start and what each one asks of Ray."""

    replicas: int
    num_gpus: float
    num_cpus: float
    threads: int | None


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
        cpus = cfg.num_cpus or max(os.cpu_count() or 1, cfg.replicas or 1)
        loopback_only()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


def plan(cfg: ClusterConfig) -> Placement:
    """One replica per GPU when the cluster has GPUs; otherwise `cluster.replicas` CPU replicas."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return Placement(replicas=cfg.replicas or gpus, num_gpus=1, num_cpus=1, threads=None)
    replicas = cfg.replicas or 1
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Share the cores evenly: CPU renders are compute bound, oversubscription only slows them.
    threads = max(1, cpus // replicas)
    return Placement(replicas=replicas, num_gpus=0, num_cpus=min(threads, cpus), threads=threads)


def spawner(placement: Placement, spec: WorkerSpec):
    """A function slot -> new RenderWorker actor, as the work queue wants it."""
    import ray

    actor_cls = ray.remote(RenderWorker).options(
        num_gpus=placement.num_gpus, num_cpus=placement.num_cpus, max_restarts=0, max_task_retries=0,
    )
    threaded = WorkerSpec(**{**spec.__dict__, "num_threads": placement.threads})
    return lambda slot: actor_cls.remote(threaded, slot)
