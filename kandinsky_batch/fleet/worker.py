"""The render actor: one rank of a model replica, loaded once, pinned to one GPU (or the CPU).

A replica is a gang of one or more ranks (sequence/CFG parallel). Every rank renders the same task in
lockstep; rank 0 encodes the video and its poster, uploads them whole under their deterministic keys and
returns the row's manifest entry. Frames never travel back to the driver.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from kandinsky_batch.intake.images import read as read_image
from kandinsky_batch.output.layout import latents_key
from kandinsky_batch.output.poster import poster
from kandinsky_batch.output.record import BatchResult, Stamp
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.errors import StorageUnavailable
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.intake.job_output import encode_upscaled, read_source
from kandinsky_batch.output.video import encode
from kandinsky_batch.fleet.score_worker import FUSED, decode_video, load_scorers, score_video
from pipelines import ParallelSpec, RenderOptions, open_renderer, resolve_model, weights_fingerprint


@dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor needs, picklable, credentials included (they stay in memory)."""

    model_path: str
    output_uri: str
    stamp: Stamp
    # Credentials: kept out of the repr so no log line or error message can carry them.
    model_storage_options: dict = field(default_factory=dict, repr=False)
    output_storage_options: dict = field(default_factory=dict, repr=False)
    retries: int = 5
    retry_backoff: float = 0.5
    input_storage_options: dict = field(default_factory=dict, repr=False)
    """fsspec options for conditioning images given by URI (read again here, checked against their sha256)."""
    num_threads: int | None = None
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    group: str = "default"
    score: tuple[str, ...] = ()
    """Metrics each committed video is scored with on this replica (fused scoring, `score.metrics`)."""
    score_weights: tuple = ()

    @property
    def options(self) -> RenderOptions:
        return self.stamp.options


class Turnstile:
    """Lets calls through one at a time in ticket order, whatever order their threads arrive in.

    Renders must use the device one at a time and, in a gang, in the same order on every rank (their
    collectives pair up by order); the driver numbers each replica's rows, so every rank agrees.
    """

    def __init__(self) -> None:
        self._next = 0
        self._turn = threading.Condition()

    @contextmanager
    def turn(self, ticket: int):
        with self._turn:
            self._turn.wait_for(lambda: self._next == ticket)
        try:
            yield
        finally:
            with self._turn:
                self._next += 1
                self._turn.notify_all()


