"""Finished sweep outputs for the report's tests and benchmark: real mp4s, JPEG posters, a manifest with sweep JSON."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from kandinsky_batch.output.manifest import ManifestWriter
from kandinsky_batch.output.success import write_success
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import object_key, poster_key
from kandinsky_batch.output.video import encode
from tests.helpers import compact

T0 = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)
PROMPTS = ["a red fox running through fresh snow", "slow motion waves crashing on dark rocks",
           "a hot air balloon drifting over a valley at dawn"]
# configs/tiny-sweep.yaml's shape: two tiny models x two step counts x three seeds.
TINY_SWEEP = {"model": ["tiny", "tiny-b"], "num_inference_steps": [2, 4], "seed": [1, 2, 3]}
GANGS = {"1": 1, "sp2": 2, "cfg2": 2, "sp2xcfg2": 4}


def cell_id(prompt_index: int, values: dict) -> str:
    """The id of one cell: `{input id}.{axis values}`."""
    return f"p{prompt_index}." + "-".join(str(v) for v in values.values())


def frames(seed: int, hue: float, speed: float, num_frames: int = 12, height: int = 64, width: int = 96) -> np.ndarray:
    """A smooth moving colour pattern (uint8 RGB, F x H x W x 3), different for each seed and variant."""
    rng = np.random.default_rng(seed)
    fx, fy = rng.uniform(0.04, 0.14, 2)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for t in range(num_frames):
        phase = t * speed
        channels = [np.sin(fx * x + phase + hue), np.sin(fy * y - phase + 2 * hue), np.sin(0.05 * (x + y) + 3 * hue)]
        out.append(np.stack([127.5 + 120 * c for c in channels], axis=-1))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_sweep(uri: str, options: dict | None = None, *, prompts: list[str] = PROMPTS, axes: dict | None = None,
                gangs: dict | None = None, approximate: dict | None = None, outcomes: dict | None = None,
                fps: int = 8, num_frames: int = 12, height: int = 64, width: int = 96,
                worker: str = "replica0@host:1:cpu") -> Storage:
    """A finished output of every prompt x every combination of `axes` (None: a plain job, one row per prompt).

    `gangs` and `approximate` map a model to its gang (default `1`) and approximate flag (default False);
    `outcomes` maps a cell id to (status, error) for cells that did not render; ok rows name `worker`.
    """
    storage = Storage(uri, options)
    rng = np.random.default_rng(7)
    gangs, approximate, outcomes = gangs or {}, approximate or {}, outcomes or {}
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else [None]
    writer = ManifestWriter(storage, "run1", flush_rows=100_000)
    cells, statuses = itertools.product(enumerate(prompts), combos), []
    for n, ((i, prompt), values) in enumerate(cells):
        sweep = values or {}
        model, steps, seed = sweep.get("model", "tiny"), sweep.get("num_inference_steps", 4), sweep.get("seed", i)
        rid = cell_id(i, sweep) if values else f"p{i}"
        status, error = outcomes.get(rid, ("ok", None))
        statuses.append(status)
        row = {"id": rid, "row_index": i, "prompt": prompt, "status": status, "error": error, "seed": seed,
               "height": height, "width": width, "num_frames": num_frames, "num_inference_steps": steps,
               "guidance_scale": 5.0, "fps": fps, "format": "mp4", "model": model,
               "sweep": json.dumps(values) if values else None, "finished_at": T0 + timedelta(seconds=n)}
        if status == "ok":
            hue = zlib.crc32(model.encode()) % 628 / 100
            clip = frames(seed + 100 * i, hue, 0.2 + 0.1 * steps, num_frames, height, width)
            data = encode(clip, "mp4", fps)
            storage.put_bytes(object_key(rid, "mp4"), data)
            storage.put_bytes(poster_key(rid), jpeg(clip[len(clip) // 2]))
            gang = gangs.get(model, "1")
            row.update(uri=storage.url(object_key(rid, "mp4")), bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), poster=storage.url(poster_key(rid)),
                       worker=worker, gang=gang, approximate=approximate.get(model, False),
                       attempts=1, render_seconds=float(steps * (0.4 + 0.3 * (model != "tiny"))
                                                        * rng.uniform(0.85, 1.3) / GANGS[gang]))
        writer.add(row)
    writer.flush()
    compact(storage, "run1")
    write_success(storage, {"run_id": "run1", "finished_at": (T0 + timedelta(minutes=5)).isoformat(),
                            "counts": {s: statuses.count(s) for s in ("ok", "failed", "invalid")}})
    return storage


def expected_stats(manifest: Path, columns: list[str]) -> dict[str, dict]:
    """Per-variant numbers computed straight from the manifest's Parquet files (a local directory) with numpy,
    keyed like the page's `data-variant`: the variant's axis values as compact JSON with sorted keys."""
    by_variant: dict[str, list[dict]] = {}
    for row in pq.read_table(manifest).to_pylist():
        sweep = json.loads(row["sweep"]) if row["sweep"] else {}
        key = json.dumps({a: sweep.get(a) for a in columns}, sort_keys=True, separators=(",", ":"))
        by_variant.setdefault(key, []).append(row)
    expected = {}
    for key, members in by_variant.items():
        ok = [r for r in members if r["status"] == "ok"]
        seconds = np.array([r["render_seconds"] for r in ok])
        expected[key] = {
            "ok": len(ok), "failed": sum(r["status"] == "failed" for r in members),
            "invalid": sum(r["status"] == "invalid" for r in members),
            "mean_s": seconds.mean(), "p50_s": np.percentile(seconds, 50), "p90_s": np.percentile(seconds, 90),
            "gpu_s": np.mean([r["render_seconds"] * GANGS[r["gang"]] for r in ok]),
            "approximate": {frozenset([True]): "yes", frozenset([False]): "no"}.get(
                frozenset(r["approximate"] for r in ok), "mixed"),
            "model": ", ".join(sorted({r["model"] for r in members})),
        }
    return expected


