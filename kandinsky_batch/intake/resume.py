"""What an output prefix already holds, and so what a (re-)run still has to render.

A row is done when the manifest holds it `ok` with the same effective parameters and, when the job saves latents
(`output.latents`), with its latents (and without them when it does not). A video that sits
under its key without a manifest row (the driver died after the upload) is adopted once it decodes
to the expected shape (never when the job saves latents: they are not in the video); a truncated one is rendered
again. Rows committed with other parameters, or with latents where the job wants none or the reverse, are
never mixed in silently: `check_conflicts` refuses them before anything renders, unless forced.

The manifest and the object listing are loaded once as Arrow arrays (the listing a page at a time, one request per
1,000 objects on S3); each window of tasks is then looked up against them, so a resumed million-row job holds no
Python object per committed row.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.output.manifest import latest_outcomes, read_columns
from kandinsky_batch.output.poster import poster
from kandinsky_batch.output.record import Stamp
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import IMAGES_DIR, VIDEOS_DIR
from kandinsky_batch.output.video import decode
from kandinsky_batch.errors import ResumeConflict

# What decides a row's pixels and bytes: if any differs, an old object is not this row's output.
IDENTITY = ("prompt", "negative_prompt", "image_sha256", "source_sha256", "seed", "height", "width",
            "num_frames", "num_inference_steps", "guidance_scale", "model", "format", "fps", "options")
# Whether the row has its latents: compared like IDENTITY (a column of the outcomes, `output.latents` of the job).
LATENTS = "latents"
OUTCOME_COLUMNS = ["id", "row_index", "status", "finished_at", *IDENTITY, "latents_key"]


@dataclass
class Split:
    """One window of tasks against the output prefix."""

    todo: list[Task] = field(default_factory=list)
    done: int = 0
    adopted: list[dict] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


TEXTS = ("prompt", "negative_prompt")


def digest(text: str | None) -> int | None:
    """A 64-bit digest of a text: what resume keeps of committed prompts (8 bytes a row, not the text)."""
    if text is None:
        return None
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big",
                          signed=True)


def _digested(table: pa.Table) -> pa.Table:
    for name in TEXTS:
        column = pa.array([digest(t) for t in table[name].to_pylist()], pa.int64())
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table.append_column(LATENTS, pc.is_valid(table["latents_key"]))


def identity(row: dict) -> tuple:
    """What decides a row's output, texts as digests (committed rows are held that way), and whether it has
    its latents."""
    return (*(row.get(k) if k not in TEXTS or not isinstance(row.get(k), str) else digest(row[k])
              for k in IDENTITY), bool(row.get(LATENTS)))


def _complete(data: bytes, task: Task, fmt: str) -> np.ndarray | None:
    """An orphaned object's frames if it decodes whole to the task's frame count and size, else None."""
    try:
        frames = decode(data, fmt)
    except Exception:  # noqa: BLE001 - truncated or corrupt: render it again
        return None
    if frames.dtype != np.uint8 or frames.shape != (task.num_frames, task.height, task.width, 3):
        return None
    return frames


def _describe(task: Task, before: dict, want: dict) -> str:
    changed = [k for k, a, b in zip((*IDENTITY, LATENTS), identity(before), identity(want)) if a != b]
    shown = [f"{k}: changed" if k in TEXTS else f"output.latents: {bool(before.get(k))} -> {want.get(k)}"
             if k == LATENTS else f"{k}: {before.get(k)!r} -> {want.get(k)!r}" for k in changed[:3]]
    return f"id={task.id!r} ({', '.join(shown)})"


def listed(storage: Storage, folders: tuple[str, ...]) -> pa.Array:
    """The keys under `folders` as one Arrow array, built a listing page at a time: a million objects cost
    their key bytes, not a Python string each. Only the orphans among them (objects without an ok row) matter."""
    chunks = [pa.array(page, pa.string()) for folder in folders for page in storage.pages(folder)]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


class OutputState:
    """The latest outcome per id and the objects under `videos/`, as Arrow arrays (read once per run)."""

    def __init__(self, storage: Storage, stamp: Stamp, force: bool = False, positional: bool = False):
        self.storage, self.stamp, self.force = storage, stamp, force
        self.positional = positional
        """The dataset has no id column, so its ids are row positions (a refusal says what that means)."""
        # `invalid` rows are re-derived from the input on every run: only render outcomes count here. Only the
        # columns that decide identity are read, so a large manifest costs its prompts and little else.
        self.outcomes = latest_outcomes(read_columns(storage, OUTCOME_COLUMNS, _digested))
        self.committed = int(pc.sum(pc.equal(self.outcomes["status"], "ok")).as_py() or 0)
        self.objects = listed(storage, (VIDEOS_DIR, IMAGES_DIR))

    def with_stamp(self, stamp: Stamp) -> "OutputState":
        """The same outputs (read once) seen by another model of the job: its rows carry `stamp`'s values."""
        other = copy.copy(self)
        other.stamp = stamp
        return other

    def _wanted(self, values: dict) -> dict:
        """What a row committed by this job holds: the stamped row, and whether it has latents."""
        return {**self.stamp.row(values), LATENTS: self.stamp.latents}

    def _previous(self, ids: list[str]) -> dict[str, dict]:
        if self.outcomes.num_rows == 0 or not ids:
            return {}
        return {r["id"]: r for r in self.outcomes.filter(pc.is_in(self.outcomes["id"], pa.array(ids, pa.string())))
                .to_pylist()}

    def done_check(self, ids: pa.Array) -> Callable[[dict], bool] | None:
        """For a window of rows: a test `candidate -> committed ok with exactly these values` (None: none can be)."""
        if not self.committed:
            return None
        previous = self._previous(ids.to_pylist())
        ok = {k: identity(r) for k, r in previous.items() if r["status"] == "ok"}
        if not ok:
            return None
        return lambda candidate: ok.get(candidate["id"]) == identity(self._wanted(candidate))

    def split(self, tasks: list[Task], dry_run: bool = False) -> Split:
        """Sort a window of tasks into done (skip), adopted (commit without rendering) and todo (render).

        `dry_run` writes nothing: an orphan that decodes whole is still listed as adopted, without its poster."""
        result = Split()
        previous = self._previous([t.id for t in tasks])
        ext = self.stamp.extension
        keys = [self.stamp.keys(t.id)[0] for t in tasks]
        present = (pc.is_in(pa.array(keys, pa.string()), self.objects).to_pylist() if len(self.objects)
                   else [False] * len(tasks))
        for task, key, exists in zip(tasks, keys, present):
            want = self._wanted(task.row())
            before = previous.get(task.id)
            if before is not None and before["status"] == "ok":
                if identity(before) == identity(want):
                    result.done += 1
                else:
                    result.conflicts.append(_describe(task, before, want))
                    result.todo.append(replace(task, overwrite=True))
                continue
            if exists:
                data = self.storage.get_bytes(key)
                # Not with sound (the exact audio length is not recoverable from AAC), with expanded prompts
                # (the rewrite the manifest records is not in the object) nor with latents (not in it either):
                # render it again.
                frames = (_complete(data, task, ext) if before is None and not self.stamp.sound
                          and not self.stamp.options.expand_prompts and not self.stamp.latents else None)
                if frames is not None:
                    # Its poster, made from the decoded frames; one already there (the same render's) stands.
                    still = self.stamp.keys(task.id)[1]
                    if not dry_run:
                        self.storage.put_bytes_if_absent(still, poster(frames))
                    result.adopted.append(self.stamp.adopted(task.row(), key, data, still))
                    continue
                # Truncated, corrupt, or left by a failed row: this run's render replaces it.
                task = replace(task, overwrite=True)
            result.todo.append(task)
        return result

    def conflict(self, found: int, first: str) -> ResumeConflict:
        """The one refusal of rows committed with other parameters: `found` of them, `first` described."""
        why = ("; this dataset has no id column, so ids are row positions: inserting or reordering rows changes "
               "them; add an `id` column (or use a new output.uri)") if self.positional else ""
        return ResumeConflict(
            f"output.uri={self.storage.uri!r} already holds {found} row(s) rendered with other parameters, "
            f"e.g. {first}; use a new output.uri, or --force to re-render them in place{why}"
        )


def check_conflicts(state: OutputState, windows) -> None:
    """Refuse, before anything renders, an output prefix holding rows rendered with other parameters.

    `windows` yields lists of the run's tasks whose ids the manifest holds `ok` (only those are compared).
    """
    if state.force or state.committed == 0:
        return
    found, first = 0, None
    for tasks in windows:
        split = state.split(tasks)
        found += len(split.conflicts)
        first = first or (split.conflicts[0] if split.conflicts else None)
    if found:
        raise state.conflict(found, first)
