"""Gangs through the whole job path on a local Ray (CPU ranks, gloo on loopback).

Oracles: frames bit-identical to plain diffusers on one device (sequence parallel: within its tolerance); a killed
rank loses nothing. Every rank is an actor that loads a real model, so three jobs run every gang shape once for
the tests that read them: a mixed fleet (CFG 2 and SP 2 x CFG 2 groups), a sweep (single replicas beside a
Kandinsky 6 CFG gang) and a NABLA SP 2 job whose gang loses a rank mid-row.
"""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode, decode_npz
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


def _config(tmp_path, rows, extra=(), config=None):
    data = write_dataset(tmp_path / "prompts.parquet", rows)
    return load_config(config, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", "output.format=npy",
                                *TINY_RENDER, *extra])


def _manifest(tmp_path) -> dict[str, dict]:
    return {r["id"]: r for r in read_manifest(Storage(f"file://{tmp_path / 'out'}")).to_pylist()}


# One job on a mixed fleet of two gang shapes, read by the tests below (SP 2 alone goes through the job path in the
# killed-rank job). 5 frames of 32x32 = 2 x 2 x 2 = 8 tokens fit `short`; 9 frames (3 latent frames) or 48x32 = 12
# go to `long`.
SHAPES = {"short": ParallelSpec(cfg=True), "long": ParallelSpec(ulysses=2, cfg=True)}
FLEET = ("cluster:\n  groups:\n"
         "    - {name: short, replicas: 1, max_tokens: 8, cfg_parallel: true}\n"
         "    - {name: long, replicas: 1, sequence_parallel: 2, cfg_parallel: true}\n")
MIXED_ROWS = [*ROWS, {"id": "owl", "prompt": "an owl at dusk"}, {"id": "bus", "prompt": "a bus", "num_frames": 9}]


@pytest.fixture(scope="module")
def mixed_fleet(tmp_path_factory, ray_local):
    tmp_path = tmp_path_factory.mktemp("mixed")
    (tmp_path / "fleet.yaml").write_text(FLEET)
    result = run(_config(tmp_path, MIXED_ROWS, config=str(tmp_path / "fleet.yaml")), progress=False)
    return tmp_path, result, _manifest(tmp_path)


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
    manifest = _manifest(tmp_path)
    assert (result.ok, result.invalid) == (1, 1)
    assert manifest["car"]["status"] == "invalid" and "max_tokens=8" in manifest["car"]["error"]


# A sweep whose models share the fleet: `single` on single-rank replicas, `k6` (Kandinsky 6, frames with sound) on
# CFG-parallel gangs of 2. Three units: a single replica and the gang at once (the gang's pool is listed first, so
# it wins the tie for the last two units and `single` starts one replica, not two).
SWEEP_ROWS = [{"id": "talk", "prompt": "a man talking"}, {"id": "rain", "prompt": "rain", "guidance_scale": 1.0}]
SWEEP = ("sweep.model=[{name: k6, path: tiny-k6, cluster: {cfg_parallel: true}}, {name: single, path: tiny}]",
         "render.fps=24", "cluster.replicas=3")
K6_SHAPE = ["model.path=tiny-k6", "render.fps=24", "render.num_frames=5", "cluster.replicas=1"]


@pytest.fixture(scope="module")
def sweep_job(tmp_path_factory, ray_local):
    tmp_path = tmp_path_factory.mktemp("sweep")
    result = run(_config(tmp_path, SWEEP_ROWS, SWEEP), progress=False)
    return tmp_path, result, _manifest(tmp_path)


