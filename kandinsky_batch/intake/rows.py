"""Input rows -> render tasks: effective parameters, seeds, and per-row validation.

A row the model cannot render exactly as asked becomes `invalid` with an error naming the field,
the value and the rule; the other rows still render. Nothing is adjusted silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.config.schema import MAX_SEED, JobConfig, derive_seed
from kandinsky_batch.intake.images import Conditioning, ImageReader, shown
from kandinsky_batch.output.record import invalid as invalid_row
from kandinsky_batch.intake.ids import IdIndex, row_ids
from kandinsky_batch.intake.rules import (PARAMS, image_text_tokens, joined, param_error, source_error,
                                          text_error)
from pipelines import ModelSpec, RenderRequest
from pipelines.cost import cost, visual_tokens
from pipelines.kinds import BY_NAME, IMAGE_REQUIRED, NO_IMAGE

SWEEP_CELL_COLUMNS = ("sweep_model", "sweep_seed_index")
"""A sweep cell's axis values as typed columns (set by `cells.expand`), named apart from the effective model and seed."""


@dataclass(frozen=True)
class Task:
    """One valid row with every parameter resolved to the value that will be rendered."""

    id: str
    row_index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    sweep: str | None = None
    """The cell's sweep-axis values as JSON (None outside a sweep)."""
    image_uri: str | None = None
    """The conditioning image's URI (None: none, or bytes given in the dataset)."""
    image_sha256: str | None = None
    image: bytes | None = field(default=None, repr=False)
    """The conditioning image's bytes when the dataset holds them (a URI's are read by the replica)."""
    source_uri: str | None = None
    """The clip an upscale (sr) renders from: another job's committed video."""
    source_sha256: str | None = None
    fps: int | None = None
    """The frame rate it is written at when the job's is not set (an upscale: its source's); None: the job's."""
    source: object = field(default=None, repr=False)
    """That clip decoded (frames, or a Clip with sound): read by the replica that renders the row."""
    overwrite: bool = False
    """Replace an object already under this row's key (a forced re-render, a truncated orphan)."""
    text_tokens: tuple = (0, 0)
    """Tokens of the prompt and the effective negative prompt: rows batch together only when equal."""
    carried: tuple = field(default=(), repr=False)
    """(manifest column, value) of the input columns the job carries through to the manifest unread."""

    def request(self) -> RenderRequest:
        fields = {name: getattr(self, name) for name in _ROW_FIELDS}
        for name in ("id", "row_index", "sweep", "image_uri", "image_sha256", "source_uri", "source_sha256", "fps"):
            del fields[name]
        return RenderRequest(**fields, image=self.image, video=self.source)

    def row(self) -> dict:
        """The task's manifest fields: its id, position, effective parameters and the input's carried columns."""
        return {**{name: getattr(self, name) for name in _ROW_FIELDS}, **dict(self.carried)}

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one batched forward. The transformer has no text attention
        mask, so prompts of different token lengths would attend to padding: lengths are in the key."""
        return (self.height, self.width, self.num_frames, self.num_inference_steps, self.guidance_scale,
                self.text_tokens)

    def tokens(self) -> int:
        """Visual tokens the transformer sees (`pipelines.cost.visual_tokens`)."""
        return visual_tokens(self.num_frames, self.height, self.width)

    def cost(self) -> float:
        """Relative GPU cost: visual tokens x steps x transformer passes per step (`pipelines.cost.cost`)."""
        return cost(self.num_frames, self.height, self.width, self.num_inference_steps, self.guidance_scale)


_ROW_FIELDS = tuple(f.name for f in fields(Task)
                    if f.name not in ("overwrite", "text_tokens", "image", "source", "carried"))


def _fit_columns(values: dict) -> dict:
    """Blank out numbers an invalid row gave that the manifest's int32/int64 columns cannot hold."""
    limits = {"seed": MAX_SEED, **{key: 2**31 - 1 for key in PARAMS if key != "guidance_scale"}}
    return {k: (None if k in limits and v is not None and not -limits[k] <= v <= limits[k] else v)
            for k, v in values.items()}


# The fields of a valid row the validator resolves: a Task's, less what the replica or the queue sets.
_RESOLVED = ("id", "row_index", "prompt", "negative_prompt", "seed", "height", "width", "num_frames",
             "num_inference_steps", "guidance_scale", "sweep", "image_uri", "image_sha256", "image", "source_uri",
             "source_sha256", "fps")


@dataclass
class Validated:
    """One batch of input rows resolved: valid rows with their Task fields, the rest `invalid` rows."""

    tasks: list[dict]
    """Valid rows as the validator resolved them (Task fields, text token counts), made Tasks by `task_list`."""
    invalid: list[dict]
    done: list[tuple[str, int]] = field(default_factory=list)
    """(id, row_index) of rows already committed with these effective values (see `RowValidator.validate`)."""
    carried: list[tuple] = field(default_factory=list)
    """Per valid row (in `tasks`' order): its carried input columns as (manifest column, value) pairs."""

    def task_list(self) -> list[Task]:
        carried = self.carried or [()] * len(self.tasks)
        return [Task(**{k: row.get(k) for k in _RESOLVED}, text_tokens=(row["prompt_tokens"], row["negative_tokens"]),
                     carried=extra)
                for row, extra in zip(self.tasks, carried)]


