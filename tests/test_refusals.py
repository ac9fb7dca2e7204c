"""Every refusal docs/configuration.md lists (its "Refusals" table), through the real CLI: one `error:` line,
exit 2, no traceback, nothing written, and Ray never imported (let alone started). Then the exits of a job that
finished with too little rendered ok."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.cli import EXIT_NOTHING_OK, EXIT_OK, EXIT_USAGE
from kandinsky_batch.output.video import encode
from tests.cli_batch import run_here

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def presets(model_cache):
    """The tiny presets the cases load, built once here, so the CLI runs find them cached (and print nothing else)."""
    from pipelines import resolve_model

    for name in ("tiny", "tiny-i2v", "tiny-t2i", "tiny-sr"):
        resolve_model(name, spec_only=True)


def _dataset(path: Path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _env(tmp: Path, env: dict | None = None) -> dict:
    return {"HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(tmp / "ray-tmp"),
            **(env or {})}


def _cli(args: list[str], tmp: Path, env: dict | None = None) -> SimpleNamespace:
    """A finishing run through the CLI's entry point in this process (tests/cli_batch.py: its own environment,
    stdout and stderr captured at the descriptors); the refusals' fresh process is the `refused` fixture's."""
    result = run_here({"args": args, "env": _env(tmp, env), "cwd": str(ROOT)})
    return SimpleNamespace(returncode=result["returncode"], stdout=result["stdout"], stderr=result["stderr"])


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def _adopted_output(tmp: Path, prompts: list[str], out: Path) -> str:
    """An output whose rows are all committed without Ray: each row's video is put under its key first (as a driver
    that died after its uploads leaves them), so the run adopts every one and renders nothing."""
    data = _dataset(tmp / "positional.parquet", prompt=prompts)
    frames = np.zeros((17, 64, 64, 3), np.uint8)  # configs/tiny.yaml's frames and size
    (out / "videos").mkdir(parents=True)
    renderable = [i for i, prompt in enumerate(prompts) if prompt.strip()]
    for i in renderable:
        (out / "videos" / f"{i}.npy").write_bytes(encode(frames, "npy", 8))
    proc = _cli(["run", "configs/tiny.yaml", f"input.path={data}", f"output.uri={out}", "output.format=npy",
                 "--no-progress"], tmp)
    assert proc.returncode == EXIT_OK and f"{len(renderable)} adopted" in proc.stdout, proc.stderr
    return data


def _case(name: str, tmp: Path, s3: dict):
    """(CLI args, extra env, what the error line must say, an output prefix that exists already or None)."""
    out = tmp / "out"
    run = ["run", "configs/tiny.yaml", f"output.uri={out}"]
    prompts = _dataset(tmp / "prompts.parquet", prompt=["a cat", "a dog"])
    endpoint, bucket = s3["client_kwargs"]["endpoint_url"], "kb-test"
    s3_opts = f"output.storage_options={json.dumps(s3).replace(' ', '')}"
    (tmp / "not-an-output").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("x")
    if name == "config-missing":
        return ["run", str(tmp / "nope.yaml")], {}, "no such file", None
    if name == "yaml-syntax":
        (tmp / "bad.yaml").write_text("input:\n  path: a: b\n")
        return (["run", str(tmp / "bad.yaml")], {},
                "bad.yaml': not valid YAML: line 2, column 10: mapping values are not allowed here", None)
    if name == "yaml-list":
        (tmp / "list.yaml").write_text("- input\n- output\n")
        return ["run", str(tmp / "list.yaml")], {}, "expected a mapping of sections (input, output", None
    if name == "unknown-key":
        return [*run, "bogus.key=1"], {}, "bogus.key", None
    if name == "bad-value":
        return [*run, "render.num_frames=16"], {}, "render.num_frames=16", None
    if name == "override-without-equals":
        return [*run, "render.num_frames"], {}, "expected key=value", None
    if name == "max-invalid-out-of-range":
        return [*run, "--max-invalid", "1.5"], {}, "--max-invalid=1.5: must be a fraction in [0, 1]", None
    if name == "model-typo":
        return [*run, "model.path=tinyy"], {}, "model.path='tinyy' (taken as a hub id)", None
    if name == "model-missing-directory":
        return [*run, "model.path=./no-such-model"], {}, "(taken as a local directory): no such directory", None
    if name == "model-hub-id-not-cached":
        return ([*run, "model.path=kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffuser"], {},
                "not in the local Hugging Face cache and HF_HUB_OFFLINE is set", None)
    if name == "model-uri-missing":
        return ([*run, f"model.path=file://{tmp}/no-such-model"], {}, "(taken as an object-store URI)", None)
    if name == "sweep-model-typo":
        return [*run, "sweep.model=[tiny,tiny-i2vv]"], {}, "sweep model 'tiny-i2vv'", None
    if name == "input-missing":
        return [*run, f"input.path={tmp}/none.parquet"], {}, "no such file or directory", None
    if name == "input-no-prompt":
        data = _dataset(tmp / "p.parquet", text=["a cat"])
        return [*run, f"input.path={data}"], {}, "required column 'prompt' is missing", None
    if name == "input-not-parquet":
        (tmp / "text.parquet").write_text("prompt\na cat\n")
        return [*run, f"input.path={tmp}/text.parquet"], {}, "not a readable Parquet file", None
    if name == "input-wrong-type":
        data = _dataset(tmp / "t.parquet", prompt=["a cat"], num_frames=["many"])
        return [*run, f"input.path={data}"], {}, "column 'num_frames' has type string, expected integer", None
    if name == "input-no-rows":
        data = _dataset(tmp / "e.parquet", prompt=pa.array([], pa.string()))
        return [*run, f"input.path={data}"], {}, "the dataset has no rows", None
    if name == "option-of-another-model":
        return [*run, f"input.path={prompts}", "model.sample_audio=false"], {}, "model.sample_audio=False", None
    if name == "gang-the-model-cannot-take":
        return [*run, f"input.path={prompts}", "cluster.sequence_parallel=3"], {}, "sequence_parallel", None
    if name == "input-no-image-column":
        return ([*run, f"input.path={prompts}", "model.path=tiny-i2v"], {},
                "required column 'image' is missing: the i2v model renders from a conditioning image", None)
    if name == "job-wide-frames":
        data = _dataset(tmp / "i.parquet", prompt=["a cat"], image=["cat.png"])
        return ([*run, f"input.path={data}", "model.path=tiny-i2v", "render.num_frames=9"], {},
                "render.num_frames=9: too few for this i2v model", None)
    if name == "job-wide-size":
        return ([*run, f"input.path={prompts}", "model.path=tiny-t2i", "output.format=png"], {},
                "render.width x height=64x64: not a size this t2i model renders", None)
    if name == "format-of-another-kind":
        return [*run, f"input.path={prompts}", "model.path=tiny-t2i"], {}, "output.format='mp4'", None
    if name == "sr-on-prompts":
        return [*run, f"input.path={prompts}", "model.path=tiny-sr"], {}, "tiny-sr is an sr model", None
    if name == "s3-input-no-bucket":
        opts = f"input.storage_options={json.dumps(s3).replace(' ', '')}"
        return ([*run, "input.path=s3://no-such-bucket/prompts.parquet", opts], {},
                "input.path='s3://no-such-bucket/prompts.parquet': bucket 'no-such-bucket' does not exist", None)
    if name == "s3-output-no-bucket":
        out_uri = "s3://no-such-bucket/out"
        return (["run", "configs/tiny.yaml", f"input.path={prompts}", f"output.uri={out_uri}", s3_opts], {},
                f"output.uri={out_uri!r}: bucket 'no-such-bucket' does not exist", None)
    if name == "s3-output-closed-port":
        closed = {**s3, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}  # discard: nothing listens
        opts = f"output.storage_options={json.dumps(closed).replace(' ', '')}"
        return (["run", "configs/tiny.yaml", f"input.path={prompts}", f"output.uri=s3://{bucket}/out", opts], {},
                "cannot list (EndpointConnectionError", None)
    if name == "s3-output-no-credentials":
        anonymous = {"client_kwargs": {"endpoint_url": endpoint}}
        opts = f"output.storage_options={json.dumps(anonymous).replace(' ', '')}"
        env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no"),
               "AWS_CONFIG_FILE": str(tmp / "no"), "AWS_EC2_METADATA_DISABLED": "true"}
        return (["run", "configs/tiny.yaml", f"input.path={prompts}", f"output.uri=s3://{bucket}/out", opts], env,
                "cannot list (NoCredentialsError: Unable to locate credentials)", None)
    if name == "positional-ids-after-insert":
        data = _adopted_output(tmp, ["a cat", "a dog"], out)
        _dataset(Path(data), prompt=["a bird", "a cat", "a dog"])  # a row inserted first: every position moves
        return ([*run, f"input.path={data}", "output.format=npy"], {},
                "this dataset has no id column, so ids are row positions", out)
    if name == "score-unknown-metric":
        return (["score", str(tmp / "not-an-output"), "--metrics", "temporal_flickering,sharpness"], {},
                "score.metrics='sharpness': unknown metric (known: aesthetic, av_align, clip_score", None)
    if name == "score-run-config-unknown-metric":
        return ([*run, "score.metrics=[sharpness]"], {}, "score.metrics='sharpness': unknown metric (known: ", None)
    if name == "score-no-video-column":
        return (["score", prompts, "--out", str(out)], {}, "required column 'video' is missing", None)
    if name == "score-dataset-without-out":
        data = _dataset(tmp / "v.parquet", video=["a.mp4"])
        return ["score", data], {}, "score.out: not set, and score.source=", None
    if name.startswith(("verify-", "report-")):
        verb, target = name.split("-", 1)
        path = {"missing": tmp / "nowhere", "file": tmp / "a-file", "not-output": tmp / "not-an-output"}[target]
        said = {"missing": "no such file or directory", "file": "is a file, not an output prefix",
                "not-output": "holds no manifest/ and no _SUCCESS: not a kandinsky-batch output"}[target]
        return [verb, str(path)], {}, f"{verb} '{path}': {said}", None
    raise AssertionError(name)


CASES = ["config-missing", "yaml-syntax", "yaml-list", "unknown-key", "bad-value", "override-without-equals",
         "max-invalid-out-of-range", "model-typo", "model-missing-directory", "model-hub-id-not-cached",
         "model-uri-missing", "sweep-model-typo", "input-missing", "input-no-prompt", "input-not-parquet",
         "input-wrong-type", "input-no-rows", "input-no-image-column", "option-of-another-model",
         "gang-the-model-cannot-take",
         "job-wide-frames", "job-wide-size", "format-of-another-kind", "sr-on-prompts", "s3-input-no-bucket",
         "s3-output-no-bucket", "s3-output-closed-port", "s3-output-no-credentials", "positional-ids-after-insert",
         "score-unknown-metric", "score-run-config-unknown-metric", "score-no-video-column",
         "score-dataset-without-out",
         "verify-missing", "verify-file", "verify-not-output", "report-missing", "report-file", "report-not-output"]


@pytest.fixture(scope="module")
def refused(tmp_path_factory, presets, moto_endpoint) -> dict:
    """Every case's command line run once, all in one fresh process (tests/cli_batch.py: the CLI's own entry point,
    each case with its own environment and captured descriptors): run once, asserted case by case below."""
    s3 = {"client_kwargs": {"endpoint_url": moto_endpoint}, "key": "testing", "secret": "testing"}
    boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="kb-test")
    root = tmp_path_factory.mktemp("refusals")
    cases, setups = [], {}
    for name in CASES:
        tmp = root / name
        tmp.mkdir()
        args, env, said, existing = _case(name, tmp, s3)
        setups[name] = (tmp, said, existing, _files(existing) if existing else None)
        cases.append({"args": args, "env": _env(tmp, env), "cwd": str(ROOT)})
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-m", "tests.cli_batch", str(root / "cases.json"), str(root / "out.json")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "out.json").read_text())
    return {name: (result, *setups[name]) for name, result in zip(CASES, results)}


@pytest.mark.parametrize("name", CASES)
def test_refusal_is_one_line_exit_2_before_ray(name, refused):
    proc, tmp_path, said, existing, before = refused[name]
    stderr = proc["stderr"].splitlines()
    assert proc["returncode"] == EXIT_USAGE, proc["stderr"][-3000:]
    assert len(stderr) == 1 and stderr[0].startswith("error: "), stderr
    assert said in stderr[0], stderr[0]
    assert "Traceback" not in proc["stdout"] + proc["stderr"]
    assert not proc["ray_imported"], "ray was imported before the refusal"
    assert not (tmp_path / "ray-tmp").exists(), "a Ray session was started"
    if existing:
        assert _files(existing) == before, "the refusal wrote under the output prefix"
    else:
        assert not (tmp_path / "out").exists(), "the refusal wrote under the output prefix"
    assert "testing" not in stderr[0], "a credential was shown"


def test_nothing_ok_and_too_many_invalid_exit_4_after_finishing(tmp_path, presets):
    """0 ok of N rows exits 4 naming the commonest reason; `--max-invalid` exits 4 above its fraction, with
    `_SUCCESS` written (nothing done is lost), and 0 at or below it. No row renders, so no Ray starts."""
    blank = _dataset(tmp_path / "blank.parquet", prompt=[" ", " ", "\t"])
    proc = _cli(["run", "configs/tiny.yaml", f"input.path={blank}", f"output.uri={tmp_path / 'blank-out'}",
                 "--no-progress"], tmp_path)
    assert proc.returncode == EXIT_NOTHING_OK, proc.stderr
    assert proc.stdout.startswith("done: 3 rows: 0 ok, 3 invalid")
    [line] = proc.stderr.splitlines()
    assert line == ("error: finished, but none of 3 rows rendered ok; most common reason (2 of 3 rows): "
                    "prompt=' ': empty or blank (rule: must contain text)"), line
    assert (tmp_path / "blank-out" / "_SUCCESS").exists()

    out = tmp_path / "mixed-out"
    data = _adopted_output(tmp_path, ["a cat", " ", " "], out)  # row 0 ok (adopted), two rows invalid
    common = ["run", "configs/tiny.yaml", f"input.path={data}", f"output.uri={out}", "output.format=npy",
              "--no-progress"]
    proc = _cli([*common, "--max-invalid", "0.5"], tmp_path)
    assert proc.returncode == EXIT_NOTHING_OK, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: 2 of 3 rows invalid (66.7%), more than --max-invalid=0.5; the job finished and "
                           "wrote _SUCCESS, nothing done is lost"), line
    assert json.loads((out / "_SUCCESS").read_text())["counts"]["invalid"] == 2
    assert _cli([*common, "--max-invalid", "0.7"], tmp_path).returncode == EXIT_OK
