"""Bad input, row by row and as a whole.

Rows (`build_tasks`, the row validator over a whole table): each bad row becomes `invalid` with a one-line
error naming the field, the value and the rule, and the valid rows beside it still become tasks. Whole inputs
(`read_table` and the CLI): refused with one line naming `input.path` and the problem, before Ray starts.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.config.load import load_config
from kandinsky_batch.intake.dataset import InputError
from kandinsky_batch.output.manifest import to_table
from kandinsky_batch.config.schema import derive_seed
from kandinsky_batch.intake.ids import MAX_ID_CHARS
from kandinsky_batch.output.layout import object_key
from pipelines import load_spec
from tests.cli_batch import run_here
from tests.conftest import S3_BUCKET
from tests.helpers import TINY_RENDER, build_tasks, read_table, write_dataset


ROOT = Path(__file__).resolve().parents[1]
TYPES = {"id": pa.string(), "prompt": pa.string(), "negative_prompt": pa.string(), "seed": pa.int64(),
         "height": pa.int64(), "width": pa.int64(), "num_frames": pa.int64(), "num_inference_steps": pa.int64(),
         "guidance_scale": pa.float64()}


@pytest.fixture(scope="module")
def spec(model_cache):
    load_spec("tiny-i2v")
    return load_spec("tiny")


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["input.path=unused.parquet", "output.uri=unused", *TINY_RENDER])


def _table(rows: list[dict], **types: pa.DataType) -> pa.Table:
    columns = sorted({key for row in rows for key in row}, key=list(TYPES).index)
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, types.get(c, TYPES[c])) for c in columns]))


def _words_within(spec, limit: int) -> int:
    """The largest n such that n words fit the text encoder's token limit."""
    lo, hi = 1, 2
    while spec.prompt_tokens("word " * hi) <= limit:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if spec.prompt_tokens("word " * mid) <= limit else (lo, mid)
    return lo


LONG = object()  # placeholder for a prompt one word over the token limit, built with the spec

# (case id, bad row, extra column types, field named in the error, fragment of the error)
BAD_ROWS = [
    ("prompt-null", {"prompt": None}, {}, "prompt", "prompt=None"),
    ("prompt-empty", {"prompt": ""}, {}, "prompt", "prompt='':"),
    ("prompt-blank", {"prompt": "   "}, {}, "prompt", "blank"),
    ("prompt-invisible", {"prompt": "\u200b\t\n"}, {}, "prompt", "blank"),
    ("prompt-too-long", {"prompt": LONG}, {}, "prompt", "tokens"),
    ("negative-too-long", {"negative_prompt": LONG}, {}, "negative_prompt", "tokens"),
    ("negative-blank", {"negative_prompt": " "}, {}, "negative_prompt", "blank"),
    ("seed-negative", {"seed": -1}, {}, "seed", "seed=-1:"),
    ("seed-2**63", {"seed": 2**63}, {"seed": pa.uint64()}, "seed", f"seed={2**63}:"),
    ("seed-2**64-1", {"seed": 2**64 - 1}, {"seed": pa.uint64()}, "seed", f"seed={2**64 - 1}:"),
    ("guidance-nan", {"guidance_scale": math.nan}, {}, "guidance_scale", "guidance_scale=nan:"),
    ("guidance-inf", {"guidance_scale": math.inf}, {}, "guidance_scale", "guidance_scale=inf:"),
    ("guidance-negative", {"guidance_scale": -1.0}, {}, "guidance_scale", "guidance_scale=-1.0:"),
    ("steps-0", {"num_inference_steps": 0}, {}, "num_inference_steps", "num_inference_steps=0:"),
    ("steps-1001", {"num_inference_steps": 1001}, {}, "num_inference_steps", "num_inference_steps=1001:"),
    ("height-not-multiple", {"height": 50}, {}, "height", "height=50:"),
    ("width-0", {"width": 0}, {}, "width", "width=0:"),
    ("width-negative", {"width": -16}, {}, "width", "width=-16:"),
    ("height-beyond-max", {"height": 4096}, {}, "height", "height=4096:"),
    ("height-beyond-int32", {"height": 2**40}, {}, "height", f"height={2**40}:"),
    ("frames-16", {"num_frames": 16}, {}, "num_frames", "num_frames=16:"),
    ("frames-0", {"num_frames": 0}, {}, "num_frames", "num_frames=0:"),
    ("frames-beyond-max", {"num_frames": 4 * 200 + 1}, {}, "num_frames", "num_frames=801:"),
    ("id-empty", {"id": ""}, {}, "id", "id='':"),
    ("id-blank", {"id": "   "}, {}, "id", "blank"),
    ("id-null", {"id": None}, {}, "id", "id=None:"),
    ("id-too-long", {"id": "x" * (MAX_ID_CHARS + 44)}, {}, "id", f"{MAX_ID_CHARS + 44} characters"),
    ("id-newline", {"id": "a\nb"}, {}, "id", "U+000A"),
    ("id-nul", {"id": "a\x00b"}, {}, "id", "U+0000"),
    ("id-zero-width", {"id": "a\u200bb"}, {}, "id", "U+200B"),
    ("id-bidi-override", {"id": "a\u202eb"}, {}, "id", "U+202E"),
    ("id-line-separator", {"id": "a\u2028b"}, {}, "id", "U+2028"),
    ("id-parent", {"id": "../x"}, {}, "id", "escape the output prefix"),
    ("id-absolute", {"id": "/abs"}, {}, "id", "escape the output prefix"),
    ("id-inner-parent", {"id": "a/../b"}, {}, "id", "escape the output prefix"),
    ("id-backslash-parent", {"id": "a\\..\\b"}, {}, "id", "escape the output prefix"),
    ("id-backslash-absolute", {"id": "\\abs"}, {}, "id", "escape the output prefix"),
    ("id-dot", {"id": "."}, {}, "id", "escape the output prefix"),
]


