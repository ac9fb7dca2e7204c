"""Everything a job checks before Ray starts, in one place: config, dataset, model limits, options, ids, resume.

`run` calls `preflight` first; whatever it refuses costs no GPU and no actor. It reads only Parquet footers,
the id column and the manifest, so it takes seconds at any dataset size.
"""

from __future__ import annotations

from dataclasses import dataclass

from kandinsky_batch.config import JobConfig
from kandinsky_batch.dataset import Dataset
from kandinsky_batch.intake import committed_tasks
from kandinsky_batch.options import effective_options
from kandinsky_batch.record import Stamp
from kandinsky_batch.resume import OutputState, check_conflicts
from kandinsky_batch.routing import check_shapes
from kandinsky_batch.rows import IdIndex, RowValidator
from kandinsky_batch.storage import Storage
from pipelines import ModelSpec, load_spec


@dataclass
class Checked:
    """What preflight established: the job can start, and with what."""

    dataset: Dataset
    spec: ModelSpec
    stamp: Stamp
    validator: RowValidator
    storage: Storage
    state: OutputState


def preflight(cfg: JobConfig, force: bool = False) -> Checked:
    """Refuse a job that cannot run as asked (ConfigError, InputError, ResumeConflict), naming key and value."""
    # 1. The dataset as a whole: files, columns and types, row count (footers only).
    dataset = Dataset(cfg.input.path, cfg.input.storage_options)
    # 2. The model's limits and the options it will really run with; gang shapes it can take.
    spec = load_spec(cfg.model.path, cfg.model.storage_options)
    options, spec = effective_options(cfg.model, spec)
    check_shapes(cfg.cluster, spec, options)
    stamp = Stamp(model=cfg.model.path, format=cfg.output.format, fps=cfg.render.fps, options=options)
    # 3. Ids over the whole dataset (exact duplicates and shared object keys) from the id column alone.
    id_column = dataset.column("id") if "id" in dataset.schema.names else None
    validator = RowValidator(cfg, spec, IdIndex.build(id_column, dataset.num_rows, cfg.output.format))
    # 4. What the output prefix holds: rows committed with other parameters are refused unless forced.
    storage = Storage(cfg.output.uri, cfg.output.storage_options, retries=cfg.output.retries,
                      backoff=cfg.output.retry_backoff)
    state = OutputState(storage, stamp, force=force)
    check_conflicts(state, committed_tasks(dataset, validator, cfg.cluster, state), cfg.output.uri)
    return Checked(dataset, spec, stamp, validator, storage, state)
