"""End to end through `job.run`: the seed contract, videos, posters, manifest, verify, resume.

The seed contract runs on a real local Ray (an actor and its pinned numerics; two Ray replicas rendering one job
against plain diffusers are tests/test_sweep.py's); the other jobs here test the system's logic and run their
replica in-process (`inprocess`), the same worker and queue without Ray. One replica each: a replica is a model
load, and which replica renders a row is no part of what these tests check.

Every storage test runs on file:// and on s3:// (moto on 127.0.0.1).
"""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import SCHEMA, read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.poster import poster
from kandinsky_batch.intake.resume import ResumeConflict
from kandinsky_batch.intake.rows import derive_seed
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import poster_key
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode
from pipelines import DEFAULT_NEGATIVE_PROMPT
from tests.helpers import TINY_RENDER, oracle, write_dataset

pytestmark = pytest.mark.slow

ROWS = [
    {"id": "plain", "prompt": "a cat dancing"},
    {"id": "seeded", "prompt": "a dog running", "seed": 7},
    {"id": "sized", "prompt": "a red car", "height": 48, "width": 32},
    {"id": "long", "prompt": "waves on rocks", "num_frames": 9, "num_inference_steps": 3},
    {"id": "nocfg", "prompt": "koi fish", "guidance_scale": 1.0},
    {"id": "neg", "prompt": "a market", "negative_prompt": "blurry, low quality", "guidance_scale": 3.0},
]
SCHEMA_IN = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
                       ("seed", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
                       ("num_frames", pa.int64()), ("num_inference_steps", pa.int64()),
                       ("guidance_scale", pa.float64())])


def _config(tmp_path, uri, options, fmt="npy", rows=ROWS, extra=()):
    data = write_dataset(tmp_path / "prompts.parquet", rows, SCHEMA_IN)
    cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", f"output.format={fmt}",
                             "cluster.replicas=1", *TINY_RENDER, *extra])
    cfg.output.storage_options = options or {}
    return cfg