@pytest.fixture(scope="module")
def k6_clips(sweep_job) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What the plain Kandinsky 6 pipeline renders on one device for each `k6` cell: (uint8 frames, waveform)."""
    import torch
    from diffusers import Kandinsky6TI2VAPipeline

    from pipelines import resolve_model

    pipe = Kandinsky6TI2VAPipeline.from_pretrained(resolve_model("tiny-k6"))
    pipe.set_progress_bar_config(disable=True)
    clips = {}
    for row in sweep_job[2].values():
        if row["model"] == "tiny-k6":
            want = pipe(prompt=row["prompt"], negative_prompt=row["negative_prompt"], height=row["height"],
                        width=row["width"], num_frames=5, num_inference_steps=row["num_inference_steps"],
                        guidance_scale=row["guidance_scale"],
                        generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np")
            clips[row["id"]] = (np.round(want.frames[0] * 255).astype(np.uint8), want.audio[:1])
    return clips


def test_a_model_of_a_sweep_can_run_as_a_gang_beside_single_replicas(sweep_job, tiny_pipe, k6_clips):
    """One model on single-rank replicas, the other on CFG-parallel gangs of 2 (bit-identical to one device)."""
    tmp_path, result, manifest = sweep_job
    assert (result.rows, result.ok) == (4, 4)
    storage = Storage(f"file://{tmp_path / 'out'}")
    for row in manifest.values():
        label = json.loads(row["sweep"])["model"]
        assert row["gang"] == {"single": "1", "k6": "cfg2"}[label] and row["worker"].startswith(label + "/")
        data = storage.get_bytes(storage.key_of(row["uri"]))
        if label == "single":
            np.testing.assert_array_equal(decode(data, "npy"), oracle(tiny_pipe, row), err_msg=row["id"])
        else:
            np.testing.assert_array_equal(decode_npz(data)[0], k6_clips[row["id"]][0], err_msg=row["id"])


def test_kandinsky6_cfg_gang_renders_clips_with_sound_as_one_device(tmp_path, sweep_job, k6_clips):
    """Kandinsky 6 in a CFG-parallel gang through the job path: each clip, frames and waveform, equals the plain
    pipeline's on one device; sequence parallel (no plan for its fused video/audio blocks) is refused before Ray."""
    out, result, manifest = sweep_job
    assert result.ok == 4 and result.restarts == 0
    storage = Storage(f"file://{out / 'out'}")
    rows = [row for row in manifest.values() if row["model"] == "tiny-k6"]
    assert sorted(r["id"] for r in rows) == ["rain__k6", "talk__k6"]
    for row in rows:
        assert row["gang"] == "cfg2"
        frames, audio, _ = decode_npz(storage.get_bytes(storage.key_of(row["uri"])))
        np.testing.assert_array_equal(frames, k6_clips[row["id"]][0], err_msg=row["id"])
        np.testing.assert_array_equal(audio, k6_clips[row["id"]][1], err_msg=row["id"])
    assert verify(f"file://{out / 'out'}") == []
    with pytest.raises(ConfigError, match="sequence_parallel=2: Kandinsky 6 has no sequence-parallel plan"):
        run(_config(tmp_path, SWEEP_ROWS, [*K6_SHAPE, "cluster.sequence_parallel=2"]), progress=False)


# NABLA on an SP 2 gang, one of whose ranks is SIGKILLed mid-row: NABLA tiles 8x8 latent patches, so every row is
# 128 px but `small` (invalid, not rendered); `a` is 9 frames (3 latent frames), the `scene` rows 5.
NABLA_ROWS = [{"id": "a", "prompt": "a cat dancing", "num_frames": 9},
              {"id": "small", "prompt": "a dog", "height": 64, "width": 64},
              *({"id": f"scene{i}", "prompt": f"scene {i}"} for i in range(3))]
NABLA_GANG = ["render.height=128", "render.width=128", "model.attention_type=nabla", "cluster.replicas=1",
              "cluster.sequence_parallel=2"]


