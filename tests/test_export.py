"""Exporting a scored job: videofolder read back by `datasets`, the csv manifest's columns, a sharded format's
plan, exactly once (a re-run writes nothing, a SIGKILLed export resumes to the same bytes as an uninterrupted one,
new rows add new units only), DEST bound to its arguments, an S3 destination, real Ray.

Oracles: the source's Parquet files read apart (`tests/export_output.py`), each video's sha256 recomputed here."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.errors import InputError
from kandinsky_batch.export import formats
from kandinsky_batch.export.objects import publish_once as publish
from kandinsky_batch.export.sample import IndexRow
from kandinsky_batch.export.stage import ExportArgs, run
from kandinsky_batch.output.storage import Storage
from tests.export_output import CONDITION, add_rows, copy_output, expected_rows, passes, write_source
from tests.scores_output import METRICS
from tests.sweep_output import PROMPTS


ROOT = Path(__file__).resolve().parents[1]
SPLIT = (("val", 0.3),)


def _args(source, dest, fmt="videofolder", **kw) -> ExportArgs:
    given = dict(where=CONDITION, split=SPLIT, shard_size=3, address="inprocess")
    return ExportArgs(str(source), str(dest), fmt, **{**given, **kw})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stamps(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("export") / "src"
    write_source(str(root))
    return root


@pytest.fixture(scope="module")
def videofolder(source):
    dest = source.parent / "videofolder"
    run(_args(source, dest))
    return dest


def test_videofolder_reads_back_with_datasets(videofolder, source, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    loaded = datasets.load_dataset("videofolder", data_dir=str(videofolder))
    assert set(loaded) == {"train", "validation"}
    want = {r["id"]: r for r in expected_rows(source, passes)}
    seen = {}
    for split, ds in loaded.items():
        ds = ds.cast_column("video", datasets.Video(decode=False))
        for row in ds:
            assert row["id"] not in seen
            seen[row["id"]] = split
            data = Path(row["video"]["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"] == want[row["id"]]["sha256"]
            assert {m: row[m] for m in METRICS} == {m: want[row["id"]][m] for m in METRICS}
            assert (row["licence"], row["tags"], row["guidance_scale"]) == (
                want[row["id"]]["licence"], want[row["id"]]["tags"], want[row["id"]]["guidance_scale"])
    assert set(seen) == set(want)
    split_of = {r["id"]: r["split"] for r in pq.read_table(videofolder / "index.parquet").to_pylist()}
    assert seen == {i: {"train": "train", "val": "validation"}[s] for i, s in split_of.items()}
    # One schema for every split: a null-only column in one split keeps the other's type.
    schemas = {split: pq.read_schema(videofolder / split / "metadata.parquet") for split in ("train", "val")}
    assert schemas["train"] == schemas["val"] and schemas["train"].names[0] == "file_name"


def test_the_index_finds_every_sample_and_its_bytes(videofolder, source):
    index = pq.read_table(videofolder / "index.parquet").to_pylist()
    assert [r["id"] for r in sorted(index, key=lambda r: r["id"])] == sorted(
        r["id"] for r in expected_rows(source, passes))
    for row in index:
        data = (videofolder / row["path"]).read_bytes()
        assert row["offset"] == 0 and len(data) == row["bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"]
        assert row["path"] == f"{row['split']}/{row['key']}.mp4" and row["unit"].startswith(row["split"] + "-")
    units = {}
    for row in index:
        units.setdefault(row["unit"], []).append(row)
    assert all(len(members) <= 3 for members in units.values())


def test_csv_is_an_open_sora_manifest_of_the_videos_where_they_are(source, tmp_path):
    dest = tmp_path / "csv"
    run(_args(source, dest, "csv"))
    table = pcsv.read_csv(dest / "manifest.csv")
    assert table.column_names == ["path", "text", "num_frames", "fps", "width", "height", "aspect_ratio",
                                  "resolution", *METRICS, "id", "split"]
    assert pq.read_table(dest / "manifest.parquet").to_pylist() == table.to_pylist()
    want = {r["id"]: r for r in expected_rows(source, passes)}
    assert sorted(table["id"].to_pylist()) == sorted(want)
    for row in table.to_pylist():
        r = want[row["id"]]
        assert row["path"] == f"file://{source}/{r['key']}"
        assert hashlib.sha256(Path(row["path"][len("file://"):]).read_bytes()).hexdigest() == r["sha256"]
        assert (row["text"], row["num_frames"], row["fps"], row["width"], row["height"]) == (
            r["prompt"], r["num_frames"], r["fps"], r["width"], r["height"])
        assert row["aspect_ratio"] == r["height"] / r["width"] and row["resolution"] == r["height"] * r["width"]
        assert {m: row[m] for m in METRICS} == {m: r[m] for m in METRICS}
    assert not list(dest.glob("**/*.mp4"))


def test_a_rerun_writes_nothing_and_other_arguments_are_refused(videofolder, source):
    before, stamps = _files(videofolder), _stamps(videofolder)
    result = run(_args(source, videofolder))
    assert (result.planned, result.written) == (0, 0)
    assert _files(videofolder) == before and _stamps(videofolder) == stamps
    for changed, says in ((dict(where="clip_score > 0"), "where: "), (dict(split=(("val", 0.1),)), "split: "),
                          (dict(caption="expanded_prompt"), "caption: "), (dict(shard_size=5), "shard_size: 3 there"),
                          (dict(fmt="csv"), "format: 'videofolder' there, 'csv' now")):
        with pytest.raises(InputError, match=says):
            run(_args(source, videofolder, **changed))
    assert _files(videofolder) == before and _stamps(videofolder) == stamps


def test_new_rows_go_into_new_units_after_the_last(videofolder, source, tmp_path):
    grown, dest = tmp_path / "src", tmp_path / "videofolder"
    shutil.copytree(source, grown)
    shutil.copytree(videofolder, dest)
    before, stamps = _files(dest), _stamps(dest)
    old_units = {r["unit"] for r in pq.read_table(dest / "index.parquet").to_pylist()}
    new_ids = add_rows(Storage(str(grown)), PROMPTS + ["a lighthouse in a storm", "a cat on a piano"])
    result = run(_args(grown, dest))
    index = pq.read_table(dest / "index.parquet").to_pylist()
    assert sorted(r["id"] for r in index) == sorted(r["id"] for r in expected_rows(grown, passes))
    added = [r for r in index if r["id"] in new_ids]
    assert added and result.planned == len(added)
    assert not {r["unit"] for r in added} & old_units
    for split in ("train", "val"):
        last = max(int(u.rsplit("-", 1)[1]) for u in old_units if u.startswith(split))
        assert min(int(r["unit"].rsplit("-", 1)[1]) for r in added if r["split"] == split) == last + 1
    after, after_stamps = _files(dest), _stamps(dest)
    for name in before:  # every object and unit part kept as it was; only metadata, index, _SUCCESS replaced
        if not name.endswith(("metadata.parquet", "index.parquet", "_SUCCESS")):
            assert after[name] == before[name] and after_stamps[name] == stamps[name], name


# Each split's first unit at once, the others only after a while: the kill lands between, whatever the host's cores.
_SLOW = ("import sys, time\n"
         "from kandinsky_batch.export import videofolder as v\n"
         "w = v.write_unit\n"
         "v.write_unit = lambda u, *a: (time.sleep(0 if u.name.endswith('-000000') else 30), w(u, *a))[1]\n"
         "from kandinsky_batch.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def test_a_sigkilled_export_resumes_to_the_bytes_of_an_uninterrupted_one(source, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    argv = [str(source), "--format", "videofolder", "--where", CONDITION, "--split", "val=0.3",
            "--shard-size", "1", "--address", "inprocess"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, "export", *argv, "--to", str(killed)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300  # only against hanging
    while not list((killed / ".export" / "units").glob("*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list((killed / ".export" / "units").glob("*.parquet"))
    total = len(expected_rows(source, passes))
    assert 1 <= len(done) < total and not (killed / "_SUCCESS").exists()
    result = run(_args(source, killed, shard_size=1))
    assert result.planned == 0 and result.written == total - len(done)
    run(_args(source, whole, shard_size=1))
    got, want = _files(killed), _files(whole)
    got.pop("_SUCCESS"), want.pop("_SUCCESS")
    assert got == want


class FakeShards:
    """A test-local sharded format: each unit one object of its members' bytes, one after another."""

    NAME, SHARDED = "fake", True

    @staticmethod
    def check(samples):
        pass

    @staticmethod
    def write_unit(unit, source, dest):
        rows, blob = [], b""
        for sample in unit.samples:
            data = source.get_bytes(sample.media["mp4"])
            rows.append(IndexRow(sample.key, sample.id, unit.split, unit.name, f"{unit.name}.bin", len(blob),
                                 hashlib.sha256(data).hexdigest(), len(data)))
            blob += data
        publish(dest, f"{unit.name}.bin", blob)
        return rows

    @staticmethod
    def finish(dest, index, samples):
        pass


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(formats.FORMATS, "fake", "tests.test_export")
    monkeypatch.setattr(sys.modules[__name__], "NAME", "fake", raising=False)
    for name in ("SHARDED", "check", "write_unit", "finish"):
        monkeypatch.setattr(sys.modules[__name__], name, getattr(FakeShards, name), raising=False)