def test_seed_contract_end_to_end(tmp_path, s3_output, ray_local, tiny_pipe):
    """npy output equals plain diffusers for every row, with and without per-row overrides, on a Ray actor."""
    uri, options = s3_output
    cfg = _config(tmp_path, uri, options)
    result = run(cfg, progress=False)
    assert (result.rows, result.ok, result.rendered) == (len(ROWS), len(ROWS), len(ROWS))

    storage = Storage(uri, options)
    manifest = read_manifest(storage)
    assert manifest.schema.equals(SCHEMA)
    rows = {r["id"]: r for r in manifest.to_pylist()}
    assert sorted(rows) == sorted(r["id"] for r in ROWS)
    assert len(result.workers) == 1
    assert {r["worker"] for r in rows.values()} == {w["worker"] for w in result.workers}
    # Effective values as rendered: overrides win, nulls fall back to the config, seeds derive from ids.
    assert rows["seeded"]["seed"] == 7
    assert rows["plain"]["seed"] == derive_seed(0, "plain")
    assert (rows["sized"]["height"], rows["sized"]["width"]) == (48, 32)
    assert rows["long"]["num_frames"] == 9 and rows["long"]["num_inference_steps"] == 3
    assert rows["plain"]["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert rows["nocfg"]["negative_prompt"] is None
    assert rows["neg"]["negative_prompt"] == "blurry, low quality"
    for row in rows.values():
        assert row["status"] == "ok" and row["attempts"] == 1 and row["model"] == "tiny"
        frames = decode(storage.get_bytes(storage.key_of(row["uri"])), "npy")
        assert np.array_equal(frames, oracle(tiny_pipe, row)), row["id"]
        # Its poster: the middle frame of exactly these frames, under the video key's stem.
        assert row["poster"] == storage.url(poster_key(row["id"]))
        assert storage.get_bytes(poster_key(row["id"])) == poster(frames), row["id"]
    assert storage.list("posters") == sorted(poster_key(r["id"]) for r in ROWS)
    assert verify(uri, options) == []
    success = read_success(storage)
    assert success["counts"]["ok"] == len(ROWS)
    assert success["versions"]["diffusers"]


def test_mp4_videos_decode_to_the_manifest_frame_count_and_size(tmp_path, file_output, inprocess):
    uri, options = file_output
    run(_config(tmp_path, uri, options, fmt="mp4"), progress=False)
    storage = Storage(uri, options)
    for row in read_manifest(storage).to_pylist():
        data = storage.get_bytes(storage.key_of(row["uri"]))
        assert row["uri"].endswith(".mp4") and len(data) == row["bytes"]
        frames = decode(data, "mp4")
        assert frames.shape == (row["num_frames"], row["height"], row["width"], 3), row["id"]
        image = Image.open(io.BytesIO(storage.get_bytes(storage.key_of(row["poster"]))))
        assert (image.format, image.size) == ("JPEG", (row["width"], row["height"])), row["id"]  # small: kept as is
    assert verify(uri, options) == []


def test_rerun_renders_nothing_a_changed_config_is_refused_and_verify_finds_damage(tmp_path, inprocess):
    uri = f"file://{tmp_path / 'out'}"
    first = run(_config(tmp_path, uri, None, rows=ROWS[:3]), progress=False)
    assert first.rendered == 3
    before = {k: Storage(uri).get_bytes(k) for k in Storage(uri).list("videos")}
    again = run(_config(tmp_path, uri, None, rows=ROWS[:3]), progress=False)
    assert (again.rendered, again.skipped, again.ok) == (0, 3, 3)
    assert {k: Storage(uri).get_bytes(k) for k in Storage(uri).list("videos")} == before
    with pytest.raises(ResumeConflict, match="num_inference_steps"):
        run(_config(tmp_path, uri, None, rows=ROWS[:3], extra=["render.num_inference_steps=3"]), progress=False)
    forced = run(_config(tmp_path, uri, None, rows=ROWS[:3], extra=["render.num_inference_steps=3"]),
                 force=True, progress=False)
    assert forced.rendered == 3
    assert {r["num_inference_steps"] for r in read_manifest(Storage(uri)).to_pylist()} == {3}
    # The same output, damaged: verify names a corrupted object by its checksum and a deleted one as missing.
    storage = Storage(uri)
    assert verify(uri) == []
    corrupt = storage.get_bytes("videos/plain.npy")
    storage.put_bytes("videos/plain.npy", corrupt[:-1] + bytes([corrupt[-1] ^ 0xFF]))
    storage.delete("videos/seeded.npy")
    problems = "\n".join(verify(uri))
    assert "plain" in problems and "sha256" in problems
    assert "seeded" in problems and "missing" in problems


def test_invalid_and_duplicate_rows_are_recorded_once_and_valid_rows_still_render(tmp_path, inprocess):
    rows = [{"id": "a", "prompt": "first"}, {"id": "b", "prompt": "second"}, {"id": "a", "prompt": "again"},
            {"id": "bad-frames", "prompt": "x", "num_frames": 16}, {"id": "blank", "prompt": "  "}]
    uri = f"file://{tmp_path / 'out'}"
    for attempt in range(2):  # the re-run must keep the same rows and render nothing
        result = run(_config(tmp_path, uri, None, rows=rows), progress=False)
        assert (result.rows, result.ok, result.invalid) == (5, 2, 3)
        assert result.rendered == (2 if attempt == 0 else 0)
        manifest = read_manifest(Storage(uri)).to_pylist()
        assert [(r["row_index"], r["id"], r["status"]) for r in manifest] == [
            (0, "a", "ok"), (1, "b", "ok"), (2, "a", "invalid"), (3, "bad-frames", "invalid"), (4, "blank", "invalid")]
        assert "duplicate of row 0" in manifest[2]["error"]
        assert "num_frames=16" in manifest[3]["error"]
        assert "prompt" in manifest[4]["error"]
        assert verify(uri) == [], "invalid rows, a duplicate id's included, are no problem of the output"
