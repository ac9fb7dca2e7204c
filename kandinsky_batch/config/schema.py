"""The job config's typed schema: one dataclass per section, each value checked in `__post_init__`.

Unknown keys, wrong types and bad values fail here, before Ray starts, naming the key and the value
(`kandinsky_batch.config.load` merges YAML and overrides into it; the sweep block is checked there).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from kandinsky_batch.errors import ConfigError
from pipelines.request import ATTENTION_TYPES, CACHES, NABLA_ARGS, RenderOptions  # torch-free, like pipelines.shape
from pipelines.scoring.registry import METRICS  # definitions only: scorers are imported where replicas load them
from pipelines.shape import ParallelSpec

FORMATS = ("mp4", "npy", "png", "webp", "jpeg")
MAX_SEED = 2**63 - 1  # seeds live in an int64 manifest column
DEFAULT_FPS = 24  # what the Kandinsky checkpoints render for
INPROCESS = "inprocess"  # cluster.address: replicas as threads of the driver's process (kandinsky_batch.fleet.inprocess)
DEVICES = ("auto", "gpu", "cpu")  # cluster.device


def derive_seed(job_seed: int, row_id: str) -> int:
    """A row's seed from the job seed and its id alone (never its position or batch), in [0, 2**63)."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


@dataclass
class InputConfig:
    path: str = MISSING
    """Parquet file or directory of Parquet files, at any fsspec URI."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options (credentials, endpoint) for `path`; never written anywhere."""
    limit: Optional[int] = None
    """Only the first N rows of the dataset (a smoke run): ids, validation, resume and the manifest see N rows."""

    def __post_init__(self) -> None:
        _require(bool(str(self.path).strip()), "input.path", self.path, "must name a Parquet file or directory")
        if self.limit is not None:
            _require(self.limit >= 1, "input.limit", self.limit, "must be >= 1 (or null: every row)")


@dataclass
class OutputConfig:
    uri: str = MISSING
    """Output prefix: videos under `{uri}/videos/`, the manifest under `{uri}/manifest/`."""
    format: str = "mp4"
    """Video: `mp4` (H.264; with AAC sound for Kandinsky 6) or `npy` (raw uint8 frames, lossless; with the waveform
    in an `.npz` for Kandinsky 6). Images (text-to-image): `png` (lossless), `webp`, `jpeg` or `npy`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for `uri`; never written anywhere."""
    retries: int = 5
    """Tries of a storage operation on transient errors before the job stops (progress kept)."""
    retry_backoff: float = 0.5
    """First backoff in seconds between tries; doubles each time (capped at 8 s), with jitter."""
    latents: bool = False
    """Also commit each row's final latents and prompt embeddings to `{uri}/latents/{stem}.safetensors` (Kandinsky 5
    kinds only; docs/family.md#latents): what distillation and fine-tuning read. Part of what a committed row is."""
    lease_ttl: float = 30.0
    """Seconds without a heartbeat after which a job's lease on `uri` is stale: a `run` that died is taken over
    after this long, and a holder that cannot renew for this long stops committing (`output/lease.py`)."""

    def __post_init__(self) -> None:
        _require(bool(str(self.uri).strip()), "output.uri", self.uri, "must name an output prefix")
        _require(isinstance(self.latents, bool), "output.latents", self.latents, "must be true or false")
        _require(self.retries >= 1, "output.retries", self.retries, "must be >= 1")
        _require(self.retry_backoff >= 0, "output.retry_backoff", self.retry_backoff, "must be >= 0")
        _require(isinstance(self.lease_ttl, (int, float)) and self.lease_ttl >= 3, "output.lease_ttl", self.lease_ttl,
                 "must be >= 3 seconds (object stores keep whole-second modification times)")
        _require(self.format in FORMATS, "output.format", self.format, f"must be one of {', '.join(FORMATS)}")


