"""One task per export unit: Ray tasks on the cluster (or a local loopback Ray), or threads of the driver.

A bounded number of units is in flight, built from the plan as they are submitted, so the driver holds the plan
and a few units, never the objects; each task writes its unit's objects, then its index part (`plan.record_unit`),
and returns only a count. Tasks are idempotent (create-only writes of the same bytes), so Ray may retry them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from kandinsky_batch.config.schema import ClusterConfig
from kandinsky_batch.export.formats import load_format
from kandinsky_batch.export.plan import record_unit
from kandinsky_batch.export.sample import Unit
from kandinsky_batch.fleet import inprocess
from kandinsky_batch.output.storage import Storage

TASK_RETRIES = 3


def write_one(fmt: str, unit: Unit, source: Storage, dest: Storage) -> int:
    """A unit's objects through its format's writer, then its index part: the samples written."""
    rows = load_format(fmt).write_unit(unit, source, dest)
    record_unit(dest, unit, rows)
    return len(rows)


def write_units(fmt: str, units: Iterable[Unit], source: Storage, dest: Storage, address: str | None = None,
                on_done: Callable[[int], None] = lambda n: None) -> int:
    """Write every unit, at most twice the cluster's CPUs at a time; the units done (see module docstring)."""
    cfg = ClusterConfig(address=address)
    transport = inprocess.transport(cfg)
    with transport.connect(cfg):
        if transport is inprocess:
            return _threads(fmt, units, source, dest, on_done)
        return _ray(fmt, units, source, dest, on_done)


def _threads(fmt, units, source, dest, on_done) -> int:
    limit = 2 * (os.cpu_count() or 1)
    done = 0
    with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="export") as pool:
        flying = set()
        for unit in units:
            flying.add(pool.submit(write_one, fmt, unit, source, dest))
            if len(flying) >= limit:
                finished, flying = wait_futures(flying, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_done(future.result())
                    done += 1
        for future in flying:
            on_done(future.result())
            done += 1
    return done


def _ray(fmt, units, source, dest, on_done) -> int:
    import ray

    task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(write_one)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    done, flying = 0, []
    for unit in units:
        flying.append(task.remote(fmt, unit, source, dest))
        if len(flying) >= limit:
            finished, flying = ray.wait(flying, num_returns=1)
            for ref in finished:
                on_done(ray.get(ref))
                done += 1
    for ref in flying:
        on_done(ray.get(ref))
        done += 1
    return done