@pytest.mark.parametrize("bad,types,field,fragment", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_a_bad_row_is_invalid_naming_field_value_and_rule(spec, cfg, bad, types, field, fragment):
    bad = dict(bad)
    for key, value in bad.items():
        if value is LONG:
            bad[key] = "word " * (_words_within(spec, spec.max_prompt_tokens) + 1)
    rows = [{"id": "before", "prompt": "a cat"}, {"id": "bad", "prompt": "a dog", **bad},
            {"id": "after", "prompt": "a fox"}]
    tasks, invalid = build_tasks(_table(rows, **types), cfg, spec)

    assert [t.id for t in tasks] == ["before", "after"], "valid rows beside a bad one still render"
    assert [t.row_index for t in tasks] == [0, 2]
    (row,) = invalid
    assert row["status"] == "invalid" and row["row_index"] == 1 and row["attempts"] == 0
    error = row["error"]
    assert error.startswith(f"{field}="), error
    assert fragment in error, error
    assert "rule" in error or "must" in error, f"the error states no rule: {error}"
    assert "\n" not in error and len(error) < 400, error
    # An invalid row is still a manifest row: it must fit the explicit schema (oversized numbers blanked).
    to_table([{**row, "model": "tiny", "format": "mp4", "fps": 8}])


def test_a_prompt_at_the_token_limit_is_valid_one_word_more_is_not(spec, cfg):
    fits = _words_within(spec, spec.max_prompt_tokens)
    rows = [{"id": "at", "prompt": "word " * fits}, {"id": "over", "prompt": "word " * (fits + 1)}]
    tasks, invalid = build_tasks(_table(rows), cfg, spec)
    assert [t.id for t in tasks] == ["at"]
    assert [r["id"] for r in invalid] == ["over"]
    assert f"at most {spec.max_prompt_tokens}" in invalid[0]["error"]


def test_a_long_negative_prompt_is_not_checked_when_guidance_is_off(spec, cfg):
    """Without guidance the negative prompt is never encoded (the manifest records it as null)."""
    long = "word " * (_words_within(spec, spec.max_prompt_tokens) + 1)
    rows = [{"id": "a", "prompt": "a cat", "negative_prompt": long, "guidance_scale": 1.0}]
    (task,), invalid = build_tasks(_table(rows), cfg, spec)
    assert invalid == [] and task.negative_prompt is None


def test_limits_at_their_edges_are_valid(spec, cfg):
    rows = [{"id": "edges", "prompt": "a cat", "seed": 2**63 - 1, "num_inference_steps": 1,
             "height": spec.max_size, "width": spec.spatial_multiple, "num_frames": spec.max_frames,
             "guidance_scale": 0.0},
            {"id": "seed-0", "prompt": "a cat", "seed": 0, "num_inference_steps": 1000, "num_frames": 1},
            {"id": "a/b c", "prompt": "an id made safe, not refused"}]
    tasks, invalid = build_tasks(_table(rows), cfg, spec)
    assert invalid == [] and [t.id for t in tasks] == ["edges", "seed-0", "a/b c"]
    assert tasks[0].seed == 2**63 - 1 and tasks[1].seed == 0


def test_duplicate_ids_keep_the_first_and_name_it(spec, cfg):
    rows = [{"id": "a", "prompt": "first"}, {"id": "b", "prompt": "second"}, {"id": "a", "prompt": "again"}]
    tasks, invalid = build_tasks(_table(rows), cfg, spec)
    assert [t.id for t in tasks] == ["a", "b"]
    (row,) = invalid
    assert row["row_index"] == 2 and row["error"].startswith("id='a':") and "duplicate of row 0" in row["error"]


def test_ids_sharing_an_object_key_are_refused(spec, cfg):
    """A crafted id equal to another id's hashed key would overwrite its video."""
    crafted = object_key("a/b", cfg.output.format)[len("videos/"):-len(f".{cfg.output.format}")]
    rows = [{"id": "a/b", "prompt": "x"}, {"id": crafted, "prompt": "y"}]
    tasks, invalid = build_tasks(_table(rows), cfg, spec)
    assert [t.id for t in tasks] == ["a/b"]
    assert invalid[0]["error"].startswith(f"id={crafted!r}:") and "object key" in invalid[0]["error"]


def test_integer_ids_are_stringified_and_positions_are_the_default_id(spec, cfg):
    tasks, invalid = build_tasks(_table([{"id": 7, "prompt": "x"}, {"id": -3, "prompt": "y"}], id=pa.int64()),
                                 cfg, spec)
    assert invalid == [] and [t.id for t in tasks] == ["7", "-3"]
    tasks, invalid = build_tasks(_table([{"id": 2**64 - 1, "prompt": "x"}], id=pa.uint64()), cfg, spec)
    assert invalid == [] and tasks[0].id == str(2**64 - 1)
    tasks, invalid = build_tasks(_table([{"prompt": "x"}, {"prompt": "y"}, {"prompt": "z"}]), cfg, spec)
    assert invalid == [] and [(t.id, t.row_index) for t in tasks] == [("0", 0), ("1", 1), ("2", 2)]


def test_a_derived_seed_depends_on_the_id_not_the_position(spec, cfg):
    alone, _ = build_tasks(_table([{"id": "cat", "prompt": "a cat"}]), cfg, spec)
    moved, _ = build_tasks(_table([{"id": f"other{i}", "prompt": "x"} for i in range(5)]
                                  + [{"id": "cat", "prompt": "a cat"}]), cfg, spec)
    assert moved[-1].row_index == 5
    assert alone[0].seed == moved[-1].seed == derive_seed(cfg.render.seed, "cat")
    assert len({t.seed for t in moved}) == len(moved)


def test_nulls_fall_back_to_the_config(spec, cfg):
    rows = [{"id": "a", "prompt": "x", "seed": None, "height": None, "guidance_scale": None,
             "negative_prompt": None}]
    (task,), invalid = build_tasks(_table(rows), cfg, spec)
    assert invalid == []
    assert (task.height, task.width, task.num_frames) == (cfg.render.height, cfg.render.width, cfg.render.num_frames)
    assert task.guidance_scale == cfg.render.guidance_scale and task.seed == derive_seed(cfg.render.seed, "a")


# ---- whole inputs ----------------------------------------------------------------------------------------------

def _good(path, n=2, start=0) -> str:
    return write_dataset(path, [{"id": f"r{start + i}", "prompt": f"prompt {start + i}"} for i in range(n)])


def _truncated(tmp_path) -> str:
    data = Path(_good(tmp_path / "whole.parquet", n=50)).read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "cut.parquet")