@pytest.fixture(scope="module")
def killed_gang(tmp_path_factory, ray_local):
    tmp_path = tmp_path_factory.mktemp("killed")
    storage = Storage(f"file://{tmp_path / 'out'}")
    killed, finished = [], threading.Event()

    def kill_one_rank():
        # Once the gang has committed a row, kill one of its ranks while it is inside a render
        # (Ray retitles a busy actor process `ray::RenderWorker.render`), however long the start takes on a busy host.
        # The process table is read only once a row is committed: it costs far more than a listing.
        while not finished.is_set():
            if storage.list("videos"):
                busy = [p for p in _render_workers() if " ".join(p.cmdline()).startswith("ray::RenderWorker.render")]
                if busy:
                    os.kill(busy[-1].pid, signal.SIGKILL)
                    killed.append(busy[-1].pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_rank, daemon=True)
    killer.start()
    try:
        result = run(_config(tmp_path, NABLA_ROWS, [*NABLA_GANG, "cluster.max_attempts=5"]), progress=False)
    finally:
        finished.set()  # a job that ended before any rank was killed fails `killed` below
        killer.join()
    again = run(_config(tmp_path, NABLA_ROWS, NABLA_GANG), progress=False)
    return tmp_path, result, killed, again


@pytest.fixture(scope="module")
def nabla_one_device(killed_gang, nabla_pipe) -> dict[str, np.ndarray]:
    """Plain diffusers with NABLA on one device, per ok row of the killed gang's job."""
    return {row["id"]: oracle(nabla_pipe, row) for row in _manifest(killed_gang[0]).values() if row["status"] == "ok"}


def test_gang_member_killed_mid_row_is_recovered(killed_gang, nabla_one_device):
    tmp_path, result, killed, again = killed_gang
    assert killed and result.restarts >= 1
    manifest = _manifest(tmp_path)
    assert len(manifest) == len(NABLA_ROWS)
    storage = Storage(f"file://{tmp_path / 'out'}")
    for row in manifest.values():
        if row["id"] == "small":
            continue  # invalid, not rendered (test_nabla_gang_job_records_approximate_sparse_attention)
        assert row["status"] == "ok" and row["gang"] == "sp2"
        frames = decode(storage.get_bytes(storage.key_of(row["uri"])), "npy")
        assert_like_one_device(frames, nabla_one_device[row["id"]], ParallelSpec(ulysses=2), row["id"])
    assert verify(f"file://{tmp_path / 'out'}") == []
    assert again.rendered == 0


def test_nabla_gang_job_records_approximate_sparse_attention(killed_gang, nabla_one_device):
    manifest = _manifest(killed_gang[0])
    ok, small = manifest["a"], manifest["small"]
    assert ok["status"] == "ok" and ok["approximate"] is True and ok["gang"] == "sp2"
    assert json.loads(ok["options"]) == {"attention_backend": "flex", "attention_type": "nabla"}
    assert_like_one_device(np.load(ok["uri"].removeprefix("file://")), nabla_one_device["a"], ParallelSpec(ulysses=2))
    # NABLA tiles 8x8 latent patches: 64 px is not a multiple of 128, so the row is invalid, not rendered.
    assert small["status"] == "invalid" and "multiple of 128" in small["error"]


@pytest.mark.parametrize("override, key", [
    (["cluster.sequence_parallel=3"], "cluster.sequence_parallel=3"),
    (["cluster.sequence_parallel=8", "cluster.cfg_parallel=true"], "cluster.sequence_parallel=8"),
])
def test_invalid_degree_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys, override, key):
    import ray

    from kandinsky_batch.cli import main
    from kandinsky_batch.fleet import cluster

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        run(_config(tmp_path, ROWS, override), progress=False)
    assert "4 attention heads" in str(err.value)
    if key != "cluster.sequence_parallel=3":
        return  # the CLI path below is the same for every bad degree: run it once

    def no_ray(*args, **kwargs):
        raise AssertionError("no Ray may start for a config error")

    monkeypatch.setattr(cluster, "connect", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    data = write_dataset(tmp_path / "p.parquet", ROWS)
    code = main(["run", os.path.join(ROOT, "configs/tiny.yaml"), f"input.path={data}", f"output.uri={tmp_path / 'cli'}", *override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and key in err
