"""`kandinsky-batch report`: one static HTML page laying a sweep's cells side by side, with per-variant timings
and, when the output has a scores table, its statistics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jinja2

from kandinsky_batch.output.manifest import STATUSES, read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.layout import MANIFEST_DIR
from kandinsky_batch.output import report_scores
from kandinsky_batch.output.report_assets import place, sigv4
from kandinsky_batch.output.report_timings import device_of, seconds_unit, variant_stats
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import open_target
from kandinsky_batch.errors import ReportError

# The sweep axes in the order they are shown; an axis not listed here (a newer version's) goes last.
AXES = ("model", "num_inference_steps", "guidance_scale", "negative_prompt", "height", "width", "num_frames", "seed")
DEFAULT_ROW_AXES = ("seed",)
DEFAULT_EXPIRES = 7 * 24 * 3600
S3_MAX_EXPIRES = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week
COLUMNS = ["id", "row_index", "prompt", "status", "error", "uri", "sha256", "poster", "format", "model", "sweep",
           "gang", "approximate", "render_seconds"]
# The settings a cell renders with, in the order the page lists those every cell shares: (label, column).
SETTINGS = (("model", "model"), ("steps", "num_inference_steps"), ("guidance", "guidance_scale"),
            ("size", "size"), ("frames", "num_frames"), ("fps", "fps"), ("format", "format"), ("seed", "seed"),
            ("negative prompt", "negative_prompt"), ("options", "options"), ("gang", "gang"),
            ("sound", "audio_sample_rate"), ("device", "device"))
_SETTING_COLUMNS = ["height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps", "format",
                    "seed", "negative_prompt", "options", "gang", "audio_sample_rate", "model", "worker"]


@dataclass
class Variant:
    """A column of the grid: one combination of the column axes' values, and its numbers over its cells."""

    values: tuple
    key: str  # canonical JSON of {axis: value}; the page's `data-variant`
    label: str  # `model=tiny · seed=1`
    short: str  # `tiny · 1`
    stats: dict = field(default_factory=dict)


@dataclass
class GridRow:
    """A row of the grid: one input row (prompt) and one combination of the row axes' values."""

    row_index: int
    values: tuple
    cells: list[list[dict]]  # per variant, the manifest rows that fall there (normally exactly one)
    prompt: str | None = None
    span: int = 1  # grid rows the prompt cell spans; 0 where the row above's prompt cell covers it
    scores: list[dict] = field(default_factory=list)  # per variant, the cell's score per metric (with scores)
    best: list[str] = field(default_factory=list)  # per variant, the metrics by which it is the prompt's best


@dataclass
class Grid:
    column_axes: list[str]
    row_axes: list[str]
    variants: list[Variant]
    rows: list[GridRow]


def _setting(row: dict, column: str):
    if column == "size":
        return None if row["width"] is None or row["height"] is None else f"{row['width']}×{row['height']}"
    if column == "device":
        return device_of(row["worker"])
    if column == "audio_sample_rate":
        return None if row[column] is None else f"{row[column]} Hz"
    return row[column]


def shared_settings(rows: list[dict]) -> list[dict]:
    """The settings every cell shares, once for the page: those all rows that record one record alike
    (an invalid row never reached a replica: it has no gang, options or device to disagree with)."""
    shared = []
    for label, column in SETTINGS:
        values = {value for row in rows if (value := _setting(row, column)) is not None}
        if len(values) == 1:
            shared.append({"label": label, "column": column, "value": _show(values.pop())})
    return shared


