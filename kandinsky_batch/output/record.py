"""What a job writes into every manifest row besides the row itself: the one owner of those fields.

The driver (invalid and adopted rows), resume (what a committed row must match) and the actors
(rendered rows) all build manifest rows through `Stamp.row`, so the job-level values are stated once.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from kandinsky_batch.output.storage import object_key, poster_key
from pipelines.request import RenderOptions


def recorded_options(options: RenderOptions) -> str | None:
    """The manifest's `options` value: the non-default render options as JSON, or null."""
    recorded = options.recorded()
    return json.dumps(recorded, sort_keys=True) if recorded else None


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
    folder: str = "videos"
    """The prefix's folder of the rows' objects: `videos`, or `images` for a still-image model."""
    revision: str | None = None
    """The hub revision (`model.revision`) the model is pinned to, or None."""

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


@dataclass(frozen=True)
class BatchResult:
    """What a replica returns for a batch: one manifest row per row it settled (ok or failed), in order.

    `unstored` lists the batch positions whose video could not be stored because the output store stayed
    down beyond its retry budget (`outage` says why): those rows are not settled, the job stops feeding and
    a re-run continues.
    """

    rows: list[dict]
    unstored: tuple[int, ...] = ()
    outage: str | None = None