def test_shards_hold_whole_samples_by_count_or_bytes_in_order(fake, source, tmp_path):
    rows = expected_rows(source)
    limit = 2 * max(r["bytes"] for r in rows)
    for name, kw in (("count", dict(shard_size=4)), ("bytes", dict(shard_size=None, shard_bytes=limit))):
        dest = tmp_path / name
        run(_args(source, dest, "fake", where=None, split=(), **kw))
        index = pq.read_table(dest / "index.parquet").to_pylist()
        assert [r["id"] for r in index] == [r["id"] for r in rows]  # shard order is sample order
        by_unit = {}
        for r in index:
            by_unit.setdefault(r["unit"], []).append(r)
        assert list(by_unit) == [f"train-{i:06d}" for i in range(len(by_unit))]
        for unit, members in by_unit.items():
            blob = (dest / f"{unit}.bin").read_bytes()
            assert [hashlib.sha256(blob[m["offset"]:m["offset"] + m["bytes"]]).hexdigest() for m in members] == [
                m["sha256"] for m in members]
            if name == "count":
                assert len(members) == 4 or unit == list(by_unit)[-1]
            else:
                assert len(blob) <= limit
                nxt = list(by_unit).index(unit) + 1
                if nxt < len(by_unit):  # closed only because the next sample would not fit
                    assert len(blob) + by_unit[list(by_unit)[nxt]][0]["bytes"] > limit


