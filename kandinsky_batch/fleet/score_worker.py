"""The scoring actor: one replica with its metrics loaded once, reading committed videos and scoring them.

A row is read (whole, with retries), checked against the sha256 its source recorded, decoded with
`kandinsky_batch.output.video`'s decoders into a `pipelines.scoring.video.Video`, and scored by each of the
row's metrics. Whatever is wrong with a row (no object, zero bytes, another sha256, not decodable, a metric that
cannot score it) is that row's `score_error`, naming the field and the value; only the replica's death retries it.
The transports (`cluster`, `inprocess`) run it as they run `RenderWorker`: `render(batch, ticket)` is the call.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import socket
import sys
import time
from dataclasses import dataclass, field

from kandinsky_batch.output.record import BatchResult
from kandinsky_batch.errors import StorageUnavailable
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.video import IMAGE_FORMATS, decode_av, decode_image, decode_mp4, decode_npy, decode_npz
from kandinsky_batch.output.video import container_fps
from pipelines import ParallelSpec
from pipelines.scoring.registry import metric
from pipelines.scoring.video import Video

AV_CONTAINERS = ("mp4", "mov", "m4v", "webm", "mkv", "avi", "gif")
"""Containers read with PyAV (frames, and sound when there is a stream): other generators' videos too."""
FORMATS = (*AV_CONTAINERS, "npy", "npz", *IMAGE_FORMATS)
DEFAULT_FPS = 24
FUSED = "_scores"
"""The key of a render row's score row (fused scoring), taken off before the manifest sees the row."""
ALREADY = "already"
"""A row key the worker sets when every metric was scored for the sha256 it read (an external video's re-run)."""


@dataclass(frozen=True)
class ScoreTask:
    """One video to score: where it is, what its source recorded, and which metrics are still missing."""

    id: str
    video: str
    """The object's URI (read here)."""
    shown: str
    """The value `score_error` and the table's `video` column name: the manifest's key, or the dataset's value."""
    metrics: tuple[str, ...]
    sha256: str | None = None
    """The sha256 its source recorded (a job's manifest), checked; None: taken as read (an external video)."""
    done: tuple = ()
    """(sha256, metrics) already scored for this id: a video whose sha256 is known only once read skips those."""
    prompt: str | None = None
    fps: int | None = None
    row_index: int = 0

    def cost(self) -> float:
        return float(len(self.metrics))

    def batch_key(self) -> tuple:
        return ()

    def row(self) -> dict:
        """The row the work queue records when the replica died on it too often."""
        return {"id": self.id, "video_sha256": self.sha256, "video": self.shown, "scored": []}


@dataclass(frozen=True)
class ScoreSpec:
    """Everything a scoring replica needs, picklable; the fields the transports read are `RenderWorker`'s."""

    metrics: tuple[str, ...]
    weights: tuple = ()
    """(metric, weights) overrides (`score.weights`)."""
    storage_options: dict = field(default_factory=dict, repr=False)
    retries: int = 5
    retry_backoff: float = 0.5
    model_path: str = "score"
    num_threads: int | None = None
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    group: str = "score"


def load_scorers(metrics, weights=()) -> dict:
    """Each metric's scorer, its models loaded (once per replica)."""
    given = dict(weights)
    return {name: metric(name).load(given.get(name)) for name in metrics}


def decode_video(data: bytes, shown: str, fps: int | None = None, prompt: str | None = None) -> Video:
    """The bytes of a committed object as a `Video` (uint8 RGB frames, and its sound when it has any);
    a ValueError naming the video when they are not one."""
    ext = posixpath.splitext(shown.split("?", 1)[0])[1].lstrip(".").lower()
    if ext not in FORMATS:
        raise ValueError(f"video={shown!r}: format {ext or '(none)'!r} is not one scored (known: {', '.join(FORMATS)})")
    if not data:
        raise ValueError(f"video={shown!r}: zero-length object (0 bytes)")
    audio = rate = None
    try:
        if ext in AV_CONTAINERS:
            try:
                frames, audio, rate = decode_av(data)
            except ValueError:  # no audio stream: frames alone
                frames = decode_mp4(data)
            fps = fps or container_fps(data)
        elif ext == "npz":
            frames, audio, rate = decode_npz(data)
        elif ext == "npy":
            frames = decode_npy(data)
        else:
            frames = decode_image(data)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder says is why the row cannot be scored
        raise ValueError(f"video={shown!r}: cannot be decoded as .{ext} ({type(exc).__name__}: "
                         f"{str(exc).strip()[:160]})") from None
    if getattr(frames, "dtype", None) is None or frames.dtype.name != "uint8" or frames.ndim != 4 \
            or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"video={shown!r}: frames of shape {getattr(frames, 'shape', None)} "
                         f"dtype {getattr(frames, 'dtype', None)} (rule: uint8 (F, H, W, 3), F >= 1)")
    return Video(frames=frames, fps=int(fps or DEFAULT_FPS), prompt=prompt, audio=audio, sample_rate=rate,
                 data=data, format=ext)