@dataclass
class ModelConfig:
    path: str = "tiny"
    """`tiny` (random weights, built offline), a hub id, a local diffusers dir, or an fsspec URI of one."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options when `path` is an object-store URI."""
    revision: Optional[str] = None
    """A hub id's snapshot to load (a commit, branch or tag); recorded in the manifest's `model_revision`."""
    attention_backend: Optional[str] = None
    """diffusers attention backend (`native`, `_native_cudnn`, `flash`, `sage`, `flex`, ...); None: diffusers' default."""
    compile: bool = False
    """Regional torch.compile of the repeated transformer blocks."""
    batched_guidance: bool = False
    """Cond and uncond in one forward when their text lengths match (same math, within ±1 uint8 level)."""
    offload_text_encoder: bool = False
    """Keep the text encoders on the CPU between encodings (memory for Pro / 10 s clips)."""
    cache: Optional[str] = None
    """Step caching, APPROXIMATE: `magcache` (calibrated ratios shipped for the Lite/Pro sft and nocfg
    checkpoints), `firstblock` (FirstBlockCache) or `taylorseer`."""
    cache_args: dict[str, Any] = field(default_factory=dict)
    """Arguments of the diffusers cache config (MagCacheConfig / FirstBlockCacheConfig / TaylorSeerCacheConfig)."""
    attention_type: Optional[str] = None
    """`nabla` (block-sparse, APPROXIMATE; flex backend; 128-px sizes) or `regular`; None: the checkpoint's own."""
    nabla_args: dict[str, Any] = field(default_factory=dict)
    """NABLA overrides: `P` (attention mass kept per head, in (0, 1]), `wT`/`wH`/`wW` (odd STA window sizes)."""
    sample_audio: bool = True
    """Kandinsky 6 only: false renders video without sound (the pipeline's video-only mode: other frames)."""
    expand_prompts: bool = False
    """Kandinsky 6 only: rewrite each prompt with the text encoder (up to 1024 generated tokens a row, seeded from the
    row's seed) and render the rewrite; the manifest records it in `expanded_prompt`."""
    resolution_scale: Optional[float] = None
    """Kandinsky 6 SR only: the output is 2, 2.25 or 4 times the source's size; null: the pipeline's 2.25."""

    def __post_init__(self) -> None:
        if self.cache is not None:
            _require(self.cache in CACHES, "model.cache", self.cache, f"must be one of {', '.join(CACHES)} or null")
        elif self.cache_args:
            _require(False, "model.cache_args", dict(self.cache_args), "needs model.cache to be set")
        if self.attention_type is not None:
            _require(self.attention_type in ATTENTION_TYPES, "model.attention_type", self.attention_type,
                     f"must be one of {', '.join(ATTENTION_TYPES)} or null")
        if self.resolution_scale is not None:
            _require(self.resolution_scale in (2, 2.25, 4), "model.resolution_scale", self.resolution_scale,
                     "must be 2, 2.25 or 4 (Kandinsky6SRPipeline's scales)")
        for key, value in dict(self.nabla_args).items():
            _require(key in NABLA_ARGS, "model.nabla_args", key, f"unknown key (known: {', '.join(NABLA_ARGS)})")
            if key == "P":
                ok = isinstance(value, (int, float)) and 0 < value <= 1
                _require(ok, "model.nabla_args.P", value, "must be in (0, 1]")
            else:
                ok = isinstance(value, int) and value >= 1 and value % 2 == 1
                _require(ok, f"model.nabla_args.{key}", value, "must be an odd positive integer")

    def options(self) -> RenderOptions:
        """The renderer options these keys describe (before the checkpoint's own attention is known)."""
        return RenderOptions(attention_backend=self.attention_backend, compile=self.compile,
                             batched_guidance=self.batched_guidance, offload_text_encoder=self.offload_text_encoder,
                             cache=self.cache, cache_args=tuple(sorted(dict(self.cache_args).items())),
                             attention_type=self.attention_type,
                             nabla_args=tuple(sorted(dict(self.nabla_args).items())), sample_audio=self.sample_audio,
                             expand_prompts=self.expand_prompts, resolution_scale=self.resolution_scale)


