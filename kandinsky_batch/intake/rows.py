"""Input rows -> render tasks: effective parameters, seeds, and per-row validation.

A row the model cannot render exactly as asked becomes `invalid` with an error naming the field,
the value and the rule; the other rows still render. Nothing is adjusted silently.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kandinsky_batch.config.schema import MAX_SEED, JobConfig, derive_seed
from kandinsky_batch.intake.images import Conditioning, ImageReader, shown
from kandinsky_batch.output.record import invalid as invalid_row
from kandinsky_batch.output.layout import SAFE_ID, object_key, stem
from pipelines import ModelSpec, RenderRequest
from pipelines.cost import cost, visual_tokens
from pipelines.kinds import BY_NAME, IMAGE_REQUIRED, NO_IMAGE

MAX_ID_CHARS = 256
MAX_STEPS = 1000
PARAMS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
SWEEP_CELL_COLUMNS = ("sweep_model", "sweep_seed_index")
"""A sweep cell's axis values as typed columns (set by `Sweep.expand`), named apart from the effective model and seed."""
# Unicode categories an id may not contain: controls, format (zero-width, bidi), surrogates, private use,
# and line/paragraph separators (they split log lines).
_BAD_ID_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


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


def _id_error(row_id: str | None) -> str | None:
    if row_id is None:
        return "id=None: missing (rule: ids must be non-empty; drop the column to use row positions)"
    if not row_id.strip():
        return f"id={row_id!r}: empty or blank (rule: ids must be non-empty)"
    if len(row_id) > MAX_ID_CHARS:
        return f"id={row_id[:40]!r}...: {len(row_id)} characters (rule: at most {MAX_ID_CHARS})"
    bad = next((c for c in row_id if unicodedata.category(c) in _BAD_ID_CATEGORIES), None)
    if bad is not None:
        return f"id={row_id!r}: contains control character U+{ord(bad):04X} (rule: printable characters only)"
    path = row_id.replace("\\", "/")
    if path.startswith("/") or any(part in (".", "..") for part in path.split("/")):
        return f"id={row_id!r}: would escape the output prefix (rule: no leading '/', no '.' or '..' segments)"
    return None


def _is_blank(text: str) -> bool:
    # Whitespace, controls and zero-width characters only: the text encoder would see nothing.
    return not any(not (c.isspace() or unicodedata.category(c)[0] in "CZ") for c in text)


def _text_error(field: str, text, spec: ModelSpec, required: bool, tokens: int | None) -> str | None:
    if text is None:
        return f"{field}=None: missing (rule: required)" if required else None
    if _is_blank(text):
        return f"{field}={text[:40]!r}: empty or blank (rule: must contain text)"
    if tokens > spec.max_prompt_tokens:
        return (f"{field}={text[:40]!r}...: {tokens} tokens (rule: the text encoder keeps at most "
                f"{spec.max_prompt_tokens}; longer prompts would be truncated)")
    return None


def param_problems(task: dict, spec: ModelSpec) -> list[tuple[tuple[str, ...], str]]:
    """Every render-parameter rule `task` breaks, in checking order, as (the fields it names, the message)."""
    problems = []
    for key in ("height", "width"):
        value = task[key]
        if value <= 0 or value % spec.spatial_multiple or value > spec.max_size:
            problems.append(((key,), f"{key}={value}: must be a positive multiple of {spec.spatial_multiple} "
                                     f"and at most {spec.max_size} for this model"))
    # The list of sizes is checked once both sides pass their own rule: a bad side already names the problem.
    if not problems and spec.sizes and (task["width"], task["height"]) not in spec.sizes:
        shown = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
        problems.append((("width", "height"), f"width x height={task['width']}x{task['height']}: not a size this "
                                              f"{spec.kind} model renders (rule: one of {shown})"))
    frames = task["num_frames"]
    if spec.max_frames == 1 and frames != 1:
        problems.append((("num_frames",), f"num_frames={frames}: this model renders one image (rule: leave "
                                          "num_frames empty, or 1)"))
    else:
        if frames < spec.min_frames:
            problems.append((("num_frames",), f"num_frames={frames}: too few for this {spec.kind} model (rule: at "
                                              f"least {spec.min_frames}; it renormalises its first latent frames "
                                              "against later ones)"))
        if frames < 1 or (frames - 1) % spec.temporal_multiple or frames > spec.max_frames:
            problems.append((("num_frames",), f"num_frames={frames}: must be {spec.temporal_multiple}k+1 and at "
                                              f"most {spec.max_frames} (e.g. 121 for 5 s, 241 for 10 s)"))
    steps = task["num_inference_steps"]
    if not 1 <= steps <= MAX_STEPS:
        problems.append((("num_inference_steps",), f"num_inference_steps={steps}: must be in [1, {MAX_STEPS}]"))
    guidance = task["guidance_scale"]
    if not (math.isfinite(guidance) and guidance >= 0):
        problems.append((("guidance_scale",), f"guidance_scale={guidance}: must be a finite number >= 0"))
    elif spec.guidance is not None and guidance != spec.guidance:
        problems.append((("guidance_scale",), f"guidance_scale={guidance}: this distilled checkpoint runs at "
                                              f"guidance_scale={spec.guidance} only"))
    seed = task["seed"]
    if not 0 <= seed <= MAX_SEED:
        problems.append((("seed",), f"seed={seed}: must be in [0, {MAX_SEED}]"))
    return problems


