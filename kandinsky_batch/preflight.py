"""Everything a job checks before Ray starts, in one place: config, dataset, model limits, options, ids, resume.

`run` calls `preflight` first; whatever it refuses costs no GPU and no actor. It reads only Parquet footers,
the id column and the manifest, so it takes seconds at any dataset size. A sweep over models is checked model
by model: each gets its limits, options, gang shapes, validator and resume view (a `Lane`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kandinsky_batch.config import ClusterConfig, ConfigError, JobConfig, ModelConfig
from kandinsky_batch.dataset import Dataset, limited
from kandinsky_batch.images import ImageReader
from kandinsky_batch.intake import committed_tasks
from kandinsky_batch.options import effective_options
from kandinsky_batch.record import Stamp
from kandinsky_batch.resume import OutputState, check_conflicts
from kandinsky_batch.routing import check_shapes
from kandinsky_batch.rows import IdIndex, RowValidator
from kandinsky_batch.storage import Storage
from kandinsky_batch.sweep import ModelVariant, Sweep
from kandinsky_batch.upscale import SourceManifest, is_job_output
from kandinsky_batch.video import IMAGE_FORMATS
from pipelines import ModelSpec, load_spec
from pipelines.kinds import BY_NAME, IMAGE, NO_IMAGE, VIDEO_AUDIO, Kind

SOUND_FPS = 24  # Kandinsky 6 denoises sound and frames together for 24 fps (pipelines.render_k6.FRAME_RATE)


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


def preflight(cfg: JobConfig, force: bool = False) -> Checked:
    """Refuse a job that cannot run as asked (ConfigError, InputError, ResumeConflict), naming key and value."""
    # 1. The dataset as a whole: files, columns and types, row count (footers only); the sweep against it. Another
    # job's output (an upscale's input) is read through its manifest.
    upscale = is_job_output(cfg.input.path, cfg.input.storage_options)
    dataset = limited((SourceManifest if upscale else Dataset)(cfg.input.path, cfg.input.storage_options),
                      cfg.input.limit)
    sweep = Sweep.parse(cfg)
    # 2. Ids over the whole dataset (exact duplicates and shared object keys) from the id column alone.
    id_column = dataset.column("id") if "id" in dataset.schema.names else None
    ids = IdIndex.build(id_column, dataset.num_rows, cfg.output.format)
    storage = Storage(cfg.output.uri, cfg.output.storage_options, retries=cfg.output.retries,
                      backoff=cfg.output.retry_backoff)
    outputs = None
    lanes = []
    for variant in sweep.models:
        # 3. Each model's limits and the options it will really run with; gang shapes it can take.
        spec = load_spec(variant.model.path, variant.model.storage_options)
        options, spec = effective_options(variant.model, spec)
        check_shapes(variant.cluster, spec, options)
        kind = BY_NAME[spec.kind]
        check_upscale(kind, upscale, sweep, cfg.input.path, variant.model.path)
        check_format(cfg.output.format, kind, variant.model.path)
        if kind.output == VIDEO_AUDIO and variant.render.fps != SOUND_FPS:
            raise ConfigError(f"render.fps={variant.render.fps}: {variant.model.path} renders its sound for "
                              f"{SOUND_FPS} fps video (rule: render.fps={SOUND_FPS})")
        stamp = Stamp(model=variant.model.path, format=cfg.output.format, fps=variant.render.fps, options=options,
                      sound=dataset.sound if kind.upscales else kind.output == VIDEO_AUDIO and options.sample_audio)
        # 4. What the output prefix holds (read once): rows committed with other parameters are refused unless forced.
        outputs = outputs.with_stamp(stamp) if outputs else OutputState(storage, stamp, force=force)
        images = ImageReader(cfg.input.path, cfg.input.storage_options) if kind.image != NO_IMAGE else None
        validator = RowValidator(replace(cfg, render=variant.render), spec, ids, images)
        lanes.append(Lane(variant, spec, stamp, validator, outputs))
    for lane in lanes:
        check_conflicts(lane.state, committed_tasks(dataset, lane, sweep, cfg.render.seed), cfg.output.uri)
    return Checked(dataset, storage, sweep, lanes)