@dataclass
class RenderConfig:
    """Defaults for every row; a row's own non-null column overrides them."""

    height: int = 512
    width: int = 768
    num_frames: int = 121
    """Must be 4k+1 (the VAE compresses time 4x)."""
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    """Classifier-free guidance; <= 1 turns it off (one transformer call per step)."""
    negative_prompt: Optional[str] = None
    """None: the pipeline's own default negative prompt (recorded in the manifest)."""
    fps: Optional[int] = None
    """Frame rate written into the video; None: 24 for generation, each clip's source's for an upscale (sr)."""
    seed: int = 0
    """Job seed: a row without `seed` gets one derived from this and its id."""
    batch_size: int = 1
    """Rows rendered in one batched forward when they share size, frames, steps, guidance and text lengths
    (e.g. a seed sweep); each keeps its own seed. 1 is bit-exact; larger batches stay within ±1 uint8 level."""

    def __post_init__(self) -> None:
        for key in ("height", "width", "num_frames", "num_inference_steps", "fps"):
            value = getattr(self, key)
            _require((value is None and key == "fps") or value > 0, f"render.{key}", value,
                     "must be a positive integer")
        _require((self.num_frames - 1) % 4 == 0, "render.num_frames", self.num_frames, "must be 4k+1 (1, 5, ..., 121)")
        _require(self.num_inference_steps <= 1000, "render.num_inference_steps", self.num_inference_steps,
                 "must be at most 1000")
        _require(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, "render.guidance_scale",
                 self.guidance_scale, "must be a finite number >= 0")
        _require(self.fps is None or self.fps <= 240, "render.fps", self.fps, "must be at most 240")
        _require(0 <= self.seed <= MAX_SEED, "render.seed", self.seed, f"must be in [0, {MAX_SEED}]")
        _require(1 <= self.batch_size <= 64, "render.batch_size", self.batch_size, "must be in [1, 64]")

    def written_fps(self, upscales: bool) -> int | None:
        """The frame rate a job writes, resolved here only: `fps` if set, else 24, or None for an upscale (each clip
        at its source's)."""
        if self.fps is not None:
            return self.fps
        return None if upscales else DEFAULT_FPS


def _check_shape(prefix: str, sequence_parallel: int, ring_degree: int) -> None:
    _require(sequence_parallel >= 1, f"{prefix}sequence_parallel", sequence_parallel, "must be >= 1")
    _require(ring_degree >= 1, f"{prefix}ring_degree", ring_degree, "must be >= 1")
    _require(sequence_parallel % ring_degree == 0, f"{prefix}ring_degree", ring_degree,
             f"must divide {prefix}sequence_parallel={sequence_parallel} (Ulysses degree x ring degree)")


@dataclass
class ReplicaGroup:
    """Same-shaped replicas for part of a mixed fleet (e.g. single-GPU for 5 s rows, SP-4 gangs for 10 s)."""

    name: str = MISSING
    replicas: Optional[int] = None
    """Replicas in this group. None: as many as the cluster's GPUs allow after the other groups (1 on CPU)."""
    sequence_parallel: int = 1
    ring_degree: int = 1
    cfg_parallel: bool = False
    max_tokens: Optional[int] = None
    """Largest row (visual tokens: latent frames x height/16 x width/16) routed here; None: no limit.
    A row goes to the group with the smallest max_tokens that holds it (5 s 768x512 = 47,616; 10 s = 93,696)."""

    def parallel(self) -> ParallelSpec:
        """This group's gang shape: Ulysses x ring ranks per branch, x2 with CFG parallel."""
        return ParallelSpec(ulysses=self.sequence_parallel // self.ring_degree, ring=self.ring_degree,
                            cfg=self.cfg_parallel)


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    """Ray address to join (`auto` inside `ray job submit`); None starts a local Ray on loopback; `inprocess`
    runs the replicas as threads of this process, without Ray (tests and debugging; no gangs)."""
    replicas: Optional[int] = None
    """Model replicas: on a GPU cluster a cap, the fleet following the GPUs of the nodes alive. None: one per GPU
    (per gang of GPUs) in the cluster, or 1 on a host without GPUs."""
    max_attempts: int = 3
    """Times a row is tried (replica deaths and render errors) before it is recorded as failed."""
    no_replica_timeout: float = 900.0
    """Seconds the job waits with rows left while no replica is ready (none placed yet, models loading, or
    every node lost) before it stops with exit 3, progress kept. Replicas follow the cluster's GPUs meanwhile."""
    num_cpus: Optional[int] = None
    """CPUs for a local Ray (None: enough for every rank, at least the host's count)."""
    sequence_parallel: int = 1
    """Ranks (GPUs) one replica's transformer is split across by sequence (Ulysses x ring); must divide the heads."""
    ring_degree: int = 1
    """Part of `sequence_parallel` done as ring attention (needs a GPU attention backend that returns LSE)."""
    cfg_parallel: bool = False
    """Run the cond and uncond branches of guidance on two ranks at once (doubles the ranks per replica)."""
    groups: list[ReplicaGroup] = field(default_factory=list)
    """Several replica groups instead of one uniform fleet; rows are routed by their size (`max_tokens`)."""
    device: str = "auto"
    """What a rank takes on Ray: `gpu` a GPU even while the cluster has none (a GPU pool an autoscaler grows from
    zero: the job asks for GPUs and waits), `cpu` a share of the CPUs, `auto` a GPU if the cluster has any at start."""

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, "cluster.device", self.device, f"must be one of {', '.join(DEVICES)}")
        if self.replicas is not None:
            _require(self.replicas >= 1, "cluster.replicas", self.replicas, "must be >= 1")
        _require(self.max_attempts >= 1, "cluster.max_attempts", self.max_attempts, "must be >= 1")
        _require(self.no_replica_timeout > 0, "cluster.no_replica_timeout", self.no_replica_timeout, "must be > 0")
        if self.num_cpus is not None:
            _require(self.num_cpus >= 1, "cluster.num_cpus", self.num_cpus, "must be >= 1")
        _check_shape("cluster.", self.sequence_parallel, self.ring_degree)
        names = [g.name for g in self.groups]
        for i, group in enumerate(self.groups):
            prefix = f"cluster.groups[{i}]."
            _require(bool(group.name.strip()) and names.count(group.name) == 1, f"{prefix}name", group.name,
                     "must be non-empty and unique")
            _check_shape(prefix, group.sequence_parallel, group.ring_degree)
            if group.replicas is not None:
                _require(group.replicas >= 1, f"{prefix}replicas", group.replicas, "must be >= 1")
            if group.max_tokens is not None:
                _require(group.max_tokens >= 1, f"{prefix}max_tokens", group.max_tokens, "must be >= 1")
        if self.address == INPROCESS:
            for group in self.replica_groups():
                _require(group.parallel().world_size == 1, "cluster.address", self.address,
                         f"runs one rank per replica, but group {group.name!r} is a gang of "
                         f"{group.parallel().world_size} ({group.parallel().name}): gangs need Ray")
        if self.groups:
            uniform = (self.replicas, self.sequence_parallel, self.ring_degree, self.cfg_parallel)
            _require(uniform == (None, 1, 1, False), "cluster.groups", names,
                     "set replicas/sequence_parallel/ring_degree/cfg_parallel per group, not also for the cluster")

    def replica_groups(self) -> list[ReplicaGroup]:
        """The fleet as groups: the declared ones, or one uniform `default` group."""
        if self.groups:
            return list(self.groups)
        return [ReplicaGroup(name="default", replicas=self.replicas, sequence_parallel=self.sequence_parallel,
                             ring_degree=self.ring_degree, cfg_parallel=self.cfg_parallel)]


