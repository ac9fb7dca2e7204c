"""`kandinsky-batch reproduce`: a committed row re-rendered in-process equals its object, or says how far apart.

On a real tiny output written by `job.run` with in-process replicas: npy rows and an mp4 row. That a Ray actor
renders what plain diffusers does under these numerics is tests/test_job.py's seed contract, end to end.
"""

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from kandinsky_batch.cli import main
from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.video import decode
from pipelines.numerics import CPU_NUMERICS_ENV, SWITCH
from tests.helpers import TINY_RENDER, write_dataset

pytestmark = pytest.mark.slow

ROWS = [{"id": "plain", "prompt": "a cat dancing", "seed": None},
        {"id": "seeded", "prompt": "a dog running", "seed": 7}]
SCHEMA_IN = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64())])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, model_cache):
    """(npy output, mp4 output) of the tiny model: two rows and one, rendered by in-process replicas."""
    tmp = tmp_path_factory.mktemp("reproduce")
    made = []
    for fmt, rows in (("npy", ROWS), ("mp4", ROWS[:1])):
        data = write_dataset(tmp / f"{fmt}.parquet", rows, SCHEMA_IN)
        uri = str(tmp / fmt)
        cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", f"output.format={fmt}",
                                 "cluster.replicas=1", "cluster.address=inprocess", *TINY_RENDER])
        assert run(cfg, progress=False).ok == len(rows)
        made.append(uri)
    return made


def test_every_committed_row_reproduces_equal(outputs, capsys):
    """The npy output's `plain` row reproduces equal in a process of its own (the re-exec test below)."""
    npy, mp4 = outputs
    for uri, row_id in ((npy, "seeded"), (mp4, "plain")):
        assert main(["reproduce", uri, row_id]) == 0, row_id
        out = capsys.readouterr().out
        assert out.rstrip().endswith("\nequal"), out
        assert "MKL_CBWR=AVX2" in out and "1 thread(s)" in out
    assert "mp4 is lossy" in out and "encoding: equal" in out


def test_a_changed_value_is_reported_one_value_one_level_apart(outputs, capsys):
    npy, _ = outputs
    storage = Storage(npy)
    key = {r["id"]: r for r in read_manifest(storage).to_pylist()}["seeded"]["key"]
    frames = decode(storage.get_bytes(key), "npy").copy()
    frames.flat[5] = frames.flat[5] + 1 if frames.flat[5] < 255 else 254
    buffer = io.BytesIO()
    np.save(buffer, frames)
    storage.put_bytes(key, buffer.getvalue())
    assert main(["reproduce", npy, "seeded"]) == 1
    out = capsys.readouterr().out
    assert f"1 of {frames.size} values" in out and "by at most 1 uint8 level(s)" in out, out
    assert "encoding: differs" in out and "not what the job committed" in out
    assert out.rstrip().endswith("not equal")


def test_an_unknown_id_or_a_bad_target_is_one_line_exit_2(outputs, tmp_path, capsys):
    npy, _ = outputs
    assert main(["reproduce", npy, "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: id='nope': not in the manifest"), err
    assert main(["reproduce", str(tmp_path / "missing"), "plain"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or directory" in err, err


def test_a_process_started_without_the_replicas_numerics_re_execs_with_them(outputs):
    """The variables are read when torch loads: `reproduce` sets them by starting itself again, then renders."""
    npy, _ = outputs
    env = {k: v for k, v in os.environ.items() if k not in CPU_NUMERICS_ENV and k != SWITCH}
    done = subprocess.run([sys.executable, "-m", "kandinsky_batch", "reproduce", npy, "plain"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, 1 thread(s)" in done.stdout
    assert done.stdout.rstrip().endswith("\nequal")
