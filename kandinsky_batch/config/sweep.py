"""Evaluation sweeps: the `sweep:` block of a job config parsed into model variants and the grid of cells.

A sweep names axes, each a list of values; the job renders every input row x every combination:

    sweep:
      model: [kandinskylab/...-sft-5s-Diffusers, {name: sft-magcache, path: ..., cache: magcache},
              {name: distilled, path: ..., render: {num_inference_steps: 16, guidance_scale: 1.0}}]
      num_inference_steps: [16, 50]
      seeds: 4                      # or an explicit list [0, 1, 2, 3]

A cell's id is the input row's id and its axis values (`p7__sft-magcache__steps-16__seed-2`): readable, safe for
object keys, and the same whatever other values an axis holds, so adding a value renders only the new cells. Its
axis values are recorded as JSON in the manifest's `sweep` column. Axis values fill the render parameters where
the row's own column is null (a row's column still overrides); a model value may carry its own `render` defaults
(where no axis sets the parameter) and its replicas' gang shape (`cluster`). The seed of seed k is the one the row gets
with `render.seed + k`, so seed 0 of a row is the seed it gets without a sweep. The intake expands each input
row into its cells (`intake/cells.py`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, fields, replace
import pyarrow as pa

from kandinsky_batch.config.schema import MAX_SEED, ClusterConfig, ConfigError, JobConfig, ModelConfig, RenderConfig

# The render axes, in the order their parts appear in a cell id, with the id prefix and Arrow type of each.
RENDER_AXES = {
    "num_inference_steps": ("steps", pa.int64()),
    "guidance_scale": ("cfg", pa.float64()),
    "negative_prompt": ("neg", pa.string()),
    "height": ("h", pa.int64()),
    "width": ("w", pa.int64()),
    "num_frames": ("f", pa.int64()),
}
AXES = ("model", *RENDER_AXES, "seeds")
SHAPE_KEYS = ("sequence_parallel", "ring_degree", "cfg_parallel")
MAX_CELLS = 10_000
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
SEP = "__"


@dataclass(frozen=True)
class ModelVariant:
    """One value of the `model` axis: a label, the `model.*` keys it renders with and its replicas' gang shape."""

    label: str
    model: ModelConfig
    cluster: ClusterConfig
    render: RenderConfig
    """The job's `render.*` defaults with this model's own (a distilled checkpoint's 16 steps, guidance 1)."""


@dataclass(frozen=True)
class Cell:
    """One combination of the render axes and a seed (the model is applied per variant)."""

    render: dict = field(default_factory=dict)
    seed: tuple | None = None
    """None (the row's own seed), ("count", k): the seed of `render.seed + k`, or ("value", s)."""
    parts: tuple = ()
    """Id parts in axis order, without the model's."""
    values: dict = field(default_factory=dict)
    """Axis values recorded in the manifest's `sweep` column, without the model's."""
    seed_index: int | None = None
    """Which value of the seeds axis the cell takes (the manifest's `sweep_seed_index`), None without one."""


def _part(axis: str, value) -> str:
    prefix, _ = RENDER_AXES[axis]
    if axis == "negative_prompt":
        text = "default" if value is None else hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{prefix}-{text}"
    return f"{prefix}-{value!r}" if isinstance(value, float) else f"{prefix}-{value}"


def _label(path: str) -> str:
    """A readable label from a model path: its last component, made key-safe."""
    tail = path.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.-]+", "-", tail).strip("-.")[:64] or "model"


def _check_render_value(axis: str, index: int, value) -> None:
    key = f"sweep.{axis}[{index}]"
    if axis == "negative_prompt":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: must be a string or null (the pipeline's default)")
        return
    if axis == "guidance_scale":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        if not ok:
            raise ConfigError(f"{key}={value!r}: must be a finite number >= 0")
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")


def _values(sweep: dict, axis: str) -> list:
    values = sweep[axis]
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"sweep.{axis}={values!r}: must be a non-empty list of values")
    if len(values) != len({json.dumps(v, sort_keys=True) for v in values}):
        raise ConfigError(f"sweep.{axis}={values!r}: lists a value twice")
    return list(values)


