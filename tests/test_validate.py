"""`validate` / `run --dry-run`, `status`, the lease's heartbeat and `input.limit`.

Oracles: validate counts every row exactly as the intake of `run` sorts it (the intake itself is the reference)
and leaves the output prefix byte for byte as it was; status reads what a job's writers wrote; a limited dataset
is its first N rows everywhere (ids, validation, the manifest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from kandinsky_batch.output import lease
from kandinsky_batch.cli import main
from kandinsky_batch.config.schema import ConfigError
from kandinsky_batch.config.load import load_config
from kandinsky_batch.intake.dataset import Dataset, limited
from kandinsky_batch.estimate import REFERENCE_TOKENS, calibrate
from kandinsky_batch.intake.windows import Intake, validated_windows, window_rows_of
from kandinsky_batch.output.manifest import ManifestWriter, read_manifest
from kandinsky_batch.output.success import read_success, write_success
from kandinsky_batch.intake.preflight import preflight
from kandinsky_batch.intake.rows import Task
from kandinsky_batch.output.status import format_status, status
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import object_key
from kandinsky_batch.intake.job_output import SourceManifest
from kandinsky_batch.validate import rule_of, validate
from kandinsky_batch.output.video import encode_npy
from pipelines import ModelSpec
from pipelines.request import RenderOptions
from tests.helpers import TINY_RENDER, write_dataset

RATE = 0.105  # simulated seconds per million cost units


def _rows(n: int = 12) -> list[dict]:
    rows = [{"id": f"r{i}", "prompt": f"a fox number {i}", "num_frames": None} for i in range(n)]
    rows[3]["prompt"] = "   "
    rows[4]["num_frames"], rows[5]["num_frames"] = 8, 10
    rows[9]["id"] = "r0"
    return rows


def _cfg(tmp_path, rows, *extra):
    data = write_dataset(tmp_path / "in.parquet", rows)
    return load_config(None, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", "output.format=npy",
                              f"model.path=simulated:{RATE}", *TINY_RENDER, *extra])


def _tasks(cfg) -> list[Task]:
    checked = preflight(cfg)
    rows = window_rows_of(checked.lanes, checked.sweep)
    return [task for _, found in validated_windows(checked.dataset, checked.lanes, checked.sweep, cfg.render.seed,
                                                   rows) for _, v in found for task in v.task_list()]


def _snapshot(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_validate_sorts_every_row_as_the_intake_does_and_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, _rows())
    tasks = _tasks(cfg)
    storage = Storage(cfg.output.uri)
    stamp = preflight(cfg).stamp
    # r0 committed with these values, r1 an orphan that decodes whole, r2 a truncated orphan.
    writer = ManifestWriter(storage, "earlier")
    writer.add(stamp.row(tasks[0].row(), status="ok", finished_at=datetime.now(timezone.utc)))
    writer.flush()
    frames = np.zeros((tasks[1].num_frames, tasks[1].height, tasks[1].width, 3), np.uint8)
    storage.put_bytes(object_key(tasks[1].id, "npy"), encode_npy(frames))
    storage.put_bytes(object_key(tasks[2].id, "npy"), encode_npy(frames)[:100])
    before = _snapshot(tmp_path / "out")

    found = validate(cfg)

    assert _snapshot(tmp_path / "out") == before  # no poster for the orphan, nothing else
    assert (found.rows, found.already_done, found.would_adopt, found.invalid, found.would_render) == (12, 1, 1, 4, 6)
    recorded = []
    checked = preflight(cfg)
    intake = Intake(checked.dataset, checked.lanes, checked.sweep, cfg.render.seed, recorded.append).start()
    while intake.poll() or not intake.exhausted:
        time.sleep(0.01)
    counts = intake.counts
    assert (counts.skipped, counts.adopted, counts.invalid, counts.todo) == (
        found.already_done, found.would_adopt, found.invalid, found.would_render)
    assert sorted(r["id"] for r in recorded if r["status"] == "invalid") == ["r0", "r3", "r4", "r5"]
    by_rule = {(r.field, r.rule): (r.count, r.example_id) for r in found.rules}
    assert by_rule == {
        ("num_frames", "must be 4k+1 and at most 509"): (2, "r4"),
        ("prompt", "must contain text"): (1, "r3"),
        ("id", "ids must be unique"): (1, "r0"),
    }
    assert found.rules[0].example.startswith("num_frames=8: must be 4k+1")
    # The simulated model's own rate: cost units x seconds per unit.
    rendered = [t for t in tasks if t.id not in ("r0", "r1")]
    assert found.models[0].rows == 6
    assert found.gpu_hours == pytest.approx(sum(t.cost() for t in rendered) * RATE / 1e6 / 3600)


def test_a_rule_is_the_field_before_the_value_and_the_rule_without_values():
    assert rule_of("prompt='a b: c'...: 701 tokens (rule: the text encoder keeps at most 512)") == (
        "prompt", "the text encoder keeps at most 512")
    assert rule_of("sweep axis height=100: must be a positive multiple of 16 (sweep model 'm': tiny)") == (
        "sweep axis height", "must be a positive multiple of 16")
    assert rule_of("num_frames=241, height=512, width=768: 93696 visual tokens (rule: no replica group takes "
                   "more than max_tokens=47616)") == ("num_frames", "no replica group takes more than max_tokens=47616")
    assert rule_of("source status='failed': only the source job's ok rows are upscaled (the source row: boom)") == (
        "source status", "only the source job's ok rows are upscaled")
    assert rule_of("something else entirely")[0] == "other"


def test_the_estimate_uses_the_h200_figure_of_the_job_options_and_names_what_is_not_measured():
    lite = ModelSpec(path="kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", attention_type="regular",
                     num_heads=28, spatial_multiple=16, temporal_multiple=4, max_frames=509, max_size=2048,
                     max_prompt_tokens=512)
    row = Task(id="a", row_index=0, prompt="p", negative_prompt=None, seed=0, height=512, width=768, num_frames=121,
               num_inference_steps=50, guidance_scale=5.0)
    assert row.tokens() == REFERENCE_TOKENS
    eager, fast = calibrate(lite, RenderOptions()), calibrate(lite, RenderOptions(compile=True, batched_guidance=True))
    assert eager.seconds(row) == pytest.approx(182.15, abs=0.1)  # RESULTS 3.2: 50 x 3.517 + 6.29
    assert fast.seconds(row) == pytest.approx(144.9, abs=0.1)    # 50 x 2.772 + 6.29
    assert "H200" in eager.basis and "Lite" in eager.basis
    pro = calibrate(ModelSpec(**{**lite.__dict__, "num_heads": 32}), RenderOptions())
    assert pro.seconds(row) == pytest.approx(50 * 15.66 + 6.29, abs=0.1)
    k6 = calibrate(ModelSpec(**{**lite.__dict__, "kind": "ti2va"}), RenderOptions())
    assert k6.seconds(row) is None and "not calibrated" in k6.basis
    assert calibrate(ModelSpec(**{**lite.__dict__, "path": "tiny"}), RenderOptions()).seconds(row) == 0.0


def test_input_limit_takes_the_first_rows_everywhere(tmp_path):
    rows = _rows()
    found = validate(_cfg(tmp_path, rows, "input.limit=6"))
    # r9 (a duplicate of r0) is past the limit: only r3, r4 and r5 are invalid.
    assert (found.rows, found.invalid, found.would_render) == (6, 3, 3)
    assert {r.example_id for r in found.rules} == {"r3", "r4"}
    with pytest.raises(ConfigError, match="input.limit=0"):
        _cfg(tmp_path, rows, "input.limit=0")
    dataset = limited(Dataset(str(tmp_path / "in.parquet")), 100)
    assert dataset.num_rows == 12 and dataset.column("id").to_pylist() == [r["id"] for r in rows]


def test_an_upscale_source_manifest_is_limited_too(tmp_path):
    source = Storage(f"file://{tmp_path / 'job'}")
    writer = ManifestWriter(source, "run")
    for i in range(7):
        writer.add({"id": f"s{i}", "row_index": i, "status": "ok", "uri": f"file:///x/s{i}.mp4", "height": 64,
                    "width": 64, "num_frames": 17, "fps": 8, "format": "mp4", "prompt": "p", "seed": i})
    writer.flush()
    write_success(source, {"run_id": "run"})
    dataset = limited(SourceManifest(f"file://{tmp_path / 'job'}"), 3)
    assert dataset.num_rows == 3 and dataset.sound is False
    assert dataset.column("id").to_pylist() == ["s0", "s1", "s2"]
    assert sum(b.num_rows for b in dataset.batches(batch_size=2)) == 3


def test_a_run_with_nothing_to_render_honours_the_limit_and_releases_its_lease(tmp_path, monkeypatch):
    from kandinsky_batch.job import run  # every row invalid: nothing renders, so Ray never starts

    import kandinsky_batch.job as job

    rows = [{"id": f"r{i}", "prompt": f"p{i}", "num_frames": 8} for i in range(10)]
    cfg = _cfg(tmp_path, rows, "input.limit=4")
    beats = []

    def write_success_seeing_the_lease(storage, summary):
        beats.append(lease.read(storage))
        write_success(storage, summary)

    monkeypatch.setattr(job, "write_success", write_success_seeing_the_lease)
    result = run(cfg, progress=False)
    storage = Storage(cfg.output.uri)
    assert (result.rows, result.invalid) == (4, 4)
    assert read_manifest(storage)["id"].to_pylist() == ["r0", "r1", "r2", "r3"]
    # The lease was held until _SUCCESS was written, then released.
    assert beats[0].live and beats[0].holder["run_id"] == read_success(storage)["run_id"]
    assert not lease.read(storage).live
    found = status(cfg.output.uri)
    assert found.state == "finished" and found.rows == {"ok": 0, "invalid": 4, "failed": 0}


def test_status_follows_the_lease_and_the_manifest(tmp_path):
    uri = f"file://{tmp_path / 'out'}"
    storage = Storage(uri)
    assert status(uri).state == "not started"
    beat = lease.Lease.acquire(storage, "run1", ttl=60)
    beat.progress["rows_total"] = 10
    started = datetime.fromisoformat(beat.record["started_at"])
    writer = ManifestWriter(storage, "run1")
    writer.add({"id": "old", "row_index": 0, "status": "ok", "finished_at": started - timedelta(hours=1)})
    writer.add({"id": "bad", "row_index": 1, "status": "invalid", "finished_at": started})
    for i in range(4):  # four rows rendered 10 s apart: 3 intervals in 30 s, 6 rows a minute
        writer.add({"id": f"r{i}", "row_index": 2 + i, "status": "ok" if i else "failed", "worker": "replica0",
                    "finished_at": started + timedelta(seconds=10 * (i + 1))})
    writer.add({"id": "adopted", "row_index": 6, "status": "ok", "worker": "adopted",
                "finished_at": started + timedelta(seconds=45)})
    writer.flush()
    beat.progress["rows_settled"] = 6
    beat.renew()
    updated = datetime.fromisoformat(lease.read(storage).beat["updated_at"])

    running = status(uri, now=updated + timedelta(seconds=5))
    assert running.state == "running" and running.rows == {"ok": 5, "invalid": 1, "failed": 1}
    assert running.rate_per_minute == pytest.approx(6.0) and running.eta_seconds == pytest.approx(40.0)
    text = format_status(running)
    assert text.startswith(f"running (run1, {beat.record['host']}:{os.getpid()}, updated 5s ago)")
    assert "6.0 rows/min" in text and "ETA: 40 s" in text

    stale = status(uri, now=updated + timedelta(seconds=300))
    assert stale.state == "stale" and format_status(stale).startswith("stale: last heartbeat 300s ago")

    write_success(storage, {"run_id": "run1", "finished_at": (updated + timedelta(seconds=1)).isoformat()})
    assert status(uri).state == "running"  # _SUCCESS comes before the release
    beat.release()
    assert not lease.read(storage).live and status(uri).state == "finished"
    storage.delete("_SUCCESS")
    assert status(uri).state == "incomplete"


def test_the_cli_validates_without_importing_ray_and_refuses_in_one_line(tmp_path, capsys):
    cfg = _cfg(tmp_path, _rows())
    data = cfg.input.path
    args = ["configs/tiny.yaml", f"input.path={data}", f"output.uri={tmp_path / 'out'}", "model.path=simulated"]
    code = ("import sys, json; from kandinsky_batch.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "validate", "--json", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["rows"], report["invalid"], report["would_render"]) == (12, 4, 8)
    assert not (tmp_path / "out").exists()

    assert main(["run", "--dry-run", *args]) == 0
    assert "would render  8" in capsys.readouterr().out
    assert main(["validate", "configs/tiny.yaml", f"input.path={tmp_path / 'missing.parquet'}"]) == 2
    assert capsys.readouterr().err.startswith("error: input.path=")
    assert main(["status", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "not started"