@dataclass
class ScoreConfig:
    """Scores of videos (`docs/scores.md`): a stage over `source`, or fused into a render job by `metrics` alone."""

    metrics: list[str] = field(default_factory=list)
    """Metric names (`pipelines/scoring/registry.py`). A render job naming some scores each video on its replica
    right after it is committed; a scoring job (`source`) without any scores every metric that needs no weights."""
    weights: dict[str, str] = field(default_factory=dict)
    """Metric -> weights (a hub id, local dir or object-store URI) instead of the metric's default."""
    out: Optional[str] = None
    """The scores table; None: `{source}/scores` for a job output scored, `{output.uri}/scores` for a render job.
    Needed for a Parquet dataset of videos (its folder is input, not a place to write)."""
    source: Optional[str] = None
    """Set: this job renders nothing and scores `source`: a finished job's output, or a Parquet dataset with a
    `video` column (URIs or paths relative to the dataset) and optional `prompt` and `id` columns."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for `source`, its videos and `out`; never written anywhere."""

    def __post_init__(self) -> None:
        known = ", ".join(sorted(METRICS))
        for name in self.metrics:
            _require(name in METRICS, "score.metrics", name, f"unknown metric (known: {known})")
            _require(self.metrics.count(name) == 1, "score.metrics", name, "named twice")
        for name in dict(self.weights):
            _require(name in METRICS, "score.weights", name, f"unknown metric (known: {known})")
        if self.source is not None:
            _require(bool(str(self.source).strip()), "score.source", self.source, "must name an output or a dataset")

    def names(self) -> list[str]:
        """The metrics scored: those named, or for a scoring job naming none every metric needing no weights."""
        if self.metrics or self.source is None:
            return list(self.metrics)
        return sorted(name for name, entry in METRICS.items() if entry.weights is None)


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    sweep: dict[str, Any] = field(default_factory=dict)
    """Evaluation sweep: named axes (`model`, render parameters, `seeds`), each a list of values; every input row
    is rendered once per combination (see `kandinsky_batch/config/sweep.py`)."""
