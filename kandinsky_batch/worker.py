"""The render actor: one model replica, loaded once, pinned to one GPU (or the CPU).

It renders a task, encodes it, uploads the object whole under its deterministic key and returns the
row's manifest entry. Frames never travel back to the driver.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

from kandinsky_batch.rows import Task
from kandinsky_batch.storage import Storage, StorageUnavailable, object_key
from kandinsky_batch.video import encode
from pipelines import open_renderer


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor needs, picklable, credentials included (they stay in memory)."""

    model_path: str
    output_uri: str
    format: str
    fps: int
    # Credentials: kept out of the repr so no log line or error message can carry them.
    model_storage_options: dict = field(default_factory=dict, repr=False)
    output_storage_options: dict = field(default_factory=dict, repr=False)
    retries: int = 5
    retry_backoff: float = 0.5
    num_threads: int | None = None


class RenderWorker:
    """Ray actor class (wrapped with `ray.remote` by the scheduler, so this module knows no Ray)."""

    def __init__(self, spec: WorkerSpec, replica: int):
        if spec.num_threads and not spec.model_path.startswith("simulated"):
            import torch

            # Several CPU replicas on one host would otherwise oversubscribe the cores.
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.renderer = open_renderer(spec.model_path, storage_options=spec.model_storage_options)
        self.storage = Storage(spec.output_uri, spec.output_storage_options, retries=spec.retries,
                               backoff=spec.retry_backoff)
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES") if self.renderer.device.startswith("cuda") else None
        where = f"gpu{gpu}" if gpu is not None else self.renderer.device
        self.name = f"replica{replica}@{socket.gethostname()}:{os.getpid()}:{where}"

    def ready(self) -> dict:
        """Answer once the model is loaded: the driver waits for this before queueing rows."""
        return {"worker": self.name, "device": self.renderer.device, "load_seconds": self.renderer.load_seconds}

    def render(self, task: Task, attempt: int) -> dict:
        """Render, encode and commit one task; return its manifest row (status ok or failed)."""
        row = {**task.row(), "attempts": attempt, "worker": self.name, "model": self.spec.model_path,
               "format": self.spec.format, "fps": self.spec.fps}
        try:
            started = time.perf_counter()
            frames = self.renderer.render(task.request())
            row["render_seconds"] = time.perf_counter() - started
            data = encode(frames, self.spec.format, self.spec.fps)
            key = object_key(task.id, self.spec.format)
            if task.overwrite:
                self.storage.put_bytes(key, data)
            elif not self.storage.put_bytes_if_absent(key, data):
                # An earlier attempt of this row committed first (its replica died before answering):
                # objects are created at most once per key, so that one stands and is what we record.
                data = self.storage.get_bytes(key)
        except StorageUnavailable as exc:
            # Not the row's fault: the driver stops the job cleanly and a re-run continues.
            return {**row, "status": "failed", "error": f"storage unavailable: {exc}", "storage_outage": True}
        except Exception as exc:  # noqa: BLE001 - any pipeline error becomes a row-level failure
            last = traceback.extract_tb(exc.__traceback__)[-1]
            where = f" (at {os.path.basename(last.filename)}:{last.lineno})" if last else ""
            return {**row, "status": "failed", "error": f"{type(exc).__name__}: {exc}{where}"}
        return {**row, "status": "ok", "error": None, "uri": self.storage.url(key), "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}
