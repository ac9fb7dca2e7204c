"""A multi-model sweep on a simulated fleet: how close the work queue's model split comes to the lower bound.

The real `WorkQueue` (kandinsky_batch/fleet/scheduler.py) runs against a discrete-event fleet on a virtual clock:
each replica loads its model in `--load` seconds, then renders its batches one after another, each taking the
row's cost-model seconds (visual tokens x steps x passes, scaled so a 5 s 768x512 50-step CFG row takes
`--sft-seconds`). No Ray, no sleeping: the policy alone (D'Hondt split by remaining work, reloading a replica as
another model once its own has no rows) is measured, in seconds of simulated time.

Lower bound: total work / replicas + one model load (every replica must load something once).

    python benchmarks/sweep.py                        # 3 Lite variants x 500 prompts x 4 seeds on 64 replicas
    python benchmarks/sweep.py --replicas 16 --prompts 100
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine, table, write_json  # noqa: E402
from kandinsky_batch.output.record import BatchResult  # noqa: E402
from kandinsky_batch.intake.rows import Task  # noqa: E402
from kandinsky_batch.fleet.scheduler import WorkQueue  # noqa: E402
from kandinsky_batch.fleet.source import WindowList  # noqa: E402
from kandinsky_batch.fleet.slot import Pool  # noqa: E402

# The Lite 5 s variants at their documented defaults: (label, steps, guidance).
MODELS = [("sft", 50, 5.0), ("nocfg", 50, 1.0), ("distilled16steps", 16, 1.0)]
SIZE = dict(height=512, width=768, num_frames=121)


class Ref:
    __slots__ = ("replica", "batch", "done_at", "kind", "n")
    ids = itertools.count()

    def __init__(self, replica, kind, done_at, batch=None):
        self.replica, self.kind, self.done_at, self.batch, self.n = replica, kind, done_at, batch, next(self.ids)

    def __lt__(self, other):
        return (self.done_at, self.n) < (other.done_at, other.n)


class SimReplica:
    ranks = 1

    def __init__(self, fleet: "SimFleet", pool: str):
        self.fleet, self.pool = fleet, pool
        self.loaded_at = fleet.now + fleet.load
        self.free_at = self.loaded_at
        self.busy = 0.0
        self.killed = False
        fleet.loads += 1
        self._ready = [fleet.schedule(Ref(self, "ready", self.loaded_at))]

    def ready(self) -> list:
        return self._ready

    def submit(self, batch: list) -> list:
        seconds = sum(self.fleet.seconds(task) for task, _ in batch)
        start = max(self.fleet.now, self.free_at)
        self.free_at = start + seconds
        self.busy += seconds
        self.fleet.busy += seconds
        return [self.fleet.schedule(Ref(self, "render", self.free_at, batch))]

    def kill(self) -> None:
        self.killed = True


class SimFleet:
    """Virtual time: `wait` jumps the clock to the next finished call (or by the timeout)."""

    def __init__(self, replicas: int, load: float, seconds_per_unit: float):
        self.replicas, self.load, self.unit = replicas, load, seconds_per_unit
        self.now, self.loads, self.busy = 0.0, 0, 0.0
        self.events: list[Ref] = []

    def seconds(self, task: Task) -> float:
        return task.cost() * self.unit

    def schedule(self, ref: Ref) -> Ref:
        heapq.heappush(self.events, ref)
        return ref

    def spawn(self, pool: str):
        return lambda index: SimReplica(self, pool)

    def capacity(self) -> dict[str, int]:
        return {"default": self.replicas}

    def clock(self) -> float:
        return self.now

    def wait(self, refs: list, timeout: float) -> list:
        wanted = set(map(id, refs))
        while self.events and (self.events[0].replica.killed or id(self.events[0]) not in wanted):
            heapq.heappop(self.events)  # a retired replica's calls, or one the queue no longer waits for
        if self.events and self.events[0].done_at <= self.now + timeout:
            ref = heapq.heappop(self.events)
            self.now = max(self.now, ref.done_at)
            return [ref]
        self.now += timeout
        return []

    def get(self, ref: Ref):
        if ref.kind == "ready":
            return {"worker": f"{ref.replica.pool}@sim", "model": ref.replica.pool}
        return BatchResult([{**task.row(), "status": "ok", "attempts": attempt, "worker": ref.replica.pool}
                            for task, attempt in ref.batch])


def sweep_tasks(prompts: int, seeds: int) -> dict[str, list[Task]]:
    tasks = {}
    for label, steps, guidance in MODELS:
        tasks[label] = [Task(id=f"p{p}__{label}__seed-{s}", row_index=p, prompt=f"prompt {p}", negative_prompt=None,
                             seed=s, num_inference_steps=steps, guidance_scale=guidance, **SIZE)
                        for p in range(prompts) for s in range(seeds)]
    return tasks


def simulate(replicas: int, prompts: int, seeds: int, load: float, sft_seconds: float, window: int) -> dict:
    tasks = sweep_tasks(prompts, seeds)
    unit = sft_seconds / tasks["sft"][0].cost()
    fleet = SimFleet(replicas, load, unit)
    # Windows as the intake hands them over: every model's cells of `window` input rows, longest first.
    windows = []
    for start in range(0, prompts, window):
        windows.append({label: sorted([t for t in rows if start <= t.row_index < start + window],
                                      key=lambda t: -t.cost()) for label, rows in tasks.items()})
    settled = []
    queue = WorkQueue([Pool(label, fleet.spawn(label), group="default") for label in tasks], fleet, WindowList(windows),
                      max_attempts=3, on_row=settled.append, wait=fleet.wait, get=fleet.get, clock=fleet.clock,
                      tick_seconds=1.0, fleet_seconds=2.0, no_replica_timeout=10**9)
    queue.run()
    work = sum(fleet.seconds(t) for rows in tasks.values() for t in rows)
    makespan = fleet.now
    bound = work / replicas + load
    # The split a user gets by hand (each model its fixed share of the replicas, no reloading).
    share = [replicas // len(tasks) + (i < replicas % len(tasks)) for i in range(len(tasks))]
    equal = max(-(-len(rows) // k) * fleet.seconds(rows[0]) for rows, k in zip(tasks.values(), share)) + load
    first = {}
    for slot in queue.slots[:replicas]:
        first[slot.pool.name] = first.get(slot.pool.name, 0) + 1
    assert len(settled) == sum(len(rows) for rows in tasks.values()), "every row settles once"
    return {
        "replicas": replicas, "cells": len(settled), "work_s": work, "makespan_s": makespan, "bound_s": bound,
        "ratio": makespan / bound, "equal_split_ratio": equal / bound, "loads": fleet.loads, "switches": queue.switches,
        "busy": fleet.busy / (replicas * makespan), "first_split": first,
        "per_model_s": {label: sum(fleet.seconds(t) for t in rows) for label, rows in tasks.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--load", type=float, default=20.0, help="seconds per model load")
    parser.add_argument("--sft-seconds", type=float, default=140.0, help="seconds per sft 5 s row")
    parser.add_argument("--window", type=int, nargs="+", default=[8192 // 12, 50],
                        help="input rows per intake window (8192 cells / 12 cells per row by default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = [simulate(r, args.prompts, args.seeds, args.load, args.sft_seconds, w)
               for r in args.replicas for w in args.window]
    rows = [[r["replicas"], w, r["cells"], f"{r['bound_s']:.0f}", f"{r['makespan_s']:.0f}", f"{r['ratio']:.3f}",
             f"{r['equal_split_ratio']:.2f}", r["loads"], r["switches"], f"{100 * r['busy']:.1f} %",
             " / ".join(f"{k} {v}" for k, v in r["first_split"].items())]
            for r, w in zip(results, [w for _ in args.replicas for w in args.window])]
    print(f"3 models (sft 50 steps CFG {args.sft_seconds:.0f} s/row, nocfg 50 steps, distilled 16 steps; cost model "
          f"seconds), {args.prompts} prompts x {args.seeds} seeds, {args.load:.0f} s per model load")
    print(table(["replicas", "window (prompts)", "cells", "lower bound s", "makespan s", "makespan / bound",
                 "fixed equal split / bound", "model loads", "switches", "busy", "first split"], rows))
    write_json("sweep", {"machine": machine(), "args": vars(args), "results": results}, args.out)


if __name__ == "__main__":
    main()
