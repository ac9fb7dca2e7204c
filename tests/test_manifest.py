"""Manifest parts on local disk and S3: flushing, resolution to one row per id, compaction, schema checks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from kandinsky_batch.output.manifest import (SCHEMA, ManifestWriter, parquet_bytes, read_columns, read_manifest,
                                             read_parts, to_table)
from kandinsky_batch.output.success import read_success, write_success
from kandinsky_batch.output.storage import Storage
from tests.helpers import compact

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)


def row(i: int, seconds: int = 0, **fields) -> dict:
    return {"id": f"r{i}", "row_index": i, "status": "ok", "finished_at": T0 + timedelta(seconds=seconds), **fields}


def part_keys(storage: Storage) -> list[str]:
    return storage.list("manifest")


def test_schema_columns_in_order():
    assert SCHEMA.names[:4] == ["id", "row_index", "prompt", "negative_prompt"]
    assert SCHEMA.names == [
        "id", "row_index", "prompt", "negative_prompt", "expanded_prompt", "image_uri", "image_sha256", "source_uri",
        "source_sha256", "status", "error", "key", "uri", "bytes", "sha256", "poster_key", "poster", "seed", "height",
        "width", "num_frames", "num_inference_steps", "guidance_scale", "fps", "format", "audio_sample_rate",
        "audio_seconds", "model", "model_revision", "weights", "sweep", "sweep_model", "sweep_seed_index", "worker",
        "gang", "options", "approximate", "attempts", "render_seconds", "finished_at",
        "latents_key", "latents_sha256", "latents_bytes",
    ]
    assert not SCHEMA.field("id").nullable
    assert str(SCHEMA.field("finished_at").type) == "timestamp[us, tz=UTC]"


def test_writer_flushes_parts_by_count(output_target):
    storage = Storage(*output_target)
    writer = ManifestWriter(storage, "run1", flush_rows=3, flush_seconds=3600)
    for i in range(7):
        writer.add(row(i))
    assert part_keys(storage) == ["manifest/part-run1-000000.parquet", "manifest/part-run1-000001.parquet"]
    assert writer.flush() == "manifest/part-run1-000002.parquet"
    assert writer.flush() is None
    table = read_manifest(storage)
    assert table.schema == SCHEMA
    assert table["id"].to_pylist() == [f"r{i}" for i in range(7)]
    assert table["prompt"].null_count == 7  # missing keys become null


def test_writer_flushes_by_age(output_target):
    storage = Storage(*output_target)
    writer = ManifestWriter(storage, "run1", flush_rows=1000, flush_seconds=0.0)
    writer.add(row(0))
    writer.add(row(1))
    assert len(part_keys(storage)) == 2


def test_read_manifest_resolves_duplicates_to_latest(output_target):
    storage = Storage(*output_target)
    # "b" sorts after "a", so run "b" parts win ties; r0's latest row is nevertheless in run "a".
    a = ManifestWriter(storage, "a", flush_rows=100)
    b = ManifestWriter(storage, "b", flush_rows=100)
    a.add(row(0, seconds=50, status="ok", worker="a"))
    b.add(row(0, seconds=10, status="failed", worker="b"))
    a.add(row(1, seconds=5, status="failed", worker="a"))
    b.add(row(1, seconds=5, status="ok", worker="b"))  # tie: the later part wins
    a.add(row(2, seconds=0, worker="a"))
    b.add({"id": "r2", "row_index": 2, "status": "failed", "worker": "b"})  # no finished_at: oldest
    a.add(row(3, worker="a"))
    a.flush()
    b.flush()
    raw, parts = read_parts(storage)
    assert raw.num_rows == 7 and len(parts) == 2
    table = read_manifest(storage)
    assert table["id"].to_pylist() == ["r0", "r1", "r2", "r3"]
    assert table["worker"].to_pylist() == ["a", "b", "a", "a"]


def test_compact_leaves_one_resolved_part(output_target):
    storage = Storage(*output_target)
    for run in ("a", "b"):
        writer = ManifestWriter(storage, run, flush_rows=2)
        for i in range(5):
            writer.add(row(i, seconds=1 if run == "b" else 0, worker=run))
        writer.flush()
    assert len(part_keys(storage)) == 6
    before = read_manifest(storage)
    compacted = compact(storage, "final-run")
    assert part_keys(storage) == ["manifest/part-final-run-final.parquet"]
    assert compacted.equals(before)
    assert read_manifest(storage).equals(before)
    assert read_parts(storage)[0].num_rows == 5
    compact(storage, "final-run")  # idempotent
    assert part_keys(storage) == ["manifest/part-final-run-final.parquet"]


def test_empty_manifest_has_the_schema(output_target):
    storage = Storage(*output_target)
    table = read_manifest(storage)
    assert table.num_rows == 0 and table.schema == SCHEMA


def test_parts_written_before_a_column_existed_read_it_as_null(output_target):
    """An output resumed by a newer version: its older parts lack `expanded_prompt` and read with it null."""
    storage = Storage(*output_target)
    older = pa.schema([f for f in SCHEMA if f.name != "expanded_prompt"])
    storage.put_bytes("manifest/part-old-000000.parquet",
                      parquet_bytes(pa.Table.from_pylist([row(0, prompt="a cat")], schema=older)))
    writer = ManifestWriter(storage, "new")
    writer.add(row(1, prompt="a dog", expanded_prompt="a dog, running"))
    writer.flush()
    table = read_manifest(storage)
    assert table.schema == SCHEMA and table["expanded_prompt"].to_pylist() == [None, "a dog, running"]
    assert read_columns(storage, ["id", "expanded_prompt"]).sort_by("id")["expanded_prompt"].to_pylist() == [
        None, "a dog, running"]


def test_rows_are_validated_against_the_schema():
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        to_table([row(0, colour="red")])
    with pytest.raises(ValueError, match="string 'id'"):
        to_table([{"row_index": 0}])
    with pytest.raises(ValueError, match="status='done'"):
        to_table([row(0, status="done")])
    with pytest.raises(ValueError, match="r0"):
        to_table([row(0, height="tall")])
    assert to_table([row(0, height=512)])["height"].to_pylist() == [512]


def test_writer_rejects_bad_rows_at_add(output_target):
    storage = Storage(*output_target)
    writer = ManifestWriter(storage, "run1")
    with pytest.raises(ValueError, match="unknown keys"):
        writer.add(row(0, colour="red"))
    assert writer.flush() is None


def test_reused_run_id_with_other_rows_is_refused(output_target):
    storage = Storage(*output_target)
    first = ManifestWriter(storage, "same")
    first.add(row(0))
    first.flush()
    second = ManifestWriter(storage, "same")
    second.add(row(1))
    with pytest.raises(RuntimeError, match="reused"):
        second.flush()
    assert read_manifest(storage)["id"].to_pylist() == ["r0"]


def test_success_marker_round_trip(output_target):
    storage = Storage(*output_target)
    assert read_success(storage) is None
    write_success(storage, {"rows": 3, "ok": 2, "finished_at": T0})
    assert read_success(storage) == {"rows": 3, "ok": 2, "finished_at": str(T0)}
    assert storage.get_bytes("_SUCCESS").decode().startswith("{\n")
