"""The streaming front end: dataset -> validated, routed, resume-checked windows of tasks.

A background thread reads the dataset a window of rows at a time (Parquet row groups), validates the
window in one pass (one tokenizer batch call), routes its rows to replica groups, looks them up against
what the output prefix holds, records `invalid` and adopted rows, and hands the rows still to render
to the work queue, longest first within the window. The first window is ready in well under a second,
so the first render does not wait for the rest of the dataset; a bounded hand-over queue keeps the
driver's memory flat however many rows follow.

Ordering is longest-first within a window, not over the whole dataset: a global order would need every
row's cost before the first render. The price is a tail: the last window's rows start no earlier than its
longest one, at most one window's imbalance (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.config import ClusterConfig
from kandinsky_batch.dataset import Dataset
from kandinsky_batch.record import Stamp
from kandinsky_batch.resume import OutputState, ResumeConflict
from kandinsky_batch.routing import route
from kandinsky_batch.rows import RowValidator, Task, row_ids

WINDOW_ROWS = 8192
KEYS = pa.schema([("id", pa.string()), ("row_index", pa.int64())])


@dataclass
class IntakeCounts:
    """Rows the front end has seen and settled without a GPU."""

    read: int = 0
    invalid: int = 0
    skipped: int = 0
    adopted: int = 0
    todo: int = 0


def _keys(rows) -> pa.Table:
    return pa.table({"id": pa.array([r.id if isinstance(r, Task) else r["id"] for r in rows], pa.string()),
                     "row_index": pa.array([r.row_index if isinstance(r, Task) else r["row_index"] for r in rows],
                                           pa.int64())}, schema=KEYS)


def committed_tasks(dataset: Dataset, validator: RowValidator, cluster: ClusterConfig, state: OutputState,
                    rows: int = WINDOW_ROWS) -> Iterator[list[Task]]:
    """The run's tasks whose ids the manifest holds `ok`, a window at a time (for `resume.check_conflicts`)."""
    ok = state.outcomes.filter(pc.equal(state.outcomes["status"], "ok"))["id"]
    start = 0
    for batch in dataset.batches(batch_size=rows):
        positions = np.arange(start, start + batch.num_rows)
        start += batch.num_rows
        ids = row_ids(batch.column("id") if "id" in batch.column_names else None, positions)
        keep = pc.is_in(ids, ok).to_numpy(zero_copy_only=False)
        if keep.any():
            # Rows committed with the same values are done without tokenizing; the rest are checked in full.
            validated = validator.validate(batch.filter(keep), positions[keep], state.done_check(ids.filter(keep)))
            routed, _ = route(validated.task_list(), cluster)
            yield [task for tasks in routed.values() for task in tasks]


class Intake:
    """Produces windows `{group name: [Task, ...]}` on a thread; the work queue polls them (`scheduler.Source`)."""

    def __init__(self, dataset: Dataset, validator: RowValidator, cluster: ClusterConfig, state: OutputState,
                 stamp: Stamp, record: Callable[[dict], None], window_rows: int = WINDOW_ROWS, depth: int = 2):
        self.dataset, self.validator, self.cluster, self.state = dataset, validator, cluster, state
        self.stamp, self.record, self.window_rows = stamp, record, window_rows
        self.counts = IntakeCounts()
        self.rendered: list[pa.Table] = []  # (id, row_index) of every row with a task
        self.invalid: list[pa.Table] = []   # (id, row_index) of every invalid row
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._done = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)

    def start(self) -> "Intake":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            start = 0
            for batch in self.dataset.batches(batch_size=self.window_rows):
                if self._stop.is_set():
                    return
                positions = np.arange(start, start + batch.num_rows)
                start += batch.num_rows
                ids = row_ids(batch.column("id") if "id" in batch.column_names else None, positions)
                self._take(batch.num_rows, self.validator.validate(batch, positions, self.state.done_check(ids)))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread, which raises it
            self._error = exc
        finally:
            self._done.set()

    def _take(self, count: int, validated) -> None:
        """One window: record what needs no GPU, hand the rest over (blocking while the queue is full)."""
        routed, unroutable = route(validated.task_list(), self.cluster)
        invalid = validated.invalid + unroutable
        for row in invalid:
            self.record(self.stamp.row(row))
        if invalid:
            self.invalid.append(_keys(invalid))
        if validated.done:
            self.rendered.append(_keys([{"id": i, "row_index": r} for i, r in validated.done]))
            self.counts.skipped += len(validated.done)
        window = {}
        for name, tasks in routed.items():
            if not tasks:
                continue
            self.rendered.append(_keys(tasks))
            split = self.state.split(tasks)
            if split.conflicts and not self.state.force:
                raise ResumeConflict(f"output.uri holds rows rendered with other parameters, e.g. "
                                     f"{split.conflicts[0]}; use --force to re-render them")
            for row in split.adopted:
                self.record(row)
            self.counts.skipped += split.done
            self.counts.adopted += len(split.adopted)
            self.counts.todo += len(split.todo)
            if split.todo:
                window[name] = sorted(split.todo, key=lambda t: -t.cost())  # longest first shortens the tail
        self.counts.read += count
        self.counts.invalid += len(invalid)
        while window and not self._stop.is_set():
            try:
                self._ready.put(window, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- the work queue's side (scheduler.Source) ------------------------------------------------------

    def poll(self) -> list[dict[str, list[Task]]]:
        windows = []
        while True:
            try:
                windows.append(self._ready.get_nowait())
            except queue.Empty:
                break
        if self._error is not None and not windows:
            raise self._error
        return windows

    @property
    def exhausted(self) -> bool:
        return self._done.is_set() and self._ready.empty() and self._error is None

    def wait_first(self) -> bool:
        """Block until a window is ready (True) or the dataset ended without anything to render (False)."""
        while not self._done.is_set() and self._ready.empty():
            self._done.wait(0.02)
        if self._error is not None and self._ready.empty():
            raise self._error
        return not self._ready.empty()

    def close(self) -> None:
        """Stop reading (a job that ends early) and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def check(self) -> None:
        """Raise what stopped the thread, if anything did."""
        if self._error is not None:
            raise self._error

    def keys(self) -> tuple[pa.Table, pa.Table]:
        """(id, row_index) of the rows with a task and of the invalid rows, once the thread is done."""
        def concat(tables):
            return pa.concat_tables(tables) if tables else KEYS.empty_table()
        return concat(self.rendered), concat(self.invalid)