def variant_key(values: dict) -> str:
    """The `data-variant` of a column: its axis values as compact JSON with sorted keys (`{}` without a sweep)."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def _sweep_of(row: dict) -> dict:
    text = row["sweep"]
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"id={row['id']!r}: sweep is not JSON: {text!r}") from exc
    if not isinstance(value, dict):
        raise ReportError(f"id={row['id']!r}: sweep must be a JSON object, got {text!r}")
    return value


def _split_axes(present: list[str], columns: list[str] | None) -> tuple[list[str], list[str]]:
    if columns is None:
        return [a for a in present if a not in DEFAULT_ROW_AXES], [a for a in present if a in DEFAULT_ROW_AXES]
    for axis in columns:
        if axis not in present:
            raise ReportError(f"unknown axis {axis!r} in --columns; this output's sweep axes are: "
                              f"{', '.join(present) if present else 'none (it is not a sweep)'}")
    if len(set(columns)) != len(columns):
        raise ReportError(f"--columns names an axis twice: {','.join(columns)}")
    return list(columns), [a for a in present if a not in columns]


def _order(values: tuple) -> tuple:
    """Sort key for axis values: numbers numerically, then strings, then missing values."""
    return tuple((2, 0, "") if v is None else (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                 for v in values)


def _show(value) -> str:
    return "—" if value is None else str(value)


def build(rows: list[dict], columns: list[str] | None = None) -> Grid:
    """The grid of manifest rows: input rows x row-axis values down, column-axis values (variants) across."""
    sweeps = [_sweep_of(row) for row in rows]
    found = {axis for sweep in sweeps for axis in sweep}
    column_axes, row_axes = _split_axes([a for a in AXES if a in found] + sorted(found - set(AXES)), columns)
    column_of = [tuple(sweep.get(a) for a in column_axes) for sweep in sweeps]
    row_of = [(row["row_index"], tuple(sweep.get(a) for a in row_axes)) for row, sweep in zip(rows, sweeps)]

    members: dict[tuple, list[dict]] = {}
    for row, values in zip(rows, column_of):
        members.setdefault(values, []).append(row)
    variants = [Variant(values, variant_key(dict(zip(column_axes, values))),
                        " · ".join(f"{a}={_show(v)}" for a, v in zip(column_axes, values)) or "all rows",
                        " · ".join(map(_show, values)) or "all rows",
                        variant_stats(members[values]))
                for values in sorted(members, key=_order)]
    position = {variant.values: i for i, variant in enumerate(variants)}

    grid_rows: dict[tuple, GridRow] = {}
    for row, values, key in zip(rows, column_of, row_of):
        grid_row = grid_rows.setdefault(key, GridRow(key[0], key[1], [[] for _ in variants]))
        grid_row.cells[position[values]].append(row)
        grid_row.prompt = grid_row.prompt if grid_row.prompt is not None else row["prompt"]
    ordered = [grid_rows[key] for key in sorted(grid_rows, key=lambda k: (k[0], _order(k[1])))]
    first = None
    for grid_row in ordered:
        if first is not None and first.row_index == grid_row.row_index:
            first.span, grid_row.span = first.span + 1, 0
        else:
            first = grid_row
    return Grid(column_axes, row_axes, variants, ordered)


def _header(grid: Grid) -> list[list[dict]]:
    """Header rows of the grid, one per column axis; runs of columns sharing the leading values merge into one."""
    levels = []
    for depth, axis in enumerate(grid.column_axes):
        cells: list[dict] = []
        for variant in grid.variants:
            prefix = variant.values[: depth + 1]
            if cells and cells[-1]["prefix"] == prefix:
                cells[-1]["span"] += 1
            else:
                cells.append({"prefix": prefix, "axis": axis, "value": _show(prefix[-1]), "span": 1})
        levels.append(cells)
    return levels or [[{"axis": "", "value": "video", "span": 1}]]


def _chart(variants: list[Variant]) -> dict:
    """Geometry of the inline SVG bar chart of mean seconds per video."""
    label_w = min(340, 16 + 7 * max(len(v.short) for v in variants))
    plot_w, bar_h, gap = 360, 20, 8
    top = max((v.stats["mean_s"] or 0.0) for v in variants) or 1.0
    bars = [{"key": v.key, "label": v.label, "short": v.short, "value": v.stats["mean_s"], "y": i * (bar_h + gap),
             "width": (v.stats["mean_s"] or 0.0) / top * plot_w} for i, v in enumerate(variants)]
    return {"bars": bars, "label_w": label_w, "plot_w": plot_w, "bar_h": bar_h,
            "width": label_w + plot_w + 70, "height": len(variants) * (bar_h + gap)}


def _seconds(value) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("kandinsky_batch.output", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["seconds"] = _seconds
    env.filters["show"] = _show
    env.filters["raw"] = lambda v: "" if v is None else repr(v)
    env.filters.update(report_scores.FILTERS)
    env.globals.update(zip=zip, **report_scores.GLOBALS)
    return env.get_template("report.html.j2")


def write_report(uri: str, out: str | os.PathLike | None = None, *, storage_options: dict | None = None,
                 columns: list[str] | None = None, expires: int = DEFAULT_EXPIRES, copy_videos: bool = False,
                 metric: str | None = None) -> Path:
    """Write `index.html` (+ posters, + videos with `copy_videos`) for the output at `uri`; returns its path.

    `out` defaults to `{uri}/report` for a local output and `./report` for an object store. Videos stay
    where they are unless `copy_videos`: relative links on local disk, URLs presigned for `expires` seconds.
    With a `scores/` table the page shows its statistics; `metric` is the one the grid opens on.
    """
    # 1. Check the request before reading anything large.
    storage = open_target(uri, storage_options, "report", ReportError)
    if isinstance(expires, bool) or not isinstance(expires, int) or expires <= 0:
        raise ReportError(f"--expires must be a positive number of seconds, got {expires!r}")
    signer = storage
    if not storage.local and not copy_videos and storage.scheme in ("s3", "s3a"):
        if expires > S3_MAX_EXPIRES:
            raise ReportError(f"--expires {expires}: S3 presigned URLs last at most {S3_MAX_EXPIRES} s (7 days)")
        signer = Storage(uri, sigv4(storage_options))
    if not any(key.endswith(".parquet") for key in storage.iter_keys(MANIFEST_DIR)):  # stops at the first page
        raise ReportError(f"manifest is missing: no {MANIFEST_DIR}/*.parquet under {storage.url(MANIFEST_DIR)}")

    # 2. Lay the manifest out as a grid and count each variant.
    manifest = read_manifest(storage)
    table = manifest.select(COLUMNS)
    if table.num_rows == 0:
        raise ReportError(f"manifest under {storage.url(MANIFEST_DIR)} holds no rows")
    grid = build(table.to_pylist(), columns)
    scores = report_scores.for_grid(storage, grid, metric)

    # 3. Put posters (and videos, if asked) next to the page, and link the rest.
    out = Path(out) if out is not None else Path(storage.root) / "report" if storage.local else Path("report")
    out = out.resolve()
    place(storage, signer, grid, out, expires, copy_videos)

    # 4. Render the page.
    settings_rows = manifest.select(["status", "render_seconds", *_SETTING_COLUMNS]).to_pylist()
    statuses = table["status"].to_pylist()
    models = {m for m in table["model"].to_pylist() if m} | {
        str(s["model"]) for s in map(_sweep_of, table.select(["id", "sweep"]).to_pylist()) if s.get("model")}
    html = _template().render(
        uri=uri, grid=grid, header=_header(grid), chart=_chart(grid.variants), success=read_success(storage),
        settings=shared_settings(settings_rows), unit=seconds_unit(settings_rows),
        counts={status: statuses.count(status) for status in STATUSES}, total=len(statuses),
        tiny=sorted(m for m in models if m.startswith("tiny")),
        videos="copied" if copy_videos else "local" if storage.local else "signed",
        expires_at=(datetime.now(timezone.utc) + timedelta(seconds=expires)).strftime("%Y-%m-%d %H:%M UTC"),
        scores=scores, score_data=scores.page_data(grid.variants) if scores and scores.scored else None,
    )
    index = out / "index.html"
    index.write_text(html, encoding="utf-8")
    return index
