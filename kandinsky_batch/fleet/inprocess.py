"""Replicas as threads of this process: the work queue and the render worker unchanged, only the transport swapped.

`cluster.address: inprocess` (or `job.run(..., transport=inprocess)`) runs each replica as a real `RenderWorker`
in the driver's process, its model loaded once, its `ready`/`render` calls on a thread pool (two renders at a
time, as the actor runs them), their `concurrent.futures.Future`s standing in for Ray's refs. For tests and
debugging on one host: no process or GPU isolation, so gangs (one process per rank) are refused.

The interface is `cluster`'s (`connect`, `plan`, `spawner`, `Fleet`, `wait`, `get`, `draining`): `job.run` uses
either module.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import sys
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from kandinsky_batch.fleet.cluster import Placement
from kandinsky_batch.config.schema import INPROCESS, ClusterConfig
from kandinsky_batch.errors import ConfigError
from kandinsky_batch.fleet.slot import ReplicaLost
from kandinsky_batch.fleet.worker import RenderWorker, WorkerSpec
from pipelines import cpu_numerics_env

# Replicas spawned and not yet joined: `connect` waits for their threads, so none outlives the job.
_replicas: weakref.WeakSet = weakref.WeakSet()
# One model load at a time: `from_pretrained` builds modules under accelerate's `init_empty_weights`, which patches
# torch process-wide, so a second load on another thread would get meta tensors (and a tiny preset is built once).
_loading = threading.Lock()


@contextmanager
def connect(cfg: ClusterConfig, *others: ClusterConfig, verbose: bool = False, phase=None) -> Iterator[None]:
    """No cluster to join; on exit, wait for every replica's threads (a killed one may still finish a render)."""
    saved = {}
    if "torch" not in sys.modules:
        # The BLAS code path CPU actors get from their runtime env, read when the first replica loads torch.
        saved = {name: os.environ.get(name) for name in cpu_numerics_env()}
        os.environ.update(cpu_numerics_env())
    try:
        yield
    finally:
        for replica in list(_replicas):
            replica.close(wait=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def plan(cfg: ClusterConfig) -> list[Placement]:
    """One single-rank placement per group; a gang needs one process per rank, so it is refused here."""
    for group in cfg.replica_groups():
        gang = group.parallel()
        if gang.world_size > 1:
            raise ConfigError(f"cluster group {group.name!r} is a gang of {gang.world_size} ranks ({gang.name}): "
                              f"in-process replicas run one rank each; run gangs on Ray (cluster.address unset)")
    # threads=None: this process keeps its own torch thread count (the tests' oracle sets 1).
    return [Placement(g, g.parallel(), num_gpus=0, num_cpus=1, threads=None) for g in cfg.replica_groups()]


class Fleet:
    """A fixed fleet: each group's `replicas` (or 1), never more, never fewer."""

    def __init__(self, cfg: ClusterConfig, gangs: dict[str, int] | None = None):
        self.groups = cfg.replica_groups()

    def capacity(self) -> dict[str, int]:
        return {g.name: g.replicas or 1 for g in self.groups}


class _InProcess:
    """Mixed into an actor's class (`RenderWorker`, `ScoreWorker`) run in this process: only where it runs differs."""

    def node_id(self) -> str:
        return f"inprocess:{socket.gethostname()}:{os.getpid()}"


@functools.cache
def _local(worker: type) -> type:
    return type(f"InProcess{worker.__name__}", (_InProcess, worker), {})


class ThreadReplica:
    """One replica of one rank: a `RenderWorker` (or `worker`) loaded on its own thread, rendering on `CONCURRENCY`
    threads."""

    ranks = 1

    def __init__(self, spec: WorkerSpec, index: int, worker: type = RenderWorker):
        self.name = f"{spec.group}#{index}"
        self.tickets = itertools.count()
        self.worker = None
        # Loading and rendering on separate pools, as the actor's default and `render` concurrency groups.
        self._load = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-load")
        self._renders = ThreadPoolExecutor(worker.CONCURRENCY, thread_name_prefix=f"{self.name}-render")
        self._ready = [self._load.submit(self._start, spec, index, worker)]
        _replicas.add(self)

    def _start(self, spec: WorkerSpec, index: int, worker: type) -> dict:
        with _loading:
            self.worker = _local(worker)(spec, index)
        return self.worker.ready()

    def ready(self) -> list[Future]:
        return self._ready

    def submit(self, batch: list) -> list[Future]:
        """The queue submits only once `ready` resolved, so the worker exists."""
        return [self._renders.submit(self.worker.render, batch, next(self.tickets))]

    def kill(self) -> None:
        """Drop queued calls and the model; a render already running finishes (threads cannot be killed)."""
        self.close(wait=False)

    def close(self, wait: bool) -> None:
        for pool in (self._load, self._renders):
            pool.shutdown(wait=wait, cancel_futures=True)
        self.worker = None
        _replicas.discard(self)


def spawner(placement: Placement, spec: WorkerSpec, pool: str | None = None, worker: type = RenderWorker):
    """A function index -> new in-process replica of this group (of the work queue's pool `pool`)."""
    ranked = replace(spec, num_threads=placement.threads, parallel=placement.parallel,
                     group=pool or placement.group.name)
    return lambda index: ThreadReplica(ranked, index, worker)


def wait(refs: list[Future], timeout: float) -> list[Future]:
    """The futures done within `timeout` (an empty list pauses briefly, as `cluster.wait` does)."""
    if not refs:
        time.sleep(min(timeout, 0.05))
        return []
    done, _ = wait_futures(refs, timeout=timeout, return_when=FIRST_COMPLETED)
    return list(done)


def get(ref: Future):
    """A call that raised (or was cancelled with its replica) becomes `ReplicaLost`, as a dead actor's does."""
    try:
        return ref.result()
    except Exception as exc:  # noqa: BLE001 - whatever the call raised (or its cancellation), the replica is lost
        text = str(exc).strip().splitlines()
        raise ReplicaLost(f"{type(exc).__name__}: {text[-1] if text else ''}".strip()) from None


def draining() -> dict[str, float | None]:
    """No node of this process is ever drained."""
    return {}


def transport(cfg: ClusterConfig):
    """The module whose replicas run this cluster: this one for `cluster.address: inprocess`, else Ray's."""
    from kandinsky_batch.fleet import cluster

    return sys.modules[__name__] if cfg.address == INPROCESS else cluster


def gpus() -> int:
    """In-process replicas take no GPU of their own (a model metric runs on the host's, if any, like a renderer)."""
    return 0