def _text_file(tmp_path) -> str:
    (tmp_path / "notes.parquet").write_text("id,prompt\n1,a cat\n")
    return str(tmp_path / "notes.parquet")


def _empty_dir(tmp_path) -> str:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no parquet here")
    return str(tmp_path / "empty")


def _typed(name: str, array: pa.Array):
    def make(tmp_path) -> str:
        columns = {"prompt": pa.array(["a"] * len(array)), name: array}
        pq.write_table(pa.table(columns), tmp_path / "typed.parquet")
        return str(tmp_path / "typed.parquet")
    return make


def _no_prompt(tmp_path) -> str:
    return write_dataset(tmp_path / "noprompt.parquet", [{"id": "a", "text": "a cat"}])


def _no_rows(tmp_path) -> str:
    return write_dataset(tmp_path / "none.parquet", [], pa.schema([("id", pa.string()), ("prompt", pa.string())]))


def _mixed_dir(tmp_path) -> str:
    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "id": [1]}), tmp_path / "mixed" / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "id": ["x"]}), tmp_path / "mixed" / "b.parquet")
    return str(tmp_path / "mixed")


BAD_INPUTS = [
    ("missing-path", lambda tmp_path: str(tmp_path / "nope.parquet"), "no such file"),
    ("dir-without-parquet", _empty_dir, "no .parquet files"),
    ("text-named-parquet", _text_file, "not a readable Parquet"),
    ("truncated-parquet", _truncated, "not a readable Parquet"),
    ("unknown-protocol", lambda tmp_path: "nosuchproto://bucket/x.parquet", "cannot open"),
    ("no-prompt-column", _no_prompt, "column 'prompt' is missing"),
    ("prompt-int64", _typed("prompt", pa.array([1, 2])), "column 'prompt' has type int64"),
    ("seed-string", _typed("seed", pa.array(["1", "2"])), "column 'seed' has type string"),
    ("height-float", _typed("height", pa.array([32.0, 64.0])), "column 'height' has type double"),
    ("id-float", _typed("id", pa.array([1.5, 2.5])), "column 'id' has type double"),
    ("guidance-string", _typed("guidance_scale", pa.array(["5"])), "column 'guidance_scale' has type string"),
    ("no-rows", _no_rows, "no rows"),
    ("files-disagree", _mixed_dir, "do not agree"),
]


