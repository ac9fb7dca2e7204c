"""The export driver's narrow and batched paths give what one pass over every column and every row gives: the
manifest read of some columns against the read of all, the counts against a row-by-row recount, samples and each
format's metadata made a few rows at a time against the same made in one piece (and pyarrow's own type inference)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.errors import InputError
from kandinsky_batch.export import csv_manifest, samples, videofolder
from kandinsky_batch.export import webdataset as wds_format
from kandinsky_batch.export.plan import FILES_PER_UNIT, INDEX_SCHEMA, PLAN_SCHEMA, plan_new
from kandinsky_batch.output.manifest import parquet_bytes
from kandinsky_batch.export.samples import MANIFEST_COLUMNS, Samples, sample_rows
from kandinsky_batch.export.select import NO_SWEEP, Tally, select, variant_of
from kandinsky_batch.output.manifest import job_schema, read_manifest, to_table
from kandinsky_batch.output.storage import Storage
from tests.export_output import CONDITION, expected_rows, passes, write_source
from tests.export_source import put_sample


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-memory") / "src"
    write_source(str(root))
    return root


def test_a_read_of_some_columns_nulls_a_carried_column_a_part_lacks_as_a_read_of_all_does(tmp_path):
    storage = Storage(str(tmp_path))
    carried = pa.schema([("licence", pa.string())])
    rows = [{"id": f"r{i}", "row_index": i, "status": "ok", "key": f"videos/r{i}.mp4"} for i in range(4)]
    old = to_table(rows[:2], job_schema())
    new = to_table([{**r, "licence": "cc-by"} for r in rows[2:]], job_schema(carried))
    for name, table in (("part-a.parquet", old), ("part-b.parquet", new)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.put_bytes(f"manifest/{name}", buf.getvalue())
    columns = ["id", "row_index", "finished_at", "key", "licence"]
    narrow = read_manifest(storage, columns)
    assert narrow.column_names == columns
    assert narrow.to_pylist() == read_manifest(storage).select(columns).to_pylist()
    assert narrow["licence"].to_pylist() == [None, None, "cc-by", "cc-by"]


@pytest.mark.parametrize("where", [None, CONDITION, "attempts >= 1 AND worker IS NOT NULL",
                                   "COLUMNS('clip_.*') > 24", "sweep->>'model' = 'tiny-b' AND 'synthetic' IN tags"])
def test_a_selection_of_the_sample_columns_holds_the_rows_and_values_of_one_of_every_column(source, where):
    full = select(str(source), None, where)
    narrow = select(str(source), None, where, MANIFEST_COLUMNS)
    assert set(MANIFEST_COLUMNS) <= set(narrow.table.column_names)
    assert narrow.table.to_pylist() == full.table.select(narrow.table.column_names).to_pylist()
    assert (narrow.scores, narrow.carried, narrow.variants) == (full.scores, full.carried, full.variants)
    assert sample_rows(narrow, "prompt", {"val": 0.3}).equals(sample_rows(full, "prompt", {"val": 0.3}))


def test_an_unknown_column_is_refused_in_the_words_of_a_read_of_every_column(source):
    with pytest.raises(InputError) as full:
        select(str(source), None, "licence = 'cc-by' AND clip_scor > 25")
    with pytest.raises(InputError) as narrow:
        select(str(source), None, "licence = 'cc-by' AND clip_scor > 25", MANIFEST_COLUMNS)
    assert str(narrow.value) == str(full.value) and "clip_scor" in str(full.value)


def test_the_counts_per_variant_are_a_row_by_row_recount(source):
    want: dict[str, Tally] = {}
    for row in expected_rows(source):
        tally = want.setdefault(variant_of(json.dumps(row["sweep"])) if row["sweep"] else NO_SWEEP, Tally())
        tally.ok += 1
        if passes(row):
            tally.passing, tally.bytes = tally.passing + 1, tally.bytes + (row["bytes"] or 0)
        else:
            tally.excluded += 1
    assert select(str(source), None, CONDITION, MANIFEST_COLUMNS).variants == dict(sorted(want.items()))


def test_samples_made_a_few_rows_at_a_time_are_the_table_made_in_one(source, monkeypatch):
    selection = select(str(source), None, None, MANIFEST_COLUMNS)
    whole = sample_rows(selection, "prompt", {"val": 0.3})
    monkeypatch.setattr(samples, "BATCH_ROWS", 3)
    batched = sample_rows(selection, "prompt", {"val": 0.3})
    assert whole.num_rows > 3 and batched.equals(whole)
    assert all(column.num_chunks == 1 for column in batched.columns)
    assert parquet_bytes(batched) == parquet_bytes(whole)


def _meta_samples(tmp_path) -> list:
    """Samples whose fields change type after the first batch: int then float, null then text, a struct that gains
    a field, an empty list then floats."""
    source = Storage(str(tmp_path / "src"))
    metas = [{"a": 1, "b": None, "c": {"x": 1}, "d": []}, {"a": 2, "b": None, "c": {"x": 2}, "d": []},
             {"a": 2.5, "b": "s", "c": {"y": "t"}, "d": [1.5]}, {"a": 3, "b": None, "c": None, "d": [2.0, 3.0]},
             {"a": None, "b": "u", "c": {"x": 4, "y": "v"}, "d": None}]
    return [put_sample(source, f"r.{i}", i, meta, split="val" if i == 3 else "train") for i, meta in enumerate(metas)]


def test_videofolder_types_each_field_as_arrow_types_all_its_values(tmp_path, monkeypatch):
    rows = _meta_samples(tmp_path)
    monkeypatch.setattr(samples, "BATCH_ROWS", 2)
    want = pa.schema([("file_name", pa.string()),
                      *((name, pa.array([s.meta.get(name) for s in rows]).type) for name in rows[0].meta)])
    assert videofolder._schema(rows) == want
    dest = Storage(str(tmp_path / "dest"))
    videofolder.finish(dest, INDEX_SCHEMA.empty_table(), rows)
    for split in ("train", "val"):
        table = pa.Table.from_pylist([{"file_name": f"{s.key}.mp4", **s.meta} for s in rows if s.split == split],
                                     schema=want)
        assert dest.get_bytes(f"{split}/metadata.parquet") == parquet_bytes(table)


def test_the_csv_manifest_made_a_few_rows_at_a_time_is_the_one_made_in_one(tmp_path, monkeypatch):
    rows = [put_sample(Storage(str(tmp_path / "src")), f"r.{i}", i,
                       {"height": 32, "width": 48 + i, "num_frames": 9, "fps": 8, "clip_score": 20.5 + i})
            for i in range(5)]
    rows = [type(s)(**{**vars(s), "scores": ("clip_score",)}) for s in rows]
    index = pa.Table.from_pylist([{"key": s.key, "id": s.id, "split": s.split, "unit": "train-000000",
                                   "path": f"file:///src/{s.key}.mp4", "offset": 0, "sha256": s.sha256,
                                   "bytes": s.bytes} for s in reversed(rows)], schema=INDEX_SCHEMA)
    whole, batched = Storage(str(tmp_path / "whole")), Storage(str(tmp_path / "batched"))
    csv_manifest.finish(whole, index, rows)
    monkeypatch.setattr(samples, "BATCH_ROWS", 2)
    csv_manifest.finish(batched, index, rows)
    for name in ("manifest.csv", "manifest.parquet"):
        assert batched.get_bytes(name) == whole.get_bytes(name)
    assert whole.get_bytes("manifest.csv").decode().splitlines()[1].startswith(f'"file:///src/{rows[0].key}.mp4"')


def test_webdataset_finish_writes_the_card_check_made_of_the_same_samples(source, tmp_path):
    checked = Samples(sample_rows(select(str(source), None, None, MANIFEST_COLUMNS), "prompt", {}))
    wds_format.check(checked)
    assert checked.memo[wds_format.CARD] == wds_format.dataset_card(list(checked))
    for name, given in (("memo", checked), ("fresh", Samples(checked.table))):
        dest = Storage(str(tmp_path / name))
        wds_format.finish(dest, INDEX_SCHEMA.empty_table(), given)
        assert dest.get_bytes(wds_format.CARD) == wds_format.dataset_card(list(checked))


def test_a_key_two_sample_rows_share_is_refused_naming_both_ids(source):
    rows = sample_rows(select(str(source), None, None, MANIFEST_COLUMNS), "prompt", {})
    twice = pa.concat_tables([rows, rows.slice(3, 1)])
    with pytest.raises(InputError, match=f"key {rows['key'][3].as_py()!r} is shared by ids"):
        wds_format.check(Samples(twice))


@pytest.mark.parametrize("sharded, shard_size, shard_bytes", [(True, 3, None), (True, None, 9_000), (True, 2, 9_000),
                                                              (True, None, None), (False, None, None), (False, 4, 1)])
def test_units_are_planned_by_the_rule_walked_sample_by_sample(source, sharded, shard_size, shard_bytes):
    rows = sample_rows(select(str(source), None, None, MANIFEST_COLUMNS), "prompt", {"val": 0.3})
    earlier = plan_new(PLAN_SCHEMA.empty_table(), rows.slice(0, 2), sharded, shard_size, shard_bytes)
    new = plan_new(earlier, rows, sharded, shard_size, shard_bytes)
    limit, cap = (shard_size, shard_bytes) if sharded else (shard_size or FILES_PER_UNIT, None)
    want = {}
    for split in sorted(set(rows["split"].to_pylist())):
        done = [u for u in earlier["unit"].to_pylist() if u.startswith(f"{split}-")]
        index, count, size = (int(max(done).rsplit("-", 1)[1]) + 1 if done else 0), 0, 0
        for row in rows.slice(2).to_pylist():
            if row["split"] != split:
                continue
            if (limit is not None and count >= limit) or (cap is not None and count and size + row["bytes"] > cap):
                index, count, size = index + 1, 0, 0
            want[row["key"]] = f"{split}-{index:06d}"
            count, size = count + 1, size + row["bytes"]
    assert dict(zip(new["key"].to_pylist(), new["unit"].to_pylist())) == want
    assert new["key"].to_pylist() == rows.slice(2)["key"].to_pylist()