def test_an_s3_export_writes_what_a_local_one_does(s3_output, tmp_path, videofolder, source):
    uri, options = s3_output
    copy_output(source, Storage(f"{uri}/src", options))
    run(_args(f"{uri}/src", f"{uri}/dest", storage_options=options))
    dest = Storage(f"{uri}/dest", options)
    local = _files(videofolder)
    got = {key: dest.get_bytes(key) for key in dest.list()}
    local.pop("_SUCCESS"), got.pop("_SUCCESS")
    assert got == local


@pytest.fixture
def ray_one_cpu(model_cache):
    """`ray_local` (tests/conftest.py) with one CPU: the units' tasks run one after another on one worker process,
    where eight CPUs would start a worker, and pay its imports, per task."""
    import ray

    from kandinsky_batch.fleet.local_ray import start_local

    start_local(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1",
                runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield
    finally:
        ray.shutdown()


def test_units_run_as_ray_tasks(ray_one_cpu, videofolder, source, tmp_path):
    dest = tmp_path / "ray"
    result = run(_args(source, dest, address=None, shard_size=None))  # 256 a unit: one task per split
    assert result.written == result.units == 2
    got, want = _files(dest), _files(videofolder)
    assert {k: v for k, v in got.items() if k.startswith(("train/", "val/"))} == {
        k: v for k, v in want.items() if k.startswith(("train/", "val/"))}
    assert pq.read_table(dest / "index.parquet").drop_columns(["unit"]).sort_by("id") == pq.read_table(
        videofolder / "index.parquet").drop_columns(["unit"]).sort_by("id")
