"""What an output prefix already holds, and so what a (re-)run still has to render.

A row is done when the manifest holds it `ok` with the same effective parameters. A video that sits
under its key without a manifest row (the driver died after the upload) is adopted once it decodes
to the expected shape; a truncated one is rendered again. Rows committed with other parameters are
never mixed in silently: the run refuses unless forced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from kandinsky_batch.config import JobConfig
from kandinsky_batch.manifest import latest_outcomes, read_manifest
from kandinsky_batch.rows import Task
from kandinsky_batch.storage import Storage, object_key
from kandinsky_batch.video import decode
from kandinsky_batch.worker import recorded_options
from pipelines.request import RenderOptions

# What decides a row's pixels and bytes: if any differs, an old object is not this row's output.
IDENTITY = ("prompt", "negative_prompt", "seed", "height", "width", "num_frames", "num_inference_steps",
            "guidance_scale", "model", "format", "fps", "options")


class ResumeConflict(ValueError):
    """The output prefix holds rows rendered with other parameters; mixing them needs --force."""


@dataclass
class Plan:
    todo: list[Task] = field(default_factory=list)
    done: list[dict] = field(default_factory=list)
    adopted: list[dict] = field(default_factory=list)
    previous: dict[str, dict] = field(default_factory=dict)


def identity(row: dict) -> tuple:
    return tuple(row.get(k) for k in IDENTITY)


def expected(task: Task, cfg: JobConfig, options: RenderOptions) -> dict:
    return {**task.row(), "model": cfg.model.path, "format": cfg.output.format, "fps": cfg.render.fps,
            "options": recorded_options(options), "approximate": options.approximate}


def _complete(data: bytes, task: Task, fmt: str) -> bool:
    """Whether an orphaned object decodes whole to the task's frame count and size."""
    try:
        frames = decode(data, fmt)
    except Exception:  # noqa: BLE001 - truncated or corrupt: render it again
        return False
    return frames.shape == (task.num_frames, task.height, task.width, 3)


def plan(storage: Storage, tasks: list[Task], cfg: JobConfig, options: RenderOptions, force: bool = False) -> Plan:
    """Split tasks into done (skip), adopted (commit without rendering) and todo (render)."""
    result = Plan()
    # Latest render outcome per id; `invalid` rows are re-derived from the input on every run.
    result.previous = latest_outcomes(read_manifest(storage).to_pylist())
    existing = set(storage.list("videos"))
    conflicts: list[str] = []
    for task in tasks:
        want = expected(task, cfg, options)
        before = result.previous.get(task.id)
        if before is not None and before["status"] == "ok":
            if identity(before) == identity(want):
                result.done.append(before)
                continue
            changed = [k for k in IDENTITY if before.get(k) != want.get(k)]
            conflicts.append(f"id={task.id!r} ({', '.join(f'{k}: {before.get(k)!r} -> {want.get(k)!r}' for k in changed[:3])})")
            if not force:
                continue
            result.todo.append(replace(task, overwrite=True))
            continue
        key = object_key(task.id, cfg.output.format)
        if key in existing:
            data = storage.get_bytes(key)
            if before is None and _complete(data, task, cfg.output.format):
                result.adopted.append({**want, "status": "ok", "error": None, "uri": storage.url(key),
                                       "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                       "attempts": 0, "worker": "adopted"})
                continue
            # Truncated, corrupt, or left by a failed row: this run's render replaces it.
            task = replace(task, overwrite=True)
        result.todo.append(task)
    if conflicts and not force:
        raise ResumeConflict(
            f"output.uri={cfg.output.uri!r} already holds {len(conflicts)} row(s) rendered with other parameters, "
            f"e.g. {conflicts[0]}; use a new output.uri, or --force to re-render them in place"
        )
    return result