def _numbers(batch: pa.Table, key: str, default) -> list:
    """A parameter column with the config's default where null, as Python numbers."""
    if key not in batch.column_names:
        return [default] * batch.num_rows
    return pc.fill_null(batch.column(key), default).to_pylist() if default is not None else batch.column(key).to_pylist()


class RowValidator:
    """Validates batches of input rows against the config's defaults and the model's limits.

    Columns leave Arrow once per batch; texts go to the tokenizer in one batch call, each distinct text
    once (the default negative prompt repeats on every row). Nothing per row outlives the batch.
    """

    def __init__(self, cfg: JobConfig, spec: ModelSpec, ids: IdIndex, images: ImageReader | None = None,
                 carried: dict[str, str] | None = None):
        self.defaults, self.spec, self.ids = cfg.render, spec, ids
        self.carried = {**(carried or {}), **{name: name for name in SWEEP_CELL_COLUMNS}}
        """Input column -> manifest column of what goes through unread (the user's columns, a sweep cell's axes)."""
        self.kind = BY_NAME[spec.kind]
        if not self.kind.frames:  # one image: the config's frame count (a video default) does not apply
            self.defaults = replace(cfg.render, num_frames=1)
        self.images = images
        self.scale = cfg.model.resolution_scale
        self.with_image_tokens = self.kind.counts_image_tokens
        """Image-to-image counts a text's tokens with its image (the image's tokens share the text's budget)."""
        self._tokens: dict[str, int] = {}

    def _count(self, texts: list[str]) -> None:
        new = list({t: None for t in texts if t not in self._tokens})
        if new:
            self._tokens.update(zip(new, self.spec.count_tokens(new)))
        if len(self._tokens) > 65536:  # a cache, not a record: keep the driver's memory flat
            self._tokens = {t: self._tokens[t] for t in texts}

    def validate(self, batch: pa.Table, rows: np.ndarray, done: Callable[[dict], bool] | None = None,
                 errors: dict[int, str] | None = None) -> Validated:
        """The dataset's rows `rows` (their positions), given as `batch`; `errors` (by position in `batch`) are
        problems found before validation (a sweep cell the sweep cannot render as asked).

        `done(candidate)` says a row is already committed with exactly these effective values (resume): such a
        row passed every rule before and would again, so its texts are not tokenized; it is listed in `done`.
        """
        if self.kind.upscales:
            return self._validate_sources(batch, rows, done)
        n, d = batch.num_rows, self.defaults
        ids = row_ids(batch.column("id") if "id" in batch.column_names else None, rows).to_pylist()
        positions = rows.tolist()
        prompts = batch.column("prompt").to_pylist()
        negatives = batch.column("negative_prompt").to_pylist() if "negative_prompt" in batch.column_names \
            else [None] * n
        seeds = _numbers(batch, "seed", None)
        sweeps = batch.column("sweep").to_pylist() if "sweep" in batch.column_names else [None] * n
        images = self._images(batch.column("image").to_pylist() if "image" in batch.column_names else [None] * n)
        params = {key: _numbers(batch, key, getattr(d, key)) for key in PARAMS}
        guidance = [float(g) for g in params["guidance_scale"]]
        effective = [self.spec.negative_prompt(d.negative_prompt if neg is None else neg, g)
                     for g, neg in zip(guidance, negatives)]
        carried = self._carried(batch)
        # 1. Effective values of every row; rows committed with exactly these are done.
        candidates, skipped = [], []
        for i in range(n):
            seed = seeds[i]
            candidate = dict(id=ids[i], row_index=positions[i], prompt=prompts[i],
                             seed=derive_seed(d.seed, ids[i]) if seed is None else int(seed),
                             **{key: params[key][i] for key in PARAMS})
            candidate["guidance_scale"] = guidance[i]
            candidate["negative_prompt"] = effective[i]
            candidate["sweep"] = sweeps[i]
            image = images[i]
            candidate["image_uri"] = image.uri if isinstance(image, Conditioning) else None
            candidate["image_sha256"] = image.sha256 if isinstance(image, Conditioning) else None
            candidate.update((name, values[i]) for name, values in carried)
            candidates.append(candidate)
            skipped.append(done is not None and positions[i] not in self.ids.errors and not (errors and i in errors)
                           and done(candidate))
        # 2. Texts of the rest: every distinct one counted once, in one tokenizer call (image-to-image counts a
        # text with its image: step 3).
        if not self.with_image_tokens:
            self._count([p for p, skip in zip(prompts, skipped) if p is not None and not skip]
                        + [t for t, skip in zip(effective, skipped) if t is not None and not skip])
        # 3. The rules, in the order that decides which one a row's message names.
        valid, invalid, finished = [], [], []
        for i, candidate in enumerate(candidates):
            if skipped[i]:
                finished.append((candidate["id"], candidate["row_index"]))
                continue
            # Every rule the row breaks, in this order (the first one named first).
            error = joined([self.ids.errors.get(positions[i]), (errors or {}).get(i),
                             images[i] if isinstance(images[i], str) else None,
                             text_error("prompt", prompts[i], self.spec, True, self._tokens.get(prompts[i], 0)),
                             param_error(candidate, self.spec),
                             # The model's own default passes as it is (text-to-image's is empty); a given one
                             # must be usable text.
                             text_error("negative_prompt", effective[i], self.spec, False,
                                         self._tokens.get(effective[i], 0))
                             if effective[i] is not None and effective[i] != self.spec.negative_prompt(None, 2.0)
                             else None])
            tokens = None
            if error is None and self.with_image_tokens:
                error, tokens = image_text_tokens(self.spec, prompts[i], effective[i], images[i].size)
            if error is None:
                candidate["image"] = images[i].data if isinstance(images[i], Conditioning) else None
                candidate["prompt_tokens"], candidate["negative_tokens"] = tokens or (
                    self._tokens[prompts[i]], 0 if effective[i] is None else self._tokens[effective[i]])
                valid.append(candidate)
            else:
                invalid.append(invalid_row(_fit_columns(candidate), error))
        return Validated(valid, invalid, finished,
                         [tuple((name, row[name]) for name, _ in carried) for row in valid])

    def _carried(self, batch: pa.Table) -> list[tuple[str, list]]:
        """(manifest column, values) of the batch's columns that go through to the manifest unread."""
        return [(manifest, batch.column(name).to_pylist()) for name, manifest in self.carried.items()
                if name in batch.column_names]

    def _validate_sources(self, batch: pa.Table, rows: np.ndarray, done: Callable[[dict], bool] | None) -> Validated:
        """Rows of another job's manifest (`kandinsky_batch.intake.job_output`) to upscale: each source row that rendered
        `ok` a video the model can take, at the size it will have (the model takes no text and no guidance)."""
        from pipelines.limits_sr import DEFAULT_SCALE, upscaled_size

        d, scale = self.defaults, self.scale or DEFAULT_SCALE
        carried = self._carried(batch)
        ids = row_ids(batch.column("id"), rows).to_pylist()
        valid, invalid, finished = [], [], []
        for i, (position, source) in enumerate(zip(rows.tolist(), batch.to_pylist())):
            seed = source["seed"]
            candidate = dict(id=ids[i], row_index=position, prompt=source["prompt"], negative_prompt=None,
                             seed=derive_seed(d.seed, ids[i]) if seed is None else int(seed),
                             height=source["source_height"], width=source["source_width"],
                             num_frames=source["source_frames"], num_inference_steps=d.num_inference_steps,
                             guidance_scale=1.0, sweep=None, image_uri=None, image_sha256=None,
                             source_uri=source["source_uri"], source_sha256=source["source_sha256"],
                             fps=source["source_fps"] if d.fps is None else None)
            candidate.update((name, values[i]) for name, values in carried)  # the first stage's carried columns
            problem = source_error(source, d.fps)
            if problem is None:
                try:
                    candidate["height"], candidate["width"] = upscaled_size(
                        source["source_height"], source["source_width"], scale, self.spec.tile_sizes,
                        self.spec.spatial_multiple)
                except ValueError as exc:
                    problem = str(exc)
                problem = problem or param_error(candidate, self.spec)
            error = joined([self.ids.errors.get(position), problem])
            if error is None and done is not None and done(candidate):
                finished.append((candidate["id"], candidate["row_index"]))
            elif error is None:
                valid.append({**candidate, "image": None, "prompt_tokens": 0, "negative_tokens": 0})
            else:
                invalid.append(invalid_row(_fit_columns(candidate), error))
        return Validated(valid, invalid, finished,
                         [tuple((name, row[name]) for name, _ in carried) for row in valid])

    def _images(self, values: list) -> list:
        """Per row: its checked image (`Conditioning`), the error naming the `image` field, or None."""
        kind = self.kind
        if kind.image == NO_IMAGE:
            return [None if v is None else f"image={shown(v)}: the {kind.name} model takes no image (rule: only "
                    "image-conditioned models (i2v, i2i, Kandinsky 6) take an `image`)" for v in values]
        read = self.images.read_all(values) if self.images and any(v is not None for v in values) \
            else [None] * len(values)
        if kind.image == IMAGE_REQUIRED:
            read = [f"image=None: missing (rule: the {kind.name} model renders from a conditioning image)"
                    if r is None else r for r in read]
        return read

