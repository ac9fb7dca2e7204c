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
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.intake.dataset import Dataset
from kandinsky_batch.intake.routing import route
from kandinsky_batch.intake.ids import row_ids
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.config.sweep import Sweep
from kandinsky_batch.intake.cells import annotate, expand

if TYPE_CHECKING:
    from kandinsky_batch.intake.preflight import Lane

WINDOW_ROWS = 8192
IMAGE_WINDOW_ROWS = 512
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


def _expanded(batch: pa.Table, positions: np.ndarray, lane: "Lane", sweep: Sweep, job_seed: int):
    """One model's cells of a batch of input rows: (cells, their rows, sweep errors, cell ids)."""
    ids = row_ids(batch.column("id") if "id" in batch.column_names else None, positions)
    cells, rows, errors = expand(sweep, batch, ids, positions, lane.variant, job_seed)
    return cells, rows, errors, (row_ids(cells.column("id"), rows) if sweep.active else ids)


def committed_tasks(dataset: Dataset, lane: "Lane", sweep: Sweep, job_seed: int,
                    rows: int = WINDOW_ROWS) -> Iterator[list[Task]]:
    """One model's tasks whose ids the manifest holds `ok`, a window at a time (for `resume.check_conflicts`)."""
    for _, found in validated_windows(dataset, [lane], sweep, job_seed, max(1, rows // len(sweep.cells)),
                                      committed_only=True):
        for _, validated in found:
            routed, _ = route(validated.task_list(), lane.cluster)
            tasks = [task for group in routed.values() for task in group]
            if tasks:
                yield tasks


def window_rows_of(lanes: list["Lane"], sweep: Sweep, rows: int = WINDOW_ROWS) -> int:
    """Input rows per window: about `rows` cells, whatever the grid's size; fewer with conditioning images
    (images given as bytes travel with their rows)."""
    if any(lane.validator.images is not None for lane in lanes):
        rows = min(rows, IMAGE_WINDOW_ROWS)
    return max(1, rows // (len(sweep.cells) * len(lanes)))


@dataclass
class Sorted:
    """One model's cells of one window against the output prefix (`sort_window`)."""

    invalid: list[dict]
    """Manifest rows of the invalid cells (validation and routing), sweep axes named."""
    tasked: list[tuple[str, int]]
    """(id, row_index) of every valid cell: already done, adopted or to render (finalize's rendered rows)."""
    todo: dict[str, list[Task]]
    """Cells to render by replica group, longest first."""
    adopted: list[dict]
    """Manifest rows of orphaned objects taken as they are."""
    skipped: int = 0
    """Cells already done."""


def sort_window(lane: "Lane", sweep: Sweep, validated, dry_run: bool = False) -> Sorted:
    """Route one model's validated cells of a window and look them up against the output prefix.

    Refuses (ResumeConflict) cells committed with other parameters unless the job is forced. `dry_run` writes
    nothing (an orphan that would be adopted is decoded, but its poster is not made).
    """
    routed, unroutable = route(validated.task_list(), lane.cluster)
    result = Sorted(annotate(sweep, validated.invalid + unroutable, lane.variant), list(validated.done), {}, [],
                    len(validated.done))
    for name, tasks in routed.items():
        if not tasks:
            continue
        result.tasked.extend((t.id, t.row_index) for t in tasks)
        split = lane.state.split(tasks, dry_run=dry_run)
        if split.conflicts and not lane.state.force:  # preflight refused these already, unless the prefix changed
            raise lane.state.conflict(len(split.conflicts), split.conflicts[0])
        result.adopted.extend(split.adopted)
        result.skipped += split.done
        if split.todo:
            result.todo[name] = sorted(split.todo, key=lambda t: -t.cost())  # longest first shortens the tail
    return result


def validated_windows(dataset: Dataset, lanes: list["Lane"], sweep: Sweep, job_seed: int, rows: int,
                      stop: threading.Event | None = None, committed_only: bool = False
                      ) -> Iterator[tuple[int, list[tuple["Lane", object]]]]:
    """(input rows read, [(lane, its validated cells), ...]) per window of `rows` input rows, in dataset order:
    the one validation path of `run`'s intake, of `validate` and of preflight's resume check.

    `committed_only` keeps only the cells whose ids the manifest holds `ok` (all resume can refuse): the others
    are not tokenized."""
    ok = [lane.state.outcomes.filter(pc.equal(lane.state.outcomes["status"], "ok"))["id"] for lane in lanes] \
        if committed_only else None
    start = 0
    for batch in dataset.batches(batch_size=rows):
        if stop is not None and stop.is_set():
            return
        positions = np.arange(start, start + batch.num_rows)
        start += batch.num_rows
        found = []
        for n, lane in enumerate(lanes):
            cells, cell_rows, errors, cell_ids = _expanded(batch, positions, lane, sweep, job_seed)
            if ok is not None:
                keep = pc.is_in(cell_ids, ok[n]).to_numpy(zero_copy_only=False)
                if not keep.any():
                    continue
                kept = np.flatnonzero(keep)
                cells, cell_rows, cell_ids = cells.filter(keep), cell_rows[keep], cell_ids.filter(keep)
                errors = {j: errors[i] for j, i in enumerate(kept) if i in errors}
            found.append((lane, lane.validator.validate(cells, cell_rows, lane.state.done_check(cell_ids), errors)))
        yield batch.num_rows, found


class Intake:
    """Produces windows `{group name: [Task, ...]}` on a thread; the work queue polls them (`scheduler.Source`)."""

    def __init__(self, dataset: Dataset, lanes: list["Lane"], sweep: Sweep, job_seed: int,
                 record: Callable[[dict], None], window_rows: int = WINDOW_ROWS, depth: int = 2):
        self.dataset, self.lanes, self.sweep, self.job_seed, self.record = dataset, lanes, sweep, job_seed, record
        self.window_rows = window_rows_of(lanes, sweep, window_rows)
        self.counts = IntakeCounts()
        self.rendered: list[pa.Table] = []  # (id, row_index) of every row with a task
        self.invalid: list[pa.Table] = []   # (id, row_index) of every invalid row
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._done = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)

    @staticmethod
    def pool_name(lane: "Lane", group: str, lanes: int) -> str:
        """The work queue's pool of one model's replica group (the group's own name when there is one model)."""
        if lanes == 1:
            return group
        return lane.label if group == "default" else f"{lane.label}/{group}"

    def start(self) -> "Intake":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for read, found in validated_windows(self.dataset, self.lanes, self.sweep, self.job_seed,
                                                 self.window_rows, self._stop):
                window = {}
                for lane, validated in found:
                    if self._stop.is_set():
                        return  # stopping: record nothing more (the next run reads this window again)
                    window.update(self._take(lane, validated))
                self.counts.read += read
                self._hand_over(window)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread, which raises it
            self._error = exc
        finally:
            self._done.set()

    def _take(self, lane: "Lane", validated) -> dict[str, list[Task]]:
        """One model's cells of a window: record what needs no GPU, return the rest by pool, longest first."""
        found = sort_window(lane, self.sweep, validated)
        for row in found.invalid:
            self.record(lane.stamp.row(row))
        if found.invalid:
            self.invalid.append(_keys(found.invalid))
        if found.tasked:
            self.rendered.append(_keys([{"id": i, "row_index": r} for i, r in found.tasked]))
        for row in found.adopted:
            self.record(row)
        self.counts.invalid += len(found.invalid)
        self.counts.skipped += found.skipped
        self.counts.adopted += len(found.adopted)
        self.counts.todo += sum(len(tasks) for tasks in found.todo.values())
        return {self.pool_name(lane, name, len(self.lanes)): tasks for name, tasks in found.todo.items()}

    def _hand_over(self, window: dict) -> None:
        """Hand a window to the work queue, blocking while the queue is full."""
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

    def close(self, timeout: float | None = None) -> bool:
        """Stop reading (a job that ends early) and wait for the thread, at most `timeout` seconds (a job that
        stops on a signal: a window being validated is abandoned, and read again by the next run). True if the
        thread is done."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def check(self) -> None:
        """Raise what stopped the thread, if anything did."""
        if self._error is not None:
            raise self._error

    def keys(self) -> tuple[pa.Table, pa.Table]:
        """(id, row_index) of the rows with a task and of the invalid rows, once the thread is done."""
        def concat(tables):
            return pa.concat_tables(tables) if tables else KEYS.empty_table()
        return concat(self.rendered), concat(self.invalid)