def _models(cfg: JobConfig, values: list) -> list[ModelVariant]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    known = {f.name for f in fields(ModelConfig)}
    variants = []
    for index, value in enumerate(values):
        key = f"sweep.model[{index}]"
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict) or not value.get("path"):
            raise ConfigError(f"{key}={value!r}: must be a model path or a mapping of model.* keys with a `path`")
        extra = set(value) - known - {"name", "cluster", "render"}
        if extra:
            raise ConfigError(f"{key}.{sorted(extra)[0]}: unknown key (model.* keys, `name`, `render` or `cluster`)")
        keys = {k: v for k, v in value.items() if k in known}
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cfg.model), keys)
            model = OmegaConf.to_object(merged)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{key}.{getattr(exc, 'full_key', '') or ''}: {str(exc).splitlines()[0]}") from None
        label = str(value.get("name") or _label(model.path))
        if not _LABEL.fullmatch(label):
            raise ConfigError(f"{key}.name={label!r}: must match [A-Za-z0-9][A-Za-z0-9.-]{{0,63}} (it is part of ids)")
        shape = value.get("cluster") or {}
        if not isinstance(shape, dict) or set(shape) - set(SHAPE_KEYS):
            raise ConfigError(f"{key}.cluster={shape!r}: may set only {', '.join(SHAPE_KEYS)}")
        if shape and cfg.cluster.groups:
            raise ConfigError(f"{key}.cluster={shape!r}: with cluster.groups, gang shapes are set per group")
        try:
            cluster = replace(cfg.cluster, **shape) if shape else cfg.cluster
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc}") from None
        defaults = value.get("render") or {}
        if not isinstance(defaults, dict) or set(defaults) - set(RENDER_AXES):
            raise ConfigError(f"{key}.render={defaults!r}: may set only {', '.join(RENDER_AXES)} (this model's "
                              "defaults; axes and row columns override them)")
        try:
            render = replace(cfg.render, **defaults) if defaults else cfg.render
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{key}.render={defaults!r}: {exc}") from None
        variants.append(ModelVariant(label, model, cluster, render))
    labels = [v.label for v in variants]
    for label in labels:
        if labels.count(label) > 1:
            raise ConfigError(f"sweep.model: two values are labelled {label!r}; give each a distinct `name`")
    return variants


def _seeds(cfg: JobConfig, value) -> list[tuple]:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 1000:
            raise ConfigError(f"sweep.seeds={value!r}: a count must be in [1, 1000] (or give a list of seeds)")
        if cfg.render.seed + value - 1 > MAX_SEED:
            raise ConfigError(f"sweep.seeds={value!r}: render.seed + {value - 1} exceeds {MAX_SEED}")
        return [("count", k) for k in range(value)]
    seeds = _values({"seeds": value}, "seeds")
    for index, seed in enumerate(seeds):
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"sweep.seeds[{index}]={seed!r}: must be an integer in [0, {MAX_SEED}]")
    return [("value", s) for s in seeds]


_last_parsed: tuple[str, "Sweep"] | None = None


@dataclass(frozen=True)
class Sweep:
    """The parsed `sweep:` block: the model variants and the cells every input row expands into."""

    models: list[ModelVariant]
    cells: list[Cell]
    swept_models: bool = False

    @property
    def active(self) -> bool:
        return bool(self.swept_models or self.cells[0].parts)

    @property
    def axes(self) -> list[str]:
        names = ["model"] if self.swept_models else []
        return names + [a for a in (*RENDER_AXES, "seed") if a in self.cells[0].values]

    @classmethod
    def parse(cls, cfg: JobConfig) -> "Sweep":
        """The job's sweep (one model and one cell without a `sweep:` block); ConfigError naming the key.

        Parsed once per config: `load_config` parses it to refuse a bad block, preflight gets that same Sweep."""
        global _last_parsed
        # Keyed by the config's values (its dataclass repr), so a config changed after loading is parsed anew.
        key = repr(cfg)
        if _last_parsed is None or _last_parsed[0] != key:
            _last_parsed = (key, cls._parse(cfg))
        return _last_parsed[1]

    @classmethod
    def _parse(cls, cfg: JobConfig) -> "Sweep":
        sweep = dict(cfg.sweep or {})
        unknown = set(sweep) - set(AXES)
        if unknown:
            raise ConfigError(f"sweep.{sorted(unknown)[0]}: unknown axis (axes: {', '.join(AXES)})")
        models = ([ModelVariant("model", cfg.model, cfg.cluster, cfg.render)] if "model" not in sweep
                  else _models(cfg, _values(sweep, "model")))
        axes = []
        for axis in RENDER_AXES:
            if axis in sweep:
                values = _values(sweep, axis)
                for index, value in enumerate(values):
                    _check_render_value(axis, index, value)
                axes.append([(axis, float(v) if axis == "guidance_scale" else v) for v in values])
        seeds = _seeds(cfg, sweep["seeds"]) if "seeds" in sweep else [None]
        cells = []
        for combo in itertools.product(*axes, list(enumerate(seeds))):
            *render, (seed_index, seed) = combo
            parts = tuple(_part(axis, value) for axis, value in render)
            values = dict(render)
            if seed is not None:
                parts += (f"seed-{seed[1]}",)
                values["seed"] = seed[1]
            cells.append(Cell(dict(render), seed, parts, values, None if seed is None else seed_index))
        if len(cells) * len(models) > MAX_CELLS:
            raise ConfigError(f"sweep: {len(cells) * len(models)} cells per input row (rule: at most {MAX_CELLS})")
        return cls(models, cells, "model" in sweep)

    def cells_of(self, variant: ModelVariant) -> list[tuple[str, str | None, Cell]]:
        """(id suffix, sweep JSON, cell) of every cell a row has on this model."""
        found = []
        for cell in self.cells:
            parts = ((variant.label,) if self.swept_models else ()) + cell.parts
            values = ({"model": variant.label} if self.swept_models else {}) | cell.values
            found.append((SEP + SEP.join(parts) if parts else "", json.dumps(values) if values else None, cell))
        return found
