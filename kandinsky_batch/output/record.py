"""What a job writes into every manifest row besides the row itself: the one owner of those fields.

The driver (invalid and adopted rows), resume (what a committed row must match) and the actors
(rendered rows) all build manifest rows through `Stamp.row`, so the job-level values are stated once; each
outcome's own fields (status, error, attempts, the object) are spelled once too, by `invalid`, `failed`,
`Stamp.ok` and `Stamp.adopted`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field

from kandinsky_batch.output.layout import VIDEOS_DIR, latents_key, object_key, poster_key
from pipelines.request import RenderOptions


def recorded_options(options: RenderOptions) -> str | None:
    """The manifest's `options` value: the non-default render options as JSON, or null."""
    recorded = options.recorded()
    return json.dumps(recorded, sort_keys=True) if recorded else None


def invalid(values: dict, error: str) -> dict:
    """An `invalid` row: never tried (no attempts), and why (the intake stamps the job's values on it)."""
    return {**values, "status": "invalid", "error": error, "attempts": 0}


def failed(values: dict, error: str, **run) -> dict:
    """A `failed` row: tried and failed, and why; `run` names the tries (attempts, worker, gang)."""
    return {**values, **run, "status": "failed", "error": error}


@dataclass(frozen=True)
class Stamp:
    """The job-level values of a manifest row: model, container, frame rate and the effective render options."""

    model: str
    format: str
    fps: int | None
    """Frame rate of every row; None: each row's own (an upscale writes each clip at its source's)."""
    options: RenderOptions = field(default_factory=RenderOptions)
    sound: bool = False
    """Whether the model renders sound (Kandinsky 6): raw frames then come with their waveform, in an `.npz`."""
    folder: str = VIDEOS_DIR
    """The prefix's folder of the rows' objects: `videos`, or `images` for a still-image model."""
    revision: str | None = None
    """The hub revision (`model.revision`) the model is pinned to, or None."""
    latents: bool = False
    """Whether every ok row also commits its latents and prompt embeddings (`output.latents`)."""

    def keys(self, row_id: str) -> tuple[str, str]:
        """(object key, poster key) of a row under the output prefix: where its render and its poster go."""
        return object_key(row_id, self.extension, self.folder), poster_key(row_id)

    @property
    def extension(self) -> str:
        """The output objects' file extension (`kandinsky_batch.output.video.extension`)."""
        return "npz" if self.format == "npy" and self.sound else self.format

    @functools.cached_property
    def fields(self) -> dict:
        fps = {} if self.fps is None else {"fps": self.fps}
        return {"model": self.model, "model_revision": self.revision, "format": self.format, **fps,
                "options": recorded_options(self.options), "approximate": self.options.approximate}

    def row(self, values: dict, **outcome) -> dict:
        """A manifest row: the row's own values, the job's, then the outcome (status, error, uri, ...)."""
        return {**values, **self.fields, **outcome}

    def failed(self, values: dict, error: str, **run) -> dict:
        """A `failed` manifest row (`failed`) with the job's values."""
        return self.row(failed(values, error, **run))

    def latents_key(self, row_id: str) -> str | None:
        """The key of a row's latents object, or None when the job does not save latents."""
        return latents_key(row_id) if self.latents else None

    def ok(self, values: dict, key: str, data: bytes, poster_key: str, latents: tuple[str, bytes] | None = None,
           **run) -> dict:
        """An `ok` manifest row: its object's key, size and checksum, its poster's key, its latents' (key, bytes)
        if it has them; `run`: how it was made."""
        saved = {} if latents is None else {"latents_key": latents[0], "latents_bytes": len(latents[1]),
                                            "latents_sha256": hashlib.sha256(latents[1]).hexdigest()}
        return self.row(values, **run, status="ok", error=None, key=key, bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest(), poster_key=poster_key, **saved)

    def adopted(self, values: dict, key: str, data: bytes, poster_key: str) -> dict:
        """An orphaned object taken as the row's render: `ok`, never tried by a replica."""
        return self.ok(values, key, data, poster_key, attempts=0, worker="adopted")


@dataclass(frozen=True)
class BatchResult:
    """What a replica returns for a batch: one manifest row per row it settled (ok or failed), in order.

    `unstored` lists the batch positions whose video could not be stored because the output store stayed
    down beyond its retry budget (`outage` says why): those rows are not settled, the job stops feeding and
    a re-run continues. `storage_retries`: the replica's storage retries since its last batch (`storage_retries`
    of the job's `_SUCCESS`).
    """

    rows: list[dict]
    unstored: tuple[int, ...] = ()
    outage: str | None = None
    storage_retries: int = 0
