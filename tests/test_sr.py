"""Kandinsky 6 super-resolution: the tiny-sr preset is a real diffusers checkpoint, SRRenderer keeps the seed contract,
and an sr job upscales another job's ok videos (its manifest is the input), keeping their sound and recording the
source row, with resume and verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Kandinsky6SRPipeline

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.intake.dataset import InputError
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.intake.job_output import SourceManifest, encode_upscaled, read_source
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode_av, decode_npz, encode_av
from pipelines import resolve_model
from pipelines.kinds import Clip
from pipelines.models import load_spec
from pipelines.limits_sr import sr_option_problems, upscaled_size
from pipelines.render_sr import SRRenderer
from pipelines.request import RenderOptions, RenderRequest
from tests.helpers import write_dataset


@pytest.fixture(scope="module")
def sr_pipe(model_cache):
    """The plain diffusers pipeline, loaded as any checkpoint is: the oracle."""
    pipe = Kandinsky6SRPipeline.from_pretrained(resolve_model("tiny-sr"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def _plain(pipe, frames: np.ndarray, scale: float, steps: int, seed: int) -> np.ndarray:
    out = pipe(video=frames.astype(np.float32) / 255, resolution_scale=scale, num_inference_steps=steps,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return np.round(out.frames[0] * 255).astype(np.uint8)


@pytest.mark.parametrize("height, width, scale", [(64, 64, 2), (64, 128, 2.25), (64, 80, 2.25), (64, 64, 4),
                                                   (80, 64, 2.25)])
def test_output_size_is_what_the_pipeline_renders(height, width, scale, sr_pipe):
    # One frame (1 + 4k with k = 0) keeps this cheap; sizes come from the tiles, not the frame count. 80x64 at
    # 2.25 is pre-upscaled to 96x64, whose tile (256x128 over 2) does not fit: both refuse it.
    try:
        want = upscaled_size(height, width, scale, sr_pipe.transformer_tile_sizes)
    except ValueError as exc:
        assert "too small for resolution_scale=2.25" in str(exc)
        with pytest.raises(ValueError, match="must be at least 128x64 pixels"):
            _plain(sr_pipe, _clip(1, height, width), scale, 1, 0)
        return
    assert _plain(sr_pipe, _clip(1, height, width), scale, 1, 0).shape[1:3] == want


def test_sizes_the_pipeline_would_change_or_cannot_tile_are_refused(sr_pipe):
    tiles = sr_pipe.transformer_tile_sizes
    with pytest.raises(ValueError, match="source width=72: must be a multiple of 16"):
        upscaled_size(64, 72, 2, tiles)
    with pytest.raises(ValueError, match=r"source height x width=48x48: too small for resolution_scale=2 "
                                         r"\(rule: at least 64x64"):
        upscaled_size(48, 48, 2, tiles)
    with pytest.raises(ValueError, match="resolution_scale=3: must be one of 2, 2.25, 4"):
        upscaled_size(64, 64, 3, tiles)
    spec = load_spec("tiny-sr")
    assert (spec.kind, spec.spatial_multiple, spec.temporal_multiple, spec.tile_sizes) == ("sr", 16, 4, tiles)


def test_renderer_equals_plain_diffusers_and_passes_the_sound_through(sr_pipe, model_cache):
    renderer = SRRenderer("tiny-sr", device="cpu", options=RenderOptions(resolution_scale=2))
    frames = _clip(5, 64, 64, seed=1)
    audio = np.random.default_rng(2).uniform(-1, 1, (1, 9000)).astype(np.float32)
    request = RenderRequest(prompt=None, negative_prompt=None, height=128, width=128, num_frames=5,
                            num_inference_steps=2, guidance_scale=1.0, seed=7,
                            video=Clip(frames=frames, audio=audio, sample_rate=44100))
    out = renderer.render(request)
    np.testing.assert_array_equal(out.frames, _plain(sr_pipe, frames, 2, 2, 7))
    assert out.audio is audio and out.sample_rate == 44100
    # Frames alone give frames alone; another seed other frames.
    other = renderer.render(RenderRequest(**{**request.__dict__, "seed": 8, "video": frames}))
    assert isinstance(other, np.ndarray) and not np.array_equal(other, out.frames)
    with pytest.raises(ValueError, match="the 64x64x5 source upscales to 128x128x5 at resolution_scale=2"):
        renderer.render(RenderRequest(**{**request.__dict__, "height": 144}))
    assert sr_option_problems(RenderOptions(cache="magcache"))[0].startswith("cache='magcache': not for Kandinsky 6 SR")


def test_source_clips_are_read_with_their_sound_and_checked(tmp_path):
    import hashlib

    frames = _clip(5, 64, 64)
    audio = np.sin(np.linspace(0, 200, 8192, dtype=np.float32))[None] * 0.5
    data = encode_av(frames, audio, 44100, 24)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    clip = read_source(str(path), hashlib.sha256(data).hexdigest())
    want_frames, want_audio, _ = decode_av(data)
    np.testing.assert_array_equal(clip.frames, want_frames)
    np.testing.assert_array_equal(clip.audio, want_audio)
    assert clip.sample_rate == 44100
    with pytest.raises(ValueError, match="changed since its job committed it"):
        read_source(str(path), "0" * 64)
    # The upscaled mp4 takes the source's AAC stream as it is: its sound decodes exactly as the source's.
    upscaled = _clip(5, 128, 128, seed=3)
    out = encode_upscaled(Clip(frames=upscaled, audio=clip.audio, sample_rate=44100), clip, "mp4", 24)
    got_frames, got_audio, rate = decode_av(out)
    np.testing.assert_array_equal(got_audio, want_audio)
    assert got_frames.shape == upscaled.shape and rate == 44100


@pytest.mark.slow
def test_upscale_job_renders_another_jobs_ok_videos_as_plain_diffusers(tmp_path, inprocess, sr_pipe):
    rows = [{"id": "cat", "prompt": "a cat meowing", "caption": "meow"},
            {"id": "dog", "prompt": "a dog barking", "caption": "woof"},
            {"id": "odd", "prompt": "six frames", "num_frames": 6, "caption": None}]
    data = write_dataset(tmp_path / "in.parquet", rows)
    common = ["render.num_inference_steps=2", "render.fps=24", "cluster.replicas=1", "output.format=npy"]
    source = load_config(None, [f"input.path={data}", f"output.uri={tmp_path / 'k6'}", "model.path=tiny-k6",
                                "render.height=64", "render.width=64", "render.num_frames=9", *common])
    first = run(source, progress=False)
    assert (first.ok, first.invalid) == (2, 1)
    # The first stage's output, moved since its job wrote it: its manifest's keys resolve where it is now.
    (tmp_path / "k6").rename(tmp_path / "k6-moved")
    source.output.uri = str(tmp_path / "k6-moved")
    cfg = load_config(None, [f"input.path={tmp_path / 'k6-moved'}", f"output.uri={tmp_path / 'sr'}",
                             "model.path=tiny-sr", "model.resolution_scale=2", *common])
    result = run(cfg, progress=False)
    assert (result.ok, result.invalid) == (2, 1)
    src = {r["id"]: r for r in read_manifest(Storage(source.output.uri)).to_pylist()}
    storage = Storage(cfg.output.uri)
    manifest = {r["id"]: r for r in read_manifest(storage).to_pylist()}
    for rid in ("cat", "dog"):
        row, before = manifest[rid], src[rid]
        # The source row, recorded: its video and checksum, prompt and seed; the output is twice its size.
        assert (row["source_uri"], row["source_sha256"]) == (before["uri"], before["sha256"])
        assert (row["prompt"], row["seed"], row["num_frames"]) == (before["prompt"], before["seed"], 9)
        assert row["caption"] == before["caption"] == {"cat": "meow", "dog": "woof"}[rid]  # carried through both stages
        assert (row["height"], row["width"], row["guidance_scale"]) == (128, 128, 1.0)
        assert json.loads(row["options"]) == {"resolution_scale": 2.0} and row["uri"].endswith(f"/videos/{rid}.npz")
        frames, audio, rate = decode_npz(storage.get_bytes(storage.key_of(row["uri"])))
        src_frames, src_audio, src_rate = decode_npz(Storage(source.output.uri).get_bytes(
            Storage(source.output.uri).key_of(before["uri"])))
        np.testing.assert_array_equal(frames, _plain(sr_pipe, src_frames, 2, 2, row["seed"]), err_msg=rid)
        np.testing.assert_array_equal(audio, src_audio)  # the sound, untouched
        assert (rate, row["audio_seconds"]) == (src_rate, before["audio_seconds"])
    assert manifest["odd"]["status"] == "invalid"
    assert manifest["odd"]["error"].startswith("source status='invalid': only the source job's ok rows are upscaled "
                                               "(the source row: num_frames=6")
    assert verify(cfg.output.uri) == []
    assert run(cfg, progress=False).rendered == 0  # resume: nothing twice
    # Another scale is another output: refused on the same prefix without --force.
    with pytest.raises(Exception, match="resolution_scale"):
        run(load_config(None, [f"input.path={tmp_path / 'k6-moved'}", f"output.uri={tmp_path / 'sr'}",
                               "model.path=tiny-sr", "model.resolution_scale=4", *common]), progress=False)


def test_inputs_and_configs_an_upscale_cannot_take_are_refused_before_ray(tmp_path, model_cache):
    data = write_dataset(tmp_path / "in.parquet", [{"prompt": "a cat"}])
    with pytest.raises(ConfigError, match="tiny-sr is an sr model: it upscales another job's videos, so "
                                          "input.path must be that job's output.uri"):
        run(load_config(None, [f"input.path={data}", f"output.uri={tmp_path / 'o'}", "model.path=tiny-sr"]))
    unfinished = tmp_path / "unfinished"
    (unfinished / "manifest").mkdir(parents=True)
    with pytest.raises(InputError, match="has not finished"):
        SourceManifest(str(unfinished))
    with pytest.raises(ConfigError, match=r"model.resolution_scale=2.0: only Kandinsky 6 SR upscales \(t2v does not\)"):
        run(load_config(None, [f"input.path={data}", f"output.uri={tmp_path / 'o'}", "model.resolution_scale=2"]))
    with pytest.raises(ConfigError, match="sequence_parallel: Kandinsky 6 SR has no guidance"):
        run(load_config(None, [f"input.path={data}", f"output.uri={tmp_path / 'o'}", "model.path=tiny-sr",
                               "cluster.sequence_parallel=2"]))


def test_source_rows_are_checked_one_by_one(tmp_path, model_cache):
    """The rules of an upscale's rows (no Ray): only the source's ok videos, at the job's frame rate, that the model
    can tile; each other row is invalid naming the source field and the rule, and the rest stay valid."""
    import pyarrow as pa

    from kandinsky_batch.intake.ids import IdIndex
    from kandinsky_batch.intake.rows import RowValidator
    from kandinsky_batch.intake.job_output import SCHEMA

    def source(rid, **changes):
        row = dict(id=rid, prompt="a cat", seed=3, source_uri=f"file:///src/videos/{rid}.mp4", source_sha256="ab" * 32,
                   source_status="ok", source_error=None, source_height=64, source_width=64, source_frames=9,
                   source_fps=24, source_format="mp4", source_audio_rate=44100, source_model="tiny-k6")
        return {**row, **changes}

    rows = [source("ok"), source("slow", source_fps=8), source("still", source_format="png", source_frames=1,
                                                                 source_uri="file:///src/videos/still.png"),
            source("small", source_height=48, source_width=48), source("odd", source_frames=6),
            source("gone", source_status="failed", source_error="RuntimeError: boom", source_uri=None)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    cfg = load_config(None, ["input.path=x", "output.uri=y", "model.path=tiny-sr", "model.resolution_scale=2",
                             "render.fps=24", "render.num_inference_steps=2"])
    validated = RowValidator(cfg, load_spec("tiny-sr"), IdIndex.build(table["id"], 6, "mp4")).validate(
        table, np.arange(6))
    [task] = validated.task_list()
    assert (task.id, task.height, task.width, task.num_frames, task.seed) == ("ok", 128, 128, 9, 3)
    assert (task.source_uri, task.guidance_scale, task.negative_prompt) == (rows[0]["source_uri"], 1.0, None)
    errors = {r["id"]: r["error"] for r in validated.invalid}
    assert errors["slow"].startswith("source fps=8: the upscaled clip is written at render.fps=24")
    assert errors["still"].startswith("source format='png': not a video")
    assert errors["small"].startswith("source height x width=48x48: too small for resolution_scale=2")
    assert errors["odd"].startswith("num_frames=6: must be 4k+1")
    assert errors["gone"] == ("source status='failed': only the source job's ok rows are upscaled (the source row: "
                              "RuntimeError: boom)")


def test_an_upscale_without_render_fps_writes_each_clip_at_its_sources(model_cache):
    """render.fps unset (configs/tiny-sr.yaml): sources of mixed frame rates all upscale, each at its own; set, the
    rule stays (tests above)."""
    import pyarrow as pa

    from kandinsky_batch.output.record import Stamp
    from kandinsky_batch.intake.ids import IdIndex
    from kandinsky_batch.intake.rows import RowValidator
    from kandinsky_batch.intake.job_output import SCHEMA

    rows = [dict(id=rid, prompt="a cat", seed=3, source_uri=f"file:///src/videos/{rid}.mp4", source_sha256="ab" * 32,
                 source_status="ok", source_error=None, source_height=64, source_width=64, source_frames=9,
                 source_fps=fps, source_format="mp4", source_audio_rate=None, source_model="tiny")
            for rid, fps in (("k6", 24), ("demo", 8))]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny-sr.yaml"))
    assert cfg.render.fps is None and cfg.render.written_fps(upscales=True) is None
    assert cfg.render.written_fps(upscales=False) == 24  # generation's default
    validated = RowValidator(cfg, load_spec("tiny-sr"), IdIndex.build(table["id"], 2, "mp4")).validate(
        table, np.arange(2))
    assert validated.invalid == []
    stamp = Stamp(model="tiny-sr", format="mp4", fps=cfg.render.written_fps(upscales=True))
    assert {t.id: stamp.row(t.row())["fps"] for t in validated.task_list()} == {"k6": 24, "demo": 8}
    assert Stamp(model="tiny", format="mp4", fps=24).row({"fps": None})["fps"] == 24  # a job's rate wins when set