class RenderWorker:
    """Ray actor class (wrapped with `ray.remote` by the cluster module, so this module knows no Ray).

    A gang of one loads its model at once; the ranks of a larger gang load it in `join`, once the
    driver has told them where rank 0 listens for the process-group rendezvous. The actor runs two
    `render` calls at a time (`CONCURRENCY`, in their own concurrency group): while one row is encoded,
    checksummed and uploaded, the next one is already rendering; the turnstile keeps renders one at a
    time and in order.
    """

    CONCURRENCY = 2

    def __init__(self, spec: WorkerSpec, replica: int, rank: int = 0):
        if spec.num_threads and not spec.model_path.startswith("simulated"):
            import torch

            # Several CPU replicas on one host would otherwise oversubscribe the cores.
            torch.set_num_threads(spec.num_threads)
        self.spec, self.replica, self.rank = spec, replica, rank
        self.renderer = None
        self.turnstile = Turnstile()
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        if spec.parallel.world_size == 1:
            self.renderer = open_renderer(spec.model_path, storage_options=spec.model_storage_options,
                                          options=spec.options)
            self._keep_latents()
            self.loaded.set()
        self.storage = Storage(spec.output_uri, spec.output_storage_options, retries=spec.retries,
                               backoff=spec.retry_backoff)
        self.scorers = load_scorers(spec.score, spec.score_weights) if spec.score and rank == 0 else {}

    def _keep_latents(self) -> None:
        """Ask the renderer for each row's latents when the job saves them (`output.latents`)."""
        if self.spec.stamp.latents:
            self.renderer.keep_latents = True

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: an address and free port for the gang's process group (loopback in a local Ray)."""
        import ray

        address = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind((address, 0))
            return address, probe.getsockname()[1]

    def join(self, address: tuple[str, int]) -> dict:
        """Join the gang's process group and load this rank's part of the model."""
        from pipelines.parallel import init_gang, open_gang
        from pipelines.render_common import default_device

        device = default_device()
        try:
            # Fetch or build the model before the process group exists: a tiny preset built on a rank > 0 would be
            # saved without weights (transformers writes them on rank 0 only).
            resolve_model(self.spec.model_path, self.spec.model_storage_options)
            init_gang(self.rank, self.spec.parallel.world_size, address[0], address[1], device)
            self.renderer = open_gang(self.spec.model_path, self.spec.parallel, self.rank, device=device,
                                      storage_options=self.spec.model_storage_options, options=self.spec.options)
            self._keep_latents()
        except BaseException as exc:
            self.load_error = exc  # rows waiting for the model fail with this instead of waiting forever
            raise
        finally:
            self.loaded.set()
        return self.ready()

    @functools.cached_property
    def name(self) -> str:
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES") if self.renderer.device.startswith("cuda") else None
        where = f"gpu{gpu}" if gpu is not None else self.renderer.device
        group = "" if self.spec.group == "default" else f"{self.spec.group}/"
        return f"{group}replica{self.replica}@{socket.gethostname()}:{os.getpid()}:{where}"

    @functools.cached_property
    def weights(self) -> str:
        """The fingerprint of the weights this replica renders with (recorded on every row it commits)."""
        return weights_fingerprint(self.spec.model_path, self.spec.model_storage_options)

    def node_id(self) -> str:
        """The Ray node this actor runs on (`inprocess` overrides it: no Ray there)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def ready(self) -> dict:
        """Answer once the model is loaded: the driver waits for this before queueing rows."""
        info = {"worker": self.name, "device": self.renderer.device, "load_seconds": self.renderer.load_seconds,
                "gang": self.spec.parallel.name, "node": self.node_id(), "model": self.spec.model_path}
        if self.scorers:
            info["provenance"] = {name: getattr(s, "provenance", None) for name, s in self.scorers.items()}
        return info

    def _render(self, tasks: list[Task], ticket: int) -> tuple[list | None, float]:
        """Frames per task (rank 0; None elsewhere) and the seconds spent rendering, turnstile wait excluded."""
        requests = [task.request() for task in tasks]
        with self.turnstile.turn(ticket):
            started = time.perf_counter()
            if len(requests) == 1:
                frames = self.renderer.render(requests[0])
                frames = None if frames is None else [frames]
            else:
                frames = self.renderer.render_batch(requests)
            return frames, time.perf_counter() - started

    def render(self, batch: list[tuple[Task, int]], ticket: int) -> BatchResult | None:
        """Render, encode and commit a batch of (task, attempt); return their manifest rows (ok or failed).

        `ticket` numbers this replica's batches from 0. Ranks other than 0 take their part in the render
        and return None; an error there propagates, so the driver rebuilds the gang.
        """
        # Rows of a gang arrive while `join` is still loading the model on this actor's other thread.
        self.loaded.wait()
        if self.load_error is not None:
            raise RuntimeError(f"this rank failed to load the model: {self.load_error!r}")
        tasks = [task for task, _ in batch]
        if self.rank != 0:
            self._render(tasks, ticket)
            return None
        rows = [self.spec.stamp.row(task.row(), attempts=attempt, worker=self.name, gang=self.spec.parallel.name)
                for task, attempt in batch]
        try:
            tasks = [self._with_source(self._with_image(task)) for task in tasks]
            frames, seconds = self._render(tasks, ticket)
            seconds /= len(tasks)
        except Exception as exc:  # noqa: BLE001 - any pipeline error becomes a row-level failure
            return BatchResult([self.spec.stamp.failed(row, _describe(exc)) for row in rows],
                               storage_retries=self.storage.take_retries())
        # Off the render path from here: the next batch renders while this one encodes and uploads.
        settled, unstored, outage = [], [], None
        for position, (task, row, f) in enumerate(zip(tasks, rows, frames)):
            try:
                settled.append(self._commit(task, row, f, seconds))
            except StorageUnavailable as exc:
                # Not the row's fault: the driver stops the job cleanly and a re-run continues.
                unstored.append(position)
                outage = f"storage unavailable: {exc}"
        return BatchResult(settled, tuple(unstored), outage, self.storage.take_retries())

    def _with_image(self, task: Task) -> Task:
        """The task with its conditioning image's bytes: read from its URI, which must still hold what was checked."""
        if task.image_uri is None or task.image is not None:
            return task
        data = read_image(task.image_uri, self.spec.input_storage_options)
        if hashlib.sha256(data).hexdigest() != task.image_sha256:
            raise ValueError(f"image {task.image_uri} changed since the job checked it (sha256 differs): re-run the job")
        return replace(task, image=data)

    def _with_source(self, task: Task) -> Task:
        """An upscale's task with its source clip, read and checked against the source job's sha256."""
        if task.source_uri is None or task.source is not None:
            return task
        return replace(task, source=read_source(task.source_uri, task.source_sha256, self.spec.input_storage_options))

    def _commit(self, task: Task, row: dict, rendered, seconds: float) -> dict:
        """Encode one row's render (frames, one image, or frames with sound), then create its object and poster
        whole, each at most once per key."""
        row["render_seconds"] = seconds
        frames = getattr(rendered, "frames", rendered)
        if getattr(rendered, "audio", None) is not None:
            row["audio_sample_rate"] = rendered.sample_rate
            row["audio_seconds"] = rendered.audio.shape[1] / rendered.sample_rate
        if getattr(rendered, "prompt", None) is not None:  # the model expanded the row's prompt and rendered that
            row["expanded_prompt"] = rendered.prompt
        try:
            fps = self.spec.stamp.fps or task.fps  # an upscale without render.fps: its source's
            data = (encode(rendered, self.spec.stamp.format, fps) if task.source is None
                    else encode_upscaled(rendered, task.source, self.spec.stamp.format, fps))
            still = poster(frames)  # before any commit: a poster that cannot be made fails the row, leaving nothing
            latents = self._latents(task, rendered)
            key, still_key = self.spec.stamp.keys(task.id)
            if not self._put(key, data, task.overwrite):
                # An earlier attempt of this row committed first (its replica died before answering):
                # objects are created at most once per key, so that one stands and is what we record.
                data = self.storage.get_bytes(key)
            if latents is not None and not self._put(latents[0], latents[1], task.overwrite):
                latents = (latents[0], self.storage.get_bytes(latents[0]))  # the earlier attempt's, like its video
            # After the video: should this process die in between, a re-run adopts the video and makes its poster.
            # A poster already there (an earlier attempt's, of the same frames) stands like the video.
            self._put(still_key, still, task.overwrite)
        except StorageUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - an encode or poster error fails this row only
            return self.spec.stamp.failed(row, _describe(exc))
        committed = self.spec.stamp.ok(row, key, data, still_key, latents, weights=self.weights)
        if self.scorers:  # from the committed bytes, as the scoring stage reads them: the same scores
            committed[FUSED] = self._score(task, key, data, committed["sha256"], fps)
        return committed

    def _latents(self, task: Task, rendered) -> tuple[str, bytes] | None:
        """(key, safetensors bytes) of the row's latents when the job saves them; a row re-rendered in place
        without them loses the stale object of an earlier run that had them."""
        key = self.spec.stamp.latents_key(task.id)
        if key is None:
            if task.overwrite:
                self.storage.delete(latents_key(task.id))
            return None
        saved = getattr(rendered, "latents", None)
        if saved is None:
            raise ValueError(f"output.latents=True: the renderer of {self.spec.model_path!r} returned no latents")
        return key, saved.to_bytes()

    def _score(self, task: Task, key: str, data: bytes, sha256: str, fps: int) -> dict:
        """The score row of a video just committed (its errors in `score_error`: the render stays ok)."""
        try:
            values = score_video(self.scorers, decode_video(data, key, fps, task.prompt), self.spec.score)
        except ValueError as exc:
            values = {"scored": [], "score_error": str(exc)}
        return {"id": task.id, "video_sha256": sha256, "video": key, **values}

    def _put(self, key: str, data: bytes, overwrite: bool) -> bool:
        """Write an object (replacing one when the task overwrites, else create-only); False if it stood already."""
        if overwrite:
            self.storage.put_bytes(key, data)
            return True
        return self.storage.put_bytes_if_absent(key, data)


def _describe(exc: BaseException) -> str:
    """`Type: message (at file:line)`: enough to tell a row's failure apart without a traceback."""
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {os.path.basename(last.filename)}:{last.lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"
