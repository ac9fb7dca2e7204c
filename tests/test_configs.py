"""configs/*.yaml load through the schema with the published defaults; bad configs fail naming key and value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PLACEHOLDERS = ["input.path=x", "output.uri=y"]

# variant -> (num_inference_steps, guidance_scale): Kandinsky 5.0 T2V Lite defaults (shared/FACTS.md).
LITE = {"sft": (50, 5.0), "nocfg": (50, 1.0), "distilled16steps": (16, 1.0), "pretrain": (50, 5.0)}
FRAMES = {"5s": 121, "10s": 241}


def test_every_lite_variant_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {f"lite-{v}-{d}" for v in LITE for d in FRAMES} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    cfg = load_config(str(path), PLACEHOLDERS)
    assert (cfg.input.path, cfg.output.uri) == ("x", "y")
    assert cfg.cluster.address is None, "the submit recipe passes cluster.address, not the YAML"


@pytest.mark.parametrize("variant", LITE)
@pytest.mark.parametrize("duration", FRAMES)
def test_lite_config_carries_published_defaults(variant, duration):
    cfg = load_config(str(ROOT / "configs" / f"lite-{variant}-{duration}.yaml"), PLACEHOLDERS)
    steps, guidance = LITE[variant]
    assert cfg.model.path == f"kandinskylab/Kandinsky-5.0-T2V-Lite-{variant}-{duration}-Diffusers"
    assert (cfg.render.num_inference_steps, cfg.render.guidance_scale) == (steps, guidance)
    assert (cfg.render.num_frames, cfg.render.fps) == (FRAMES[duration], 24)
    assert (cfg.render.height, cfg.render.width) == (512, 768)


# config -> (model id, num_inference_steps, guidance_scale, num_frames, (height, width)): published defaults of the
# checkpoints added beside Lite (each config's header comment names its sources). Distilled checkpoints run without
# guidance; Kandinsky 6 distill's 10 steps are diffusers' docs table (its 0.42.1 docstring example still says 16).
PUBLISHED = {
    "pro-t2v-distilled-5s": ("kandinskylab/Kandinsky-5.0-T2V-Pro-distilled-5s-Diffusers", 16, 1.0, 121, (768, 1024)),
    "pro-i2v-distilled-5s": ("kandinskylab/Kandinsky-5.0-I2V-Pro-distilled-5s-Diffusers", 16, 1.0, 121, (512, 768)),
    "i2v-lite-5s": ("kandinskylab/Kandinsky-5.0-I2V-Lite-5s-Diffusers", 50, 5.0, 121, (512, 768)),
    "k6-lite-distill-5s": ("kandinskylab/Kandinsky-6.0-Lite-distill-5s-Diffusers", 10, 1.0, 121, (480, 864)),
    "k6-pro-distill-5s": ("kandinskylab/Kandinsky-6.0-Pro-distill-5s-Diffusers", 10, 1.0, 121, (480, 864)),
}
PRO = {"pro-t2v-distilled-5s", "pro-i2v-distilled-5s", "k6-pro-distill-5s"}  # their memory plans offload the encoders


@pytest.mark.parametrize("name", PUBLISHED)
def test_config_carries_published_defaults(name):
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    model_id, steps, guidance, frames, size = PUBLISHED[name]
    assert cfg.model.path == model_id
    assert (cfg.render.num_inference_steps, cfg.render.guidance_scale) == (steps, guidance)
    assert (cfg.render.num_frames, cfg.render.fps) == (frames, 24)
    assert (cfg.render.height, cfg.render.width) == size
    assert cfg.model.offload_text_encoder == (name in PRO)
    assert (cfg.output.format, cfg.output.uri) == ("mp4", f"s3://your-bucket/renders/{name}")
    assert cfg.input.path.startswith("s3://your-bucket/"), "a placeholder meant to be overridden"


def test_the_lite_sweep_renders_each_variant_at_its_published_defaults():
    from kandinsky_batch.config.sweep import Sweep

    sweep = Sweep.parse(load_config(str(ROOT / "configs" / "lite-5s-sweep.yaml"), PLACEHOLDERS))
    for variant in sweep.models:
        name = variant.label.removesuffix("-magcache")
        assert variant.model.path == f"kandinskylab/Kandinsky-5.0-T2V-Lite-{name}-5s-Diffusers"
        assert (variant.render.num_inference_steps, variant.render.guidance_scale) == LITE[name]
        assert (variant.render.num_frames, variant.render.height, variant.render.width) == (121, 512, 768)
    assert [m.model.cache for m in sweep.models] == [None, "magcache", None, None]
    assert [c.values["seed"] for c in sweep.cells] == [0, 1, 2, 3]


def test_lite_placeholders_are_meant_to_be_overridden():
    for path in ROOT.glob("configs/lite-*.yaml"):
        cfg = load_config(str(path))
        assert cfg.input.path.startswith("s3://your-bucket/"), path.name
        assert cfg.output.uri == f"s3://your-bucket/renders/{path.stem}"


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("render.bogus=7777", "render.bogus", "7777"),
        ("render.height=tall", "render.height", "tall"),
        ("render.num_frames=16", "render.num_frames", "16"),
        ("output.format=gif", "output.format", "gif"),
    ],
    ids=["unknown-key", "wrong-type", "num-frames-not-4k+1", "unknown-format"],
)
def test_bad_value_names_key_and_value(override, key, value):
    with pytest.raises(ConfigError) as info:
        load_config(str(ROOT / "configs" / "tiny.yaml"), [override])
    message = str(info.value)
    assert key in message and value in message, message


def test_missing_output_uri_is_named(tmp_path):
    config = tmp_path / "no-output.yaml"
    config.write_text("input:\n  path: prompts.parquet\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(config))
    assert "output.uri" in str(info.value) and "missing" in str(info.value), str(info.value)


def test_cli_rejects_unknown_key_before_ray_starts(tmp_path):
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}  # a Ray that started would leave tmp_path/ray behind
    proc = subprocess.run(
        [sys.executable, "-m", "kandinsky_batch", "run", "configs/tiny.yaml", "bogus.key=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bogus" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "ray").exists(), "Ray started before the config was checked"


@pytest.mark.parametrize("name, model_id, steps", [
    ("k6-sr-distilled2steps-5s", "kandinskylab/Kandinsky-6.0-VSR-distilled2steps-5s-Diffusers", 2),
    ("k6-sr-5s", "kandinskylab/Kandinsky-6.0-VSR-5s-Diffusers", 4),
])
def test_super_resolution_configs_upscale_another_jobs_output(name, model_id, steps):
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    assert (cfg.model.path, cfg.render.num_inference_steps, cfg.model.resolution_scale) == (model_id, steps, 2.25)
    assert cfg.model.compile, "eager flex attention materialises the whole attention matrix (the pipeline's docs)"
    assert cfg.input.path.startswith("s3://your-bucket/renders/"), "the input is a job's output.uri"


def test_relative_paths_in_a_config_resolve_against_its_folder(tmp_path, monkeypatch):
    """Local paths in the file are the file's (`../jobs/x`), on the command line the working directory's; hub ids,
    presets and URIs stay as they are."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "job.yaml").write_text(
        "input:\n  path: ../jobs/prompts.parquet\noutput:\n  uri: out\nmodel:\n  path: ./models/mine\n"
        "sweep:\n  model: [tiny, ../models/b, {name: c, path: ./c}, kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers]\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/job.yaml")
    assert (cfg.input.path, cfg.output.uri, cfg.model.path) == ("jobs/prompts.parquet", "configs/out",
                                                               "configs/models/mine")
    assert cfg.sweep["model"][:2] == ["tiny", "models/b"] and cfg.sweep["model"][2]["path"] == "configs/c"
    assert cfg.sweep["model"][3] == "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    cfg = load_config(str(folder / "job.yaml"), ["output.uri=./here", "input.path=s3://b/p", "model.path=tiny"])
    assert (cfg.input.path, cfg.output.uri, cfg.model.path) == ("s3://b/p", "./here", "tiny")
    demo = load_config(str(ROOT / "configs" / "tiny.yaml"))
    assert (demo.input.path, demo.output.uri) == (str(ROOT / "jobs" / "prompts.parquet"), str(ROOT / "outputs" / "demo"))


@pytest.mark.parametrize("text, said", [
    ("- input\n- output\n", "expected a mapping of sections (input, output, model, render, cluster, sweep), got a list"),
    ("just words\n", "expected a mapping of sections (input, output, model, render, cluster, sweep), got a str"),
    ("input:\n  path: [a,\n", "not valid YAML: line 3, column 1:"),
])
def test_a_config_file_that_is_not_a_mapping_says_where(tmp_path, text, said):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "c.yaml"))
    assert str(info.value).startswith(f"config file '{tmp_path / 'c.yaml'}': {said}"), str(info.value)
    assert "\n" not in str(info.value)
