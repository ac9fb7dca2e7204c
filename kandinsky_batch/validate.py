"""`kandinsky-batch validate` (and `run --dry-run`): every row checked exactly as `run` would check it, with
nothing started and nothing written.

The same `preflight` as `run`, then the intake's own window loop (`intake.validated_windows`: sweep expansion,
`RowValidator.validate`) and its routing and resume lookups (`intake.sort_window`, read-only): no Ray, no
weights, no object written (an orphaned video that `run` would adopt is decoded but its poster not made).
It counts what `run` would do, groups the invalid rows by rule with one example each, and estimates the
GPU-hours of the rows it would render (`kandinsky_batch.estimate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kandinsky_batch.config.schema import JobConfig
from kandinsky_batch.estimate import calibrate
from kandinsky_batch.intake.windows import sort_window, validated_windows, window_rows_of
from kandinsky_batch.intake.preflight import preflight

MAX_RULES = 50
"""Distinct (field, rule) groups kept; later ones are counted under their field's `other rules`."""
# `field=value: rest`: the value a quoted literal (possibly cut, `...`) or anything up to the first ': '.
_MESSAGE = re.compile(r"""(?P<field>[A-Za-z_][\w .]*?)=(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^:]*?)(?:\.\.\.)?: """)
_RULE = re.compile(r"\(rule: (?P<rule>.*?)\)(?: \(sweep model .*\))?$")
_TRAILING = re.compile(r"\s*\([^()]*\)$")


def rule_of(error: str) -> tuple[str, str]:
    """(field, rule) of an invalid row's message: the field named before `=` and the rule without the row's
    values (its `(rule: ...)` text, else the rest of the message without trailing parentheses)."""
    found = _MESSAGE.match(error or "")
    if found is None:
        return "other", (error or "")[:80]
    rest = error[found.end():]
    named = _RULE.search(rest)
    if named:
        return found["field"], named["rule"]
    while _TRAILING.search(rest):
        rest = _TRAILING.sub("", rest)
    return found["field"], rest


@dataclass
class Rule:
    field: str
    rule: str
    count: int
    example_id: str
    example: str


@dataclass
class ModelEstimate:
    """The rows one model would render and their seconds on the GPU the figure was measured on."""

    model: str
    label: str
    rows: int = 0
    cost_units: float = 0.0
    gpu_hours: float | None = 0.0
    basis: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Validation:
    """What `run` would do with every row."""

    input_rows: int
    cells: int
    """Cells per input row (sweep cells x models; 1 without a sweep)."""
    rows: int = 0
    would_render: int = 0
    already_done: int = 0
    would_adopt: int = 0
    invalid: int = 0
    rules: list[Rule] = field(default_factory=list)
    models: list[ModelEstimate] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float | None:
        """GPU-hours of every row to render; None when some model's rows are not calibrated."""
        hours = [m.gpu_hours for m in self.models if m.rows]
        return None if any(h is None for h in hours) else sum(hours)

    def to_dict(self) -> dict:
        return {"input_rows": self.input_rows, "cells_per_row": self.cells, "rows": self.rows,
                "would_render": self.would_render, "already_done": self.already_done,
                "would_adopt": self.would_adopt, "invalid": self.invalid,
                "invalid_by_rule": [r.__dict__ for r in self.rules],
                "estimate": {"gpu_hours": self.gpu_hours, "models": [m.__dict__ for m in self.models]}}


class _Rules:
    def __init__(self):
        self.groups: dict[tuple[str, str], Rule] = {}

    def add(self, row: dict) -> None:
        name, rule = rule_of(row["error"])
        key = (name, rule) if (name, rule) in self.groups or len(self.groups) < MAX_RULES else (name, "other rules")
        if key in self.groups:
            self.groups[key].count += 1
        else:
            self.groups[key] = Rule(key[0], key[1], 1, row["id"], row["error"])


def validate(cfg: JobConfig, force: bool = False) -> Validation:
    """Check every row of `cfg` as `run` would (refusals raise as they do there); start and write nothing."""
    checked = preflight(cfg, force=force)
    cells = len(checked.sweep.cells) * len(checked.lanes)
    result = Validation(checked.dataset.num_rows, cells, rows=checked.dataset.num_rows * cells)
    rules = _Rules()
    models = {}
    for lane in checked.lanes:
        calibration = calibrate(lane.spec, lane.stamp.options)
        label = lane.label if len(checked.lanes) > 1 else lane.model.path
        models[lane.label] = (calibration, ModelEstimate(lane.model.path, label, basis=calibration.basis,
                                                         notes=calibration.notes))
    rows = window_rows_of(checked.lanes, checked.sweep)
    for _, found in validated_windows(checked.dataset, checked.lanes, checked.sweep, cfg.render.seed, rows):
        for lane, validated in found:
            window = sort_window(lane, checked.sweep, validated, dry_run=True)
            for row in window.invalid:
                rules.add(row)
            result.invalid += len(window.invalid)
            result.already_done += window.skipped
            result.would_adopt += len(window.adopted)
            calibration, estimate = models[lane.label]
            for tasks in window.todo.values():
                result.would_render += len(tasks)
                estimate.rows += len(tasks)
                for task in tasks:
                    estimate.cost_units += task.cost()
                    seconds = calibration.seconds(task)
                    if seconds is None:
                        estimate.gpu_hours = None
                    elif estimate.gpu_hours is not None:
                        estimate.gpu_hours += seconds / 3600
    result.rules = sorted(rules.groups.values(), key=lambda r: -r.count)
    result.models = [estimate for _, estimate in models.values()]
    return result


def _hours(hours: float | None) -> str:
    return "not calibrated" if hours is None else f"{hours:.2f} GPU-hours" if hours >= 0.01 else \
        f"{hours * 3600:.1f} GPU-seconds"


def format_validation(v: Validation) -> str:
    """The report `validate` prints."""
    cells = f" ({v.input_rows} input rows x {v.cells} cells)" if v.cells > 1 else ""
    lines = [f"rows: {v.rows}{cells}",
             f"  would render  {v.would_render}",
             f"  already done  {v.already_done}",
             f"  would adopt   {v.would_adopt}",
             f"  invalid       {v.invalid}"]
    if v.rules:
        lines.append("invalid by rule:")
        for rule in v.rules:
            lines.append(f"  {rule.count:>6}  {rule.field}: {rule.rule}")
            lines.append(f"          e.g. id={rule.example_id!r}: {rule.example}")
    if v.gpu_hours is None:
        calibrated = [m for m in v.models if m.gpu_hours is not None]
        lines.append(f"estimate: {_hours(sum(m.gpu_hours for m in calibrated))} for "
                     f"{sum(m.rows for m in calibrated)} of the {v.would_render} rows to render; the other "
                     f"{sum(m.rows for m in v.models if m.gpu_hours is None)} not calibrated")
    else:
        lines.append(f"estimate: {_hours(v.gpu_hours)} for the {v.would_render} rows to render")
    for m in v.models:
        if not m.rows and len(v.models) > 1:
            continue
        lines.append(f"  {m.label}: {m.rows} rows, {_hours(m.gpu_hours)} ({m.basis})")
        lines.extend(f"    note: {note}" for note in m.notes)
    return "\n".join(lines)
