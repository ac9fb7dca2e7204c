"""Which replica group renders which row, and whether each group's gang shape fits the model."""

from __future__ import annotations

from kandinsky_batch.config.schema import ClusterConfig, ConfigError
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.output.record import invalid as invalid_row
from pipelines import ModelSpec
from pipelines.cost import guided
from pipelines.kinds import BY_NAME
from pipelines.request import RenderOptions


def check_shapes(cluster: ClusterConfig, spec: ModelSpec, options: RenderOptions) -> None:
    """Refuse, before Ray starts, gang shapes the model cannot run (Ulysses must divide the heads)."""
    for index, group in enumerate(cluster.replica_groups()):
        shape = group.parallel()
        prefix = f"cluster.groups[{index}]." if cluster.groups else "cluster."
        for problem in shape.problems(spec.num_heads, spec.attention_type, options.cache):
            raise ConfigError(f"{prefix}{problem} ({spec.path})")
        kind = BY_NAME[spec.kind]
        if kind.no_gangs and shape.world_size > 1:
            raise ConfigError(f"{prefix}{'cfg_parallel' if shape.cfg else 'sequence_parallel'}: {kind.no_gangs}; "
                              f"use single-GPU replicas ({spec.path})")
        if kind.no_sequence_parallel and shape.sequence > 1:
            raise ConfigError(f"{prefix}sequence_parallel={shape.sequence}: {kind.no_sequence_parallel}; use "
                              f"cfg_parallel or single-GPU replicas ({spec.path})")
        # Only a distilled Kandinsky 6 checkpoint takes one guidance scale (`ModelSpec.guidance`).
        if shape.cfg and spec.guidance is not None and not guided(spec.guidance):
            raise ConfigError(f"{prefix}cfg_parallel: a distilled Kandinsky 6 checkpoint runs without guidance "
                              f"(guidance_scale={spec.guidance}), so there is no uncond branch to split off "
                              f"({spec.path})")


def route(tasks: list[Task], cluster: ClusterConfig) -> tuple[dict[str, list[Task]], list[dict]]:
    """Send each row to the group with the smallest `max_tokens` that holds it; rows too big for all are invalid."""
    groups = sorted(cluster.replica_groups(), key=lambda g: (g.max_tokens is None, g.max_tokens or 0))
    routed: dict[str, list[Task]] = {g.name: [] for g in groups}
    invalid = []
    for task in tasks:
        group = next((g for g in groups if g.max_tokens is None or task.tokens() <= g.max_tokens), None)
        if group is None:
            largest = max(g.max_tokens for g in groups)
            invalid.append(invalid_row(task.row(), f"num_frames={task.num_frames}, height={task.height}, "
                                                   f"width={task.width}: {task.tokens()} visual tokens (rule: no "
                                                   f"replica group takes more than max_tokens={largest})"))
        else:
            routed[group.name].append(task)
    return routed, invalid