@pytest.mark.parametrize("make,problem", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_a_bad_input_is_refused_in_one_line(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        read_table(path)
    message = str(info.value)
    assert message.startswith(f"input.path={path!r}: "), message
    assert problem in message, message
    assert "\n" not in message and len(message) < 500, message


def test_a_directory_reads_its_parquet_files_in_name_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    _good(tmp_path / "d" / "b.parquet", n=2, start=2)
    _good(tmp_path / "d" / "a.parquet", n=2, start=0)
    _good(tmp_path / "d" / "sub" / "c.parquet", n=1, start=4)
    (tmp_path / "d" / "_SUCCESS").write_text("")
    table = read_table(str(tmp_path / "d"))
    assert table.column("id").to_pylist() == ["r0", "r1", "r2", "r3", "r4"]
    assert read_table(f"file://{tmp_path / 'd' / 'a.parquet'}").column("id").to_pylist() == ["r0", "r1"]


def test_text_columns_in_any_arrow_string_encoding_are_accepted(tmp_path, spec, cfg):
    """large_string and dictionary-encoded (pandas categorical) columns are strings too."""
    table = pa.table({"id": pa.array(["a", "b"], pa.large_string()),
                      "prompt": pa.array(["a cat", "a cat"]).dictionary_encode(),
                      "negative_prompt": pa.array(["blurry", None], pa.large_string())})
    pq.write_table(table, tmp_path / "enc.parquet")
    read = read_table(str(tmp_path / "enc.parquet"))
    tasks, invalid = build_tasks(read, cfg, spec)
    assert invalid == [] and [(t.id, t.prompt) for t in tasks] == [("a", "a cat"), ("b", "a cat")]


def test_a_column_given_twice_is_refused(tmp_path):
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array([1]), pa.array([2])], names=["prompt", "seed", "seed"])
    pq.write_table(table, tmp_path / "twice.parquet")
    with pytest.raises(InputError) as info:
        read_table(str(tmp_path / "twice.parquet"))
    assert "seed" in str(info.value) and "\n" not in str(info.value)


