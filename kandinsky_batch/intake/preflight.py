"""Everything a job checks before Ray starts, in one place: config, dataset, model limits, options, ids, resume.

`run` calls `preflight` first; whatever it refuses costs no GPU and no actor. It reads only Parquet footers,
the id column and the manifest, so it takes seconds at any dataset size. A sweep over models is checked model
by model: each gets its limits, options, gang shapes, validator and resume view (a `Lane`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import fsspec
import pyarrow as pa

from kandinsky_batch.config.schema import ClusterConfig, ConfigError, JobConfig, ModelConfig
from kandinsky_batch.intake.dataset import COLUMNS as INPUT_COLUMNS
from kandinsky_batch.intake.dataset import Dataset, InputError, _reason, limited
from kandinsky_batch.output.manifest import SCHEMA, job_schema
from kandinsky_batch.intake.images import ImageReader
from kandinsky_batch.intake.windows import committed_tasks
from kandinsky_batch.config.options import effective_options
from kandinsky_batch.output.record import Stamp
from kandinsky_batch.intake.resume import OutputState, check_conflicts
from kandinsky_batch.intake.routing import check_shapes
from kandinsky_batch.intake.ids import IdIndex
from kandinsky_batch.intake.rows import RowValidator
from kandinsky_batch.intake.rules import PARAMS, param_problems
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import IMAGES_DIR, VIDEOS_DIR
from kandinsky_batch.config.sweep import ModelVariant, Sweep
from kandinsky_batch.intake.job_output import SourceManifest, is_job_output
from kandinsky_batch.output.video import IMAGE_FORMATS
from pipelines import ModelSpec, load_spec
from pipelines.kinds import BY_NAME, IMAGE, IMAGE_REQUIRED, NO_IMAGE, SIMULATED, SIMULATED_KIND, VIDEO_AUDIO, Kind
from pipelines.resolve import ModelNotFound, pinned, preset

SOUND_FPS = 24  # Kandinsky 6 denoises sound and frames together for 24 fps (pipelines.limits_k6.FRAME_RATE)
# The storage probe's bounds on S3: an endpoint that does not answer is refused in seconds, not after the full
# retry budget the job itself gets (botocore's and s3fs's retries on every call).
PROBE_S3_CONFIG = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1, "mode": "standard"}}


@dataclass
class Lane:
    """One model of the job (the only one, or one value of a sweep's `model` axis) and what it renders with."""

    variant: ModelVariant
    spec: ModelSpec
    stamp: Stamp
    validator: RowValidator
    state: OutputState

    @property
    def label(self) -> str:
        return self.variant.label

    @property
    def model(self) -> ModelConfig:
        return self.variant.model

    @property
    def cluster(self) -> ClusterConfig:
        return self.variant.cluster


@dataclass
class Checked:
    """What preflight established: the job can start, and with what."""

    dataset: Dataset
    storage: Storage
    sweep: Sweep
    lanes: list[Lane]
    manifest_schema: pa.Schema = SCHEMA
    """The job's manifest schema: the manifest's columns, then the input columns carried through."""

    # The single model's view (a job without a model axis has one lane).
    @property
    def spec(self) -> ModelSpec:
        return self.lanes[0].spec

    @property
    def stamp(self) -> Stamp:
        return self.lanes[0].stamp

    @property
    def validator(self) -> RowValidator:
        return self.lanes[0].validator

    @property
    def state(self) -> OutputState:
        return self.lanes[0].state


def check_format(fmt: str, kind: Kind, model: str) -> None:
    """Images are written as images, videos as videos (`output.format`)."""
    allowed = (*IMAGE_FORMATS, "npy") if kind.output == IMAGE else ("mp4", "npy")
    if fmt not in allowed:
        raise ConfigError(f"output.format={fmt!r}: {model} is a {kind.name} model and renders "
                          f"{'images' if kind.output == IMAGE else 'video'} (formats: {', '.join(allowed)})")


def check_latents(latents: bool, kind: Kind, model: str) -> None:
    """`output.latents` needs a model whose render is one latent from a prompt (Kandinsky 5's kinds)."""
    entry = SIMULATED_KIND if model.startswith(SIMULATED) else kind
    if latents and entry.no_latents is not None:
        raise ConfigError(f"output.latents=True: {model} is {entry.title} ({entry.name}): {entry.no_latents}")


def check_revision(model: ModelConfig) -> None:
    """`model.revision` pins a hub snapshot: a preset, a local directory or an object-store copy has none."""
    if model.revision is None:
        return
    if not model.revision.strip() or "@" in model.revision:
        raise ConfigError(f"model.revision={model.revision!r}: must be a hub commit, branch or tag")
    if preset(model.path) is not None or "://" in model.path or os.path.isdir(model.path):
        raise ConfigError(f"model.revision={model.revision!r}: model.path={model.path!r} is not a hub id "
                          "(only a hub checkpoint has revisions)")


def check_upscale(kind: Kind, upscale: bool, sweep: Sweep, path: str, model: str) -> None:
    """An sr model upscales one finished job's output, and only an sr model takes a job's output as input."""
    if kind.upscales and not upscale:
        raise ConfigError(f"input.path={path!r}: {model} is an sr model: it upscales another job's videos, so "
                          "input.path must be that job's output.uri (a prefix with manifest/ and _SUCCESS)")
    if upscale and not kind.upscales:
        raise ConfigError(f"input.path={path!r} is a job's output (it holds manifest/): only an sr model takes "
                          f"one as input, and {model} is a {kind.name} model (for prompts, point input.path at a "
                          "Parquet dataset)")
    if kind.upscales and sweep.active:
        raise ConfigError(f"sweep: {model} is an sr model; an upscale renders each source clip once "
                          "(sweeps are for generation models)")


def carried_columns(schema: pa.Schema) -> tuple[dict[str, str], pa.Schema]:
    """The input columns the job does not read, which go through to the manifest unchanged: input name -> manifest
    name (`input_NAME` where the name is a manifest column's), and their manifest fields with the input's types."""
    names, fields = {}, []
    for f in schema:
        if f.name in INPUT_COLUMNS or f.name == "sweep":  # an input's `sweep` is not the manifest's (cells.expand)
            continue
        names[f.name] = f"input_{f.name}" if f.name in SCHEMA.names else f.name
        fields.append(pa.field(names[f.name], f.type))
    taken = [f.name for f in fields if f.name in SCHEMA.names or [g.name for g in fields].count(f.name) > 1]
    if taken:
        raise InputError(f"input column {taken[0]!r}: its manifest name is taken (rename the column)")
    return names, pa.schema(fields)
def probe_storage(key: str, uri: str, storage_options: dict | None, error: type[Exception]) -> None:
    """One listing of an object-store prefix, with short timeouts: missing credentials, a bucket that does not
    exist or an endpoint that does not answer are refused in one line (`key=uri: reason`) before anything waits on
    them. Local paths need no probe; a prefix that does not exist yet is fine (its bucket must)."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        return
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = {**options.get("config_kwargs", {}), **PROBE_S3_CONFIG}
    where = f"{key}={uri!r}"
    try:
        fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **options)
    except Exception as exc:  # noqa: BLE001 - unknown protocol, missing backend, bad options
        raise error(f"{where}: cannot open ({_reason(exc, storage_options)})") from None
    bucket = root.split("/", 1)[0]
    try:
        try:
            fs.ls(root)
        except FileNotFoundError:  # a new prefix, or no bucket at all
            fs.info(bucket)
    except FileNotFoundError:
        raise error(f"{where}: bucket {bucket!r} does not exist (or these credentials cannot see it)") from None
    except Exception as exc:  # noqa: BLE001 - credentials, permissions, network: said in one line, secrets blanked
        raise error(f"{where}: cannot list ({_reason(exc, storage_options)})") from None


def check_image_column(kind: Kind, columns: list[str], path: str) -> None:
    """Image-conditioned models that need an image (i2v, i2i) refuse a dataset without an `image` column."""
    if kind.image == IMAGE_REQUIRED and "image" not in columns:
        raise InputError(f"input.path={path!r}: required column 'image' is missing: the {kind.name} model renders "
                         "from a conditioning image")


def check_defaults(validator: RowValidator, columns: list[str], sweep: Sweep, label: str | None = None) -> None:
    """Refuse a `render.*` default that every row takes (no dataset column, no sweep axis sets it) and the model
    cannot render, with the rule the row validator would give each row."""
    fixed = {key for key in PARAMS if key not in columns and key not in sweep.axes}
    defaults = {key: getattr(validator.defaults, key) for key in PARAMS} | {"seed": 0}
    for keys, message in param_problems(defaults, validator.spec):
        if set(keys) <= fixed:
            missing = " and ".join(f"no {key!r} column" for key in keys)
            model = f"sweep model {label!r}: " if label else ""
            raise ConfigError(f"{model}render.{message}; every row would take it (the dataset has {missing} and no "
                              "sweep axis sets it)")


def preflight(cfg: JobConfig, force: bool = False) -> Checked:
    """Refuse a job that cannot run as asked (ConfigError, InputError, ResumeConflict), naming key and value."""
    # 1. The dataset as a whole: files, columns and types, row count (footers only); the sweep against it. Another
    # job's output (an upscale's input) is read through its manifest. Object stores are probed first, briefly.
    probe_storage("input.path", cfg.input.path, cfg.input.storage_options, InputError)
    probe_storage("output.uri", cfg.output.uri, cfg.output.storage_options, ConfigError)
    upscale = is_job_output(cfg.input.path, cfg.input.storage_options)
    dataset = limited((SourceManifest if upscale else Dataset)(cfg.input.path, cfg.input.storage_options),
                      cfg.input.limit)
    sweep = Sweep.parse(cfg)
    # 2. Ids over the whole dataset (exact duplicates and shared object keys) from the id column alone.
    id_column = dataset.column("id") if "id" in dataset.schema.names else None
    ids = IdIndex.build(id_column, dataset.num_rows, cfg.output.format)
    storage = Storage(cfg.output.uri, cfg.output.storage_options, retries=cfg.output.retries,
                      backoff=cfg.output.retry_backoff)
    # The input's unread columns go through to the manifest (an upscale's: those its source job carried).
    carried, carried_schema = (({name: name for name in dataset.carried.names}, dataset.carried) if upscale
                               else carried_columns(dataset.schema))
    outputs = None
    lanes = []
    for variant in sweep.models:
        # 3. Each model's limits and the options it will really run with; gang shapes it can take.
        check_revision(variant.model)
        try:
            spec = load_spec(pinned(variant.model.path, variant.model.revision), variant.model.storage_options)
        except ModelNotFound as exc:
            raise ModelNotFound(f"sweep model {variant.label!r}: {exc}" if sweep.swept_models else str(exc)) from None
        options, spec = effective_options(variant.model, spec)
        check_shapes(variant.cluster, spec, options)
        kind = BY_NAME[spec.kind]
        check_upscale(kind, upscale, sweep, cfg.input.path, variant.model.path)
        check_format(cfg.output.format, kind, variant.model.path)
        check_latents(cfg.output.latents, kind, variant.model.path)
        if not upscale:
            check_image_column(kind, dataset.schema.names, cfg.input.path)
        fps = variant.render.written_fps(kind.upscales)
        if kind.output == VIDEO_AUDIO and fps != SOUND_FPS:
            raise ConfigError(f"render.fps={fps}: {variant.model.path} renders its sound for "
                              f"{SOUND_FPS} fps video (rule: render.fps={SOUND_FPS})")
        stamp = Stamp(model=variant.model.path, format=cfg.output.format, fps=fps, options=options,
                      sound=dataset.sound if kind.upscales else kind.output == VIDEO_AUDIO and options.sample_audio,
                      folder=IMAGES_DIR if kind.output == IMAGE else VIDEOS_DIR, revision=variant.model.revision,
                      latents=cfg.output.latents)
        # 4. What the output prefix holds (read once): rows committed with other parameters are refused unless forced.
        outputs = outputs.with_stamp(stamp) if outputs else OutputState(storage, stamp, force=force, positional=id_column is None)
        images = ImageReader(cfg.input.path, cfg.input.storage_options) if kind.image != NO_IMAGE else None
        validator = RowValidator(replace(cfg, render=variant.render), spec, ids, images, carried)
        if not kind.upscales:  # an upscale's sizes and frames are its sources'
            check_defaults(validator, dataset.schema.names, sweep, variant.label if sweep.swept_models else None)
        lanes.append(Lane(variant, spec, stamp, validator, outputs))
    for lane in lanes:
        check_conflicts(lane.state, committed_tasks(dataset, lane, sweep, cfg.render.seed))
    return Checked(dataset, storage, sweep, lanes, job_schema(carried_schema))
