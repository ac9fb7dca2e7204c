"""Gangs through the whole job path on a local Ray (CPU ranks, gloo on loopback).

Oracles: frames bit-identical to plain diffusers on one device; a killed rank loses nothing.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode
from pipelines import ParallelSpec
from tests.helpers import TINY_RENDER, assert_like_one_device, oracle, write_dataset
from tests.test_faults import _render_workers

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = [
    {"id": "cat", "prompt": "a cat dancing"},
    {"id": "car", "prompt": "a red car driving through a city street at night", "num_frames": 9},
    {"id": "koi", "prompt": "koi fish", "guidance_scale": 1.0},
    {"id": "tall", "prompt": "a lighthouse in a storm", "height": 48, "width": 32},
]


def _config(tmp_path, rows, extra=()):
    data = write_dataset(tmp_path / "prompts.parquet", rows)
    return load_config(None, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", "output.format=npy",
                              *TINY_RENDER, *extra])


def _check_frames(tmp_path, tiny_pipe, spec: ParallelSpec):
    storage = Storage(f"file://{tmp_path / 'out'}")
    manifest = read_manifest(storage).to_pylist()
    assert [r["status"] for r in manifest] == ["ok"] * len(manifest)
    for row in manifest:
        assert row["gang"] == spec.name
        frames = decode(storage.get_bytes(storage.key_of(row["uri"])), "npy")
        assert_like_one_device(frames, oracle(tiny_pipe, row), spec, row["id"])
    assert verify(f"file://{tmp_path / 'out'}") == []
    return manifest


# One job on a mixed fleet of two gang shapes, read by the tests below (SP 2 alone goes through the job path in the
# killed-rank test, single replicas beside a gang in tests/test_sweep.py). 5 frames of 32x32 = 2 x 2 x 2 = 8
# tokens fit `short`; 9 frames (3 latent frames) or 48x32 = 12 go to `long`.
SHAPES = {"short": ParallelSpec(cfg=True), "long": ParallelSpec(ulysses=2, cfg=True)}
FLEET = ("cluster:\n  groups:\n"
         "    - {name: short, replicas: 1, max_tokens: 8, cfg_parallel: true}\n"
         "    - {name: long, replicas: 1, sequence_parallel: 2, cfg_parallel: true}\n")
MIXED_ROWS = [*ROWS, {"id": "owl", "prompt": "an owl at dusk"}, {"id": "bus", "prompt": "a bus", "num_frames": 9}]


@pytest.fixture(scope="module")
def mixed_fleet(tmp_path_factory, ray_local, tiny_pipe):
    tmp_path = tmp_path_factory.mktemp("mixed")
    (tmp_path / "fleet.yaml").write_text(FLEET)
    data = write_dataset(tmp_path / "prompts.parquet", MIXED_ROWS)
    cfg = load_config(str(tmp_path / "fleet.yaml"), [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}",
                                                     "output.format=npy", *TINY_RENDER])
    result = run(cfg, progress=False)
    return tmp_path, result, {r["id"]: r for r in read_manifest(Storage(f"file://{tmp_path / 'out'}")).to_pylist()}


@pytest.mark.parametrize("group", ["short", "long"], ids=["cfg2", "sp2xcfg2"])
def test_gang_job_frames_match_a_single_device(mixed_fleet, tiny_pipe, group):
    tmp_path, result, manifest = mixed_fleet
    assert result.ok == len(MIXED_ROWS) and result.restarts == 0
    storage = Storage(f"file://{tmp_path / 'out'}")
    rows = [row for row in manifest.values() if row["worker"].startswith(f"{group}/")]
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "ok" and row["gang"] == SHAPES[group].name
        frames = decode(storage.get_bytes(storage.key_of(row["uri"])), "npy")
        assert_like_one_device(frames, oracle(tiny_pipe, row), SHAPES[group], row["id"])
    assert verify(f"file://{tmp_path / 'out'}") == []


def test_mixed_fleet_routes_rows_by_size(mixed_fleet):
    _, _, manifest = mixed_fleet
    assert {i: manifest[i]["gang"] for i in ("cat", "koi", "owl")} == dict.fromkeys(("cat", "koi", "owl"), "cfg2")
    assert {i: manifest[i]["gang"] for i in ("car", "tall", "bus")} == dict.fromkeys(("car", "tall", "bus"),
                                                                                      "sp2xcfg2")
    assert all(manifest[i]["worker"].startswith("short/") for i in ("cat", "koi", "owl"))


def test_row_too_big_for_every_group_is_invalid(tmp_path, inprocess):
    # Routing is the driver's (intake/routing.py): in-process replicas render the row that fits.
    cfg = _config(tmp_path, ROWS[:2])
    cfg.cluster.groups = [type(cfg.cluster.replica_groups()[0])(name="small", replicas=1, max_tokens=8)]
    result = run(cfg, progress=False)
    manifest = {r["id"]: r for r in read_manifest(Storage(f"file://{tmp_path / 'out'}")).to_pylist()}
    assert (result.ok, result.invalid) == (1, 1)
    assert manifest["car"]["status"] == "invalid" and "max_tokens=8" in manifest["car"]["error"]


def test_gang_member_killed_mid_row_is_recovered(tmp_path, ray_local, tiny_pipe):
    rows = [{"id": f"r{i}", "prompt": f"scene {i}"} for i in range(8)]
    cfg = _config(tmp_path, rows, ["cluster.replicas=1", "cluster.sequence_parallel=2", "cluster.max_attempts=5"])
    storage = Storage(f"file://{tmp_path / 'out'}")
    killed = []

    def kill_one_rank():
        # Once the gang has committed a row, kill one of its ranks while it is inside a render
        # (Ray retitles a busy actor process `ray::RenderWorker.render`).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            busy = [p for p in _render_workers() if " ".join(p.cmdline()).startswith("ray::RenderWorker.render")]
            if storage.list("videos") and busy:
                os.kill(busy[-1].pid, signal.SIGKILL)
                killed.append(busy[-1].pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_rank, daemon=True)
    killer.start()
    result = run(cfg, progress=False)
    killer.join()
    assert killed and result.restarts >= 1
    manifest = _check_frames(tmp_path, tiny_pipe, ParallelSpec(ulysses=2))
    assert len(manifest) == len(rows)
    again = run(_config(tmp_path, rows, ["cluster.replicas=1", "cluster.sequence_parallel=2"]), progress=False)
    assert again.rendered == 0


@pytest.mark.parametrize("override, key", [
    (["cluster.sequence_parallel=3"], "cluster.sequence_parallel=3"),
    (["cluster.sequence_parallel=8", "cluster.cfg_parallel=true"], "cluster.sequence_parallel=8"),
])
def test_invalid_degree_is_refused_before_ray_starts(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        run(_config(tmp_path, ROWS, override), progress=False)
    assert "4 attention heads" in str(err.value)
    if key != "cluster.sequence_parallel=3":
        return  # the CLI path below is the same for every bad degree: run it once
    data = write_dataset(tmp_path / "p.parquet", ROWS)
    proc = subprocess.run([sys.executable, "-m", "kandinsky_batch", "run", "configs/tiny.yaml", f"input.path={data}",
                           f"output.uri={tmp_path / 'cli'}", *override], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and key in proc.stderr
    assert not (tmp_path / "ray").exists(), "no Ray may start for a config error"


def test_kandinsky6_cfg_gang_renders_clips_with_sound_as_one_device(tmp_path, ray_local):
    """Kandinsky 6 in a CFG-parallel gang through the job path: each clip, frames and waveform, equals the plain
    pipeline's on one device; sequence parallel (no plan for its fused video/audio blocks) is refused before Ray."""
    import numpy as np
    import torch
    from diffusers import Kandinsky6TI2VAPipeline

    from kandinsky_batch.output.video import decode_npz
    from pipelines import resolve_model

    rows = [{"id": "talk", "prompt": "a man talking"}, {"id": "rain", "prompt": "rain", "guidance_scale": 1.0}]
    shape = ["model.path=tiny-k6", "render.fps=24", "render.num_frames=5", "cluster.replicas=1"]
    result = run(_config(tmp_path, rows, [*shape, "cluster.cfg_parallel=true"]), progress=False)
    assert result.ok == 2 and result.restarts == 0
    storage = Storage(f"file://{tmp_path / 'out'}")
    pipe = Kandinsky6TI2VAPipeline.from_pretrained(resolve_model("tiny-k6"))
    pipe.set_progress_bar_config(disable=True)
    for row in read_manifest(storage).to_pylist():
        assert row["gang"] == "cfg2"
        frames, audio, _ = decode_npz(storage.get_bytes(storage.key_of(row["uri"])))
        want = pipe(prompt=row["prompt"], negative_prompt=row["negative_prompt"], height=row["height"],
                    width=row["width"], num_frames=5, num_inference_steps=row["num_inference_steps"],
                    guidance_scale=row["guidance_scale"], generator=torch.Generator("cpu").manual_seed(row["seed"]),
                    output_type="np")
        np.testing.assert_array_equal(frames, np.round(want.frames[0] * 255).astype(np.uint8), err_msg=row["id"])
        np.testing.assert_array_equal(audio, want.audio[:1], err_msg=row["id"])
    assert verify(f"file://{tmp_path / 'out'}") == []
    with pytest.raises(ConfigError, match="sequence_parallel=2: Kandinsky 6 has no sequence-parallel plan"):
        run(_config(tmp_path, rows, [*shape, "cluster.sequence_parallel=2"]), progress=False)