def test_s3_inputs_read_and_a_missing_one_is_refused(s3_storage_options):
    options = {**s3_storage_options, "secret": "s3cr3t-input-value"}  # moto accepts any credentials
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_storage_options)
    prefix = f"{S3_BUCKET}/in-{uuid.uuid4().hex}"
    for name, start in (("b.parquet", 2), ("a.parquet", 0)):
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": [f"r{start}", f"r{start + 1}"], "prompt": ["x", "y"]}), buf)
        fs.pipe_file(f"{prefix}/{name}", buf.getvalue().to_pybytes())
    fs.pipe_file(f"{prefix}/notes.txt", b"ignored")

    assert read_table(f"s3://{prefix}", options).column("id").to_pylist() == ["r0", "r1", "r2", "r3"]
    assert read_table(f"s3://{prefix}/b.parquet", options).num_rows == 2
    for missing, problem in ((f"s3://{prefix}/nope.parquet", "no such file"),
                             ("s3://no-such-bucket-kb/x.parquet", "no such file")):
        with pytest.raises(InputError) as info:
            read_table(missing, options)
        message = str(info.value)
        assert message.startswith(f"input.path={missing!r}: ") and problem in message, message
        assert "s3cr3t-input-value" not in message
    fs.pipe_file(f"{prefix}/bad/x.parquet", b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file") as info:
        read_table(f"s3://{prefix}/bad", options)
    assert "\n" not in str(info.value)


def test_an_unreachable_store_is_refused_in_one_line_without_credentials():
    options = {"key": "AKIDSECRETKEY123", "secret": "SuperSecretValue-XYZ",
               "config_kwargs": {"retries": {"max_attempts": 1}},
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}  # the discard port: nothing listens
    for endpoint in ("http://127.0.0.1:9", "http://AKIDSECRETKEY123:SuperSecretValue-XYZ@127.0.0.1:9"):
        options["client_kwargs"]["endpoint_url"] = endpoint
        with pytest.raises(InputError) as info:
            read_table("s3://bucket/x.parquet", options)
        message = str(info.value)
        assert message.startswith("input.path='s3://bucket/x.parquet': cannot list") and "\n" not in message
        assert "AKIDSECRETKEY123" not in message and "SuperSecretValue-XYZ" not in message, message


# ---- the CLI ---------------------------------------------------------------------------------------------------

CLI_INPUTS = [
    ("missing-path", lambda tmp_path: str(tmp_path / "nope.parquet")),
    ("text-named-parquet", _text_file),
    ("no-prompt-column", _no_prompt),
    ("no-rows", _no_rows),
]


@pytest.mark.parametrize("make", [c[1] for c in CLI_INPUTS], ids=[c[0] for c in CLI_INPUTS])
def test_cli_refuses_bad_input_in_one_line_before_ray_starts(tmp_path, model_cache, make, monkeypatch):
    """Through the CLI's entry point in this process; the same inputs in a fresh process, where Ray must not even
    be imported, are tests/test_refusals.py's `input-*` cases."""
    path = make(tmp_path)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="kbv-", dir="/tmp")  # where a Ray started by mistake would leave its session
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        proc = run_here({"args": ["run", "configs/tiny.yaml", f"input.path={path}", f"output.uri={out}",
                                  "--no-progress"],
                         "env": {"KANDINSKY_BATCH_CACHE": model_cache, "RAY_TMPDIR": ray_tmp}, "cwd": str(ROOT)})
        assert proc["returncode"] == 2, (proc["returncode"], proc["stderr"][-2000:])
        lines = proc["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: input.path="), proc["stderr"][-2000:]
        assert "Traceback" not in proc["stderr"] and proc["stdout"] == ""
        assert os.listdir(ray_tmp) == [], "Ray started for an input that was refused"
        assert not out.exists(), "output objects were written for an input that was refused"
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_row_names_every_rule_it_breaks_the_first_first(spec, cfg):
    table = _table([{"id": "x", "prompt": " ", "height": 100, "num_frames": 6, "num_inference_steps": 0,
                     "negative_prompt": " "}])
    _, [row] = build_tasks(table, cfg, spec)
    reasons = row["error"].split("; ")
    assert [r.split("=")[0] for r in reasons] == ["prompt", "height", "num_frames", "num_inference_steps",
                                                  "negative_prompt"], row["error"]
    assert reasons[0].startswith("prompt=' ': empty or blank")


def test_job_wide_defaults_are_refused_only_when_every_row_takes_them(tmp_path, model_cache):
    """`render.*` applies to every row only without a dataset column and a sweep axis for it (the rule is the row's)."""
    from kandinsky_batch.config.schema import ConfigError
    from kandinsky_batch.intake.preflight import check_defaults
    from kandinsky_batch.intake.ids import IdIndex
    from kandinsky_batch.intake.rows import RowValidator
    from kandinsky_batch.config.sweep import Sweep

    cfg = load_config(None, ["input.path=x", "output.uri=y", "model.path=tiny-i2v", "render.num_frames=9"])
    validator = RowValidator(cfg, load_spec("tiny-i2v"), IdIndex())
    with pytest.raises(ConfigError, match=r"^render.num_frames=9: too few for this i2v model .*no 'num_frames' "
                                          "column and no sweep axis sets it"):
        check_defaults(validator, ["prompt", "image"], Sweep.parse(cfg))
    check_defaults(validator, ["prompt", "image", "num_frames"], Sweep.parse(cfg))  # a row may set its own
    swept = load_config(None, ["input.path=x", "output.uri=y", "model.path=tiny-i2v", "render.num_frames=9",
                               "sweep.num_frames=[17,21]"])
    check_defaults(validator, ["prompt", "image"], Sweep.parse(swept))