def _param_error(task: dict, spec: ModelSpec) -> str | None:
    """Every render-parameter rule `task` breaks, joined with '; ' (None: it breaks none)."""
    return _joined(message for _, message in param_problems(task, spec))


def _joined(errors) -> str | None:
    """A row's reasons in checking order, each once, joined with '; ' (None: no reason)."""
    unique = list(dict.fromkeys(e for e in errors if e))
    return "; ".join(unique) or None


def _image_text_tokens(spec: ModelSpec, prompt: str, negative: str | None, size: tuple) -> tuple:
    """(error, (prompt tokens, negative tokens)) of an image-to-image row: its texts counted with its image."""
    from pipelines.limits import k5_i2i_count_tokens, k5_i2i_token_problem

    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if text is not None and "<|image_pad|>" in text:
            return (f"{name}={text[:40]!r}: contains <|image_pad|> (rule: the i2i processor reserves it for the "
                    "image's tokens)"), None
    texts = [t for t in (prompt, negative) if t is not None]
    try:
        counts = k5_i2i_count_tokens(spec.tokenizer_dir, texts, [size] * len(texts))
    except ValueError as exc:  # an image the processor cannot take ("image=WxH: rule")
        return str(exc), None
    if max(counts) > spec.max_prompt_tokens:  # the message names the field, its count and the image's share
        texts = {"prompt": prompt, "negative_prompt": negative}
        return k5_i2i_token_problem(spec.tokenizer_dir, texts, size, limit=spec.max_prompt_tokens), None
    return None, (counts[0], counts[1] if negative is not None else 0)


def _source_error(source: dict, fps: int | None) -> str | None:
    """Why a source row (`kandinsky_batch.intake.job_output`) is not a clip to upscale, naming the source's field."""
    if source["source_status"] != "ok":
        why = f": {source['source_error']}" if source["source_error"] else ""
        return (f"source status={source['source_status']!r}: only the source job's ok rows are upscaled "
                f"(the source row{why})")
    if source["source_format"] not in ("mp4", "npy") or source["source_uri"].rsplit(".", 1)[-1] not in (
            "mp4", "npy", "npz"):
        return (f"source format={source['source_format']!r}: not a video (rule: sr upscales mp4 or npy clips of a "
                "video model)")
    if fps is not None and source["source_fps"] != fps:
        return (f"source fps={source['source_fps']}: the upscaled clip is written at render.fps={fps} "
                f"(rule: set render.fps to the source's)")
    return None


def _fit_columns(values: dict) -> dict:
    """Blank out numbers an invalid row gave that the manifest's int32/int64 columns cannot hold."""
    limits = {"seed": MAX_SEED, **{key: 2**31 - 1 for key in PARAMS if key != "guidance_scale"}}
    return {k: (None if k in limits and v is not None and not -limits[k] <= v <= limits[k] else v)
            for k, v in values.items()}


# Ids that pass every id rule at a glance (no control, space, slash or leading dot; short): the rest are
# checked one by one with `_id_error`, so every message stays exactly what it is.
_PLAIN_ID = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,255}$"
_SAFE_KEY = f"^{SAFE_ID}$"  # such an id is its own stem (`layout.stem`)
_HAS_WORD = r"[A-Za-z0-9]"  # a text with a letter or digit is not blank


def row_ids(column: pa.ChunkedArray | pa.Array | None, rows: np.ndarray) -> pa.Array:
    """The rows' ids as strings: the `id` column stringified (null as ""), or the row positions `rows`."""
    if column is None:
        return pa.array(rows, pa.int64()).cast(pa.string())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return pc.fill_null(column.cast(pa.string()), "")


