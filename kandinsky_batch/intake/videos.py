"""The videos a scoring stage reads: a finished job's manifest rows, or any Parquet dataset with a `video` column.

A job output's `ok` rows are scored, checked against the sha256 its manifest recorded; its other rows are
skipped, with their status. A dataset's `video` values are URIs or paths relative to the dataset's folder, its
`prompt` (optional) goes to the metrics that read one, and its `id` column (unique, no nulls) names the rows, or
else their position does. Whole-input problems are refused in one line before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.errors import InputError
from kandinsky_batch.intake.dataset import MAX_NAMED_COLUMNS, Dataset, _is_text
from kandinsky_batch.intake.images import ImageReader, shown
from kandinsky_batch.intake.job_output import is_job_output
from kandinsky_batch.output.layout import SCORES_DIR, SUCCESS_KEY
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.storage import Storage

BATCH_ROWS = 4096
_MANIFEST = ["id", "row_index", "finished_at", "status", "key", "uri", "sha256", "prompt", "fps"]


@dataclass(frozen=True)
class VideoRow:
    """One row of the source: where its video is (None: nothing to read) and what its source says of it."""

    id: str
    row_index: int
    video: str | None
    shown: str
    sha256: str | None = None
    prompt: str | None = None
    fps: int | None = None
    skipped: str | None = None
    """Why the row is not scored (its job's status, a blank `video`): recorded as its `score_error`."""
    status: str | None = None


class JobVideos:
    """A finished job's manifest as rows to score (its ok rows; the others skipped with their status)."""

    def __init__(self, path: str, storage_options: dict | None = None):
        storage = Storage(path, storage_options)
        if read_success(storage) is None:
            raise InputError(f"score.source={path!r}: the job writing there has not finished (no {SUCCESS_KEY}); "
                             "score scores a finished job's videos: run or resume that job first")
        self.table = read_manifest(storage, _MANIFEST)
        self.num_rows, self.default_out = self.table.num_rows, storage.url(SCORES_DIR)

    def batches(self) -> Iterator[list[VideoRow]]:
        for batch in self.table.to_batches(BATCH_ROWS):
            rows = []
            for r in batch.to_pylist():
                ok = r["status"] == "ok" and r["uri"] is not None
                skipped = None if ok else f"status={r['status']!r}: not scored (only the job's ok rows are)"
                rows.append(VideoRow(r["id"], r["row_index"], r["uri"] if ok else None, r["key"] or r["id"],
                                     r["sha256"] if ok else None, r["prompt"], r["fps"], skipped, r["status"]))
            yield rows


def _check_videos(path: str):
    where = f"score.source={path!r}"

    def check(schema: pa.Schema, num_rows: int, _path: str) -> None:
        names = schema.names
        if "video" not in names:
            listed = names[:MAX_NAMED_COLUMNS] + (["..."] if len(names) > MAX_NAMED_COLUMNS else [])
            raise InputError(f"{where}: required column 'video' is missing (columns: {listed}); a dataset to "
                             "score names each video by URI or by a path relative to the dataset")
        for name, ok, wanted in (("video", _is_text, "string"), ("prompt", _is_text, "string"),
                                 ("id", lambda t: _is_text(t) or pa.types.is_integer(t), "string or integer"),
                                 ("fps", pa.types.is_integer, "integer")):
            if name in names and not (ok(schema.field(name).type) or pa.types.is_null(schema.field(name).type)):
                raise InputError(f"{where}: column {name!r} has type {schema.field(name).type}, expected {wanted}")
        if num_rows == 0:
            raise InputError(f"{where}: the dataset has no rows")

    return check


class DatasetVideos:
    """A Parquet dataset of videos (other generators' too) as rows to score."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.dataset = Dataset(path, storage_options, key="score.source", check=_check_videos(path))
        self.num_rows, self.default_out = self.dataset.num_rows, None
        self.paths = ImageReader(path, storage_options)  # the same relative-path rule as conditioning images
        self.columns = [c for c in ("id", "video", "prompt", "fps") if c in self.dataset.schema.names]
        if "id" in self.columns:
            ids = pc.cast(self.dataset.column("id"), pa.string())
            if ids.null_count:
                raise InputError(f"score.source={path!r}: column 'id' has {ids.null_count} null value(s) "
                                 "(rule: every row's id, or no id column: ids are row positions)")
            counts = pc.value_counts(ids)
            repeated = counts.filter(pc.greater(counts.field("counts"), 1))
            if len(repeated):
                first = repeated[0].as_py()
                raise InputError(f"score.source={path!r}: id {first['values']!r} appears {first['counts']} times "
                                 "(rule: ids are unique)")

    def batches(self) -> Iterator[list[VideoRow]]:
        index = 0
        for batch in self.dataset.batches(self.columns, batch_size=BATCH_ROWS):
            rows = []
            for r in batch.to_pylist():
                value = r["video"]
                row_id = str(r["id"]) if "id" in r else str(index)
                blank = value is None or not value.strip()
                skipped = (f"video={shown(value) if value is not None else None}: empty (rule: a URI or a path "
                           "relative to the dataset)") if blank else None
                rows.append(VideoRow(row_id, index, None if blank else self.paths.uri(value),
                                     value if value is not None else "", None, r.get("prompt"), r.get("fps"),
                                     skipped))
                index += 1
            yield rows


def open_videos(path: str, storage_options: dict | None = None):
    """The source's rows: a job output (it holds `manifest/`) or a Parquet dataset of videos."""
    return (JobVideos if is_job_output(path, storage_options) else DatasetVideos)(path, storage_options)