def score_video(scorers: dict, video: Video, metrics) -> dict:
    """The score row's values for one decoded video: each metric's value, `scored`, and `score_error`."""
    values, scored, errors = {}, [], []
    for name in metrics:
        try:
            value = scorers[name](video)
        except Exception as exc:  # noqa: BLE001 - a metric that cannot score this video errs this metric only
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip()[:200]}")
            continue
        values[name] = None if value is None else float(value)
        scored.append(name)
    return {**values, "scored": scored, "score_error": "; ".join(errors) or None}


class ScoreWorker:
    """Ray actor class (wrapped with `ray.remote` by the transport, so this module knows no Ray)."""

    CONCURRENCY = 2  # one row reads while the other scores

    def __init__(self, spec: ScoreSpec, replica: int, rank: int = 0):
        started = time.perf_counter()
        self.spec, self.replica = spec, replica
        self.scorers = load_scorers(spec.metrics, spec.weights)
        self.load_seconds = time.perf_counter() - started
        if spec.num_threads and "torch" in sys.modules:
            import torch

            torch.set_num_threads(spec.num_threads)  # several CPU replicas on one host share its cores
        self._stores: dict[str, Storage] = {}
        self.device = "cpu"
        if any(metric(name).device == "gpu" for name in spec.metrics) and "torch" in sys.modules:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def name(self) -> str:
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES") if self.device == "cuda" else None
        return f"{self.spec.group}/replica{self.replica}@{socket.gethostname()}:{os.getpid()}:" \
               f"{'gpu' + gpu if gpu is not None else self.device}"

    def node_id(self) -> str:
        """The Ray node this actor runs on (the in-process transport overrides it: no Ray there)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def ready(self) -> dict:
        """Answer once the metrics are loaded, with what produced each column (recorded in `_SUCCESS`)."""
        return {"worker": self.name, "device": self.device, "load_seconds": self.load_seconds, "gang": None,
                "node": self.node_id(), "model": "score",
                "provenance": {name: getattr(s, "provenance", None) for name, s in self.scorers.items()}}

    def _read(self, uri: str) -> bytes:
        folder, name = uri.rsplit("/", 1)
        if folder not in self._stores:  # one client per folder: most rows share the few there are
            self._stores[folder] = Storage(folder, self.spec.storage_options, retries=self.spec.retries,
                                           backoff=self.spec.retry_backoff)
        return self._stores[folder].get_bytes(name)

    def render(self, batch: list[tuple[ScoreTask, int]], ticket: int) -> BatchResult:
        """Score a batch of (task, attempt); one score row each (the transports' batch call, hence its name)."""
        rows, unstored, outage = [], [], None
        for position, (task, attempt) in enumerate(batch):
            try:
                rows.append({**self.score(task), "status": "ok", "attempts": attempt, "worker": self.name})
            except StorageUnavailable as exc:  # not the row's fault: the job stops cleanly, a re-run continues
                unstored.append(position)
                outage = f"storage unavailable: {exc}"
        return BatchResult(rows, tuple(unstored), outage, sum(s.take_retries() for s in self._stores.values()))

    def score(self, task: ScoreTask) -> dict:
        """One task's score row (its errors in `score_error`)."""
        row = {"id": task.id, "video": task.shown, "video_sha256": task.sha256}
        try:
            data = self._read(task.video)
        except StorageUnavailable:
            raise
        except FileNotFoundError:
            return {**row, "scored": [], "score_error": f"video={task.shown!r}: no such object ({task.video})"}
        except Exception as exc:  # noqa: BLE001 - unreadable (permissions, a folder): the row's problem
            return {**row, "scored": [], "score_error": f"video={task.shown!r}: cannot read {task.video} "
                                                        f"({type(exc).__name__}: {str(exc).strip()[:160]})"}
        sha = hashlib.sha256(data).hexdigest()
        if task.sha256 is not None and sha != task.sha256:
            return {**row, "scored": [], "score_error": f"video_sha256={task.sha256!r}: {task.shown} holds "
                                                        f"sha256 {sha!r} now (changed since its job committed it)"}
        todo = [m for m in task.metrics if m not in dict(task.done).get(sha, ())]
        row["video_sha256"] = sha
        if not todo:
            return {**row, ALREADY: True}
        try:
            video = decode_video(data, task.shown, task.fps, task.prompt)
        except ValueError as exc:
            return {**row, "scored": [], "score_error": str(exc)}
        return {**row, **score_video(self.scorers, video, todo)}