@dataclass
class IdIndex:
    """Id errors of the whole dataset, found from its id column alone before any row is validated.

    Exact over every row: ids that break a rule, duplicates (naming the first row) and distinct ids that
    would share an object key. Only rows with an error are held, so its size follows the bad rows, not N.
    """

    errors: dict[int, str] = field(default_factory=dict)

    @classmethod
    def build(cls, column: pa.ChunkedArray | None, num_rows: int, fmt: str) -> "IdIndex":
        index = cls()
        if column is None:
            return index  # positions: valid and distinct
        nulls = set(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist())
        rows = np.arange(num_rows)
        ids = row_ids(column, rows)
        # 1. Rule breakers (rare): checked in Python for their exact message.
        plain = pc.match_substring_regex(ids, _PLAIN_ID).to_numpy(zero_copy_only=False)
        for row in np.flatnonzero(~plain):
            error = _id_error(None if row in nulls else ids[row].as_py())
            if error is not None:
                index.errors[int(row)] = error
        # 2. Duplicates: every row after the first with its id (first_seen counts rows with bad ids too).
        table = pa.table({"id": ids, "row": rows})
        first = table.group_by("id", use_threads=False).aggregate([("row", "min"), ("row", "count")])
        first = first.filter(pc.greater(first["row_count"], 1))
        if first.num_rows:
            dups = table.join(first, "id").filter(pc.not_equal(pc.field("row"), pc.field("row_min")))
            for row, owner in zip(dups["row"].to_pylist(), dups["row_min"].to_pylist()):
                if row not in index.errors:
                    index.errors[row] = (f"id={ids[row].as_py()!r}: duplicate of row {owner} "
                                         f"(rule: ids must be unique)")
        # 3. Distinct ids sharing an object key (a crafted id can equal another's hashed key).
        safe = pc.and_(pc.match_substring_regex(ids, _SAFE_KEY), pc.invert(pc.match_substring(ids, "..")))
        unsafe = np.flatnonzero(~safe.to_numpy(zero_copy_only=False))
        stems = ids.to_pylist() if len(unsafe) else None
        for row in unsafe:
            if row not in index.errors:
                stems[row] = stem(stems[row])
        keyed = pa.table({"stem": pa.array(stems, pa.string()) if stems else ids, "row": rows})
        if index.errors:
            keyed = keyed.filter(pc.invert(pc.is_in(keyed["row"], pa.array(list(index.errors), pa.int64()))))
        owners = keyed.group_by("stem", use_threads=False).aggregate([("row", "min"), ("row", "count")])
        owners = owners.filter(pc.greater(owners["row_count"], 1))
        if owners.num_rows:
            clashes = keyed.join(owners, "stem").filter(pc.not_equal(pc.field("row"), pc.field("row_min")))
            for row, owner in zip(clashes["row"].to_pylist(), clashes["row_min"].to_pylist()):
                row_id, key = ids[row].as_py(), object_key(ids[row].as_py(), fmt)
                index.errors[row] = (f"id={row_id!r}: maps to object key {key!r} like the id "
                                     f"{ids[owner].as_py()!r} of row {owner} (rule: ids must map to distinct objects)")
        return index


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
            error = _joined([self.ids.errors.get(positions[i]), (errors or {}).get(i),
                             images[i] if isinstance(images[i], str) else None,
                             _text_error("prompt", prompts[i], self.spec, True, self._tokens.get(prompts[i], 0)),
                             _param_error(candidate, self.spec),
                             # The model's own default passes as it is (text-to-image's is empty); a given one
                             # must be usable text.
                             _text_error("negative_prompt", effective[i], self.spec, False,
                                         self._tokens.get(effective[i], 0))
                             if effective[i] is not None and effective[i] != self.spec.negative_prompt(None, 2.0)
                             else None])
            tokens = None
            if error is None and self.with_image_tokens:
                error, tokens = _image_text_tokens(self.spec, prompts[i], effective[i], images[i].size)
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
            problem = _source_error(source, d.fps)
            if problem is None:
                try:
                    candidate["height"], candidate["width"] = upscaled_size(
                        source["source_height"], source["source_width"], scale, self.spec.tile_sizes,
                        self.spec.spatial_multiple)
                except ValueError as exc:
                    problem = str(exc)
                problem = problem or _param_error(candidate, self.spec)
            error = _joined([self.ids.errors.get(position), problem])
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

