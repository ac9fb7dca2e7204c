"""What `export` takes and how it describes it: the `--where` filter against the selection recomputed from the
source's Parquet files apart, refusals before anything is written, the dry run's counts, samples' fields and types,
splits by a hash of the id (recomputed here with hashlib)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from kandinsky_batch.cli import main
from kandinsky_batch.errors import InputError
from kandinsky_batch.export.samples import Samples, sample_rows
from kandinsky_batch.export.select import select, variant_of
from kandinsky_batch.export.stage import ExportArgs, run
from tests.export_output import CONDITION, ERRORED, UNSCORED, expected_rows, passes, write_source
from tests.scores_output import METRICS


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-select") / "src"
    write_source(str(root))
    return root


def _export(source, dest, *extra):
    return main(["export", str(source), "--format", "csv", "--to", str(dest), "--address", "inprocess", *extra])


def test_where_keeps_the_rows_a_recomputation_keeps_in_row_order(source):
    selection = select(str(source), None, CONDITION)
    want = [r["id"] for r in expected_rows(source, passes)]
    assert want and selection.table["id"].to_pylist() == want
    everything = select(str(source), None, None)
    assert everything.table["id"].to_pylist() == [r["id"] for r in expected_rows(source)]
    tiny_b = select(str(source), None, "sweep->>'model' = 'tiny-b' AND 'synthetic' IN tags")
    assert tiny_b.table["id"].to_pylist() == [r["id"] for r in expected_rows(source)
                                              if r["sweep"]["model"] == "tiny-b"]


@pytest.mark.parametrize("where, says", [
    ("1=1) UNION SELECT * FROM duckdb_settings() --", "syntax error"),
    ("id IN (SELECT column0 FROM read_csv('/etc/passwd'))", "disabled by configuration"),
    ("1=1; SET enable_external_access = true", "Parser Error"),
    ("clip_scor > 25", 'Referenced column "clip_scor" not found'),
])
def test_bad_conditions_are_refused_in_one_line_before_anything_is_written(source, tmp_path, capsys, where, says):
    dest = tmp_path / "out"
    assert _export(source, dest, "--where", where) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "--where" in err
    assert not dest.exists()


def test_the_dry_run_counts_per_variant_and_writes_nothing(source, tmp_path, capsys):
    dest = tmp_path / "out"
    assert _export(source, dest, "--where", CONDITION, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert not dest.exists()
    rows = expected_rows(source)
    kept = [r for r in rows if passes(r)]
    assert (f"ok rows: {len(rows)}; passing: {len(kept)}; excluded by the condition: {len(rows) - len(kept)}; "
            f"bytes: {sum(r['bytes'] for r in kept)}") in printed
    for variant in {json.dumps({k: v for k, v in r["sweep"].items() if k != "seed"}, sort_keys=True,
                               separators=(",", ":")) for r in rows}:
        mine = [r for r in rows if variant_of(json.dumps(r["sweep"])) == variant]
        line = next(line for line in printed.splitlines() if line.startswith(variant + " "))
        assert line.split()[1:] == [str(len(mine)), str(sum(map(passes, mine))),
                                    str(len(mine) - sum(map(passes, mine))),
                                    str(sum(r["bytes"] for r in mine if passes(r)))]


def test_samples_carry_every_field_with_one_type_each(source):
    selection = select(str(source), None, None)
    samples = list(Samples(sample_rows(selection, "prompt", {})))
    rows = {r["id"]: r for r in expected_rows(source)}
    assert [s.id for s in samples] == list(rows)
    keys = list(samples[0].meta)
    assert keys[:6] == ["id", "prompt", "expanded_prompt", "negative_prompt", "seed", "model"]
    assert {"guidance_scale", "num_inference_steps", "fps", "sweep", "licence", "tags", "dimension", *METRICS,
            "sha256"} <= set(keys)
    for name in keys:
        assert all(list(s.meta) == keys for s in samples)
        kinds = {type(s.meta[name]) for s in samples if s.meta[name] is not None}
        assert len(kinds) <= 1, (name, kinds)
    for sample in samples:
        row = rows[sample.id]
        assert "." not in sample.key and sample.meta["id"] == sample.id
        assert sample.meta["sha256"] == sample.sha256 == row["sha256"] and sample.bytes == row["bytes"]
        assert sample.media == {"mp4": row["key"], "jpg": row["poster_key"]}
        assert sample.caption == row["prompt"] and sample.meta["licence"] == row["licence"]
        assert sample.meta["tags"] == row["tags"] and sample.scores == METRICS
        assert {m: sample.meta[m] for m in METRICS} == {m: row[m] for m in METRICS}
        # Integral floats stay floats, in the sweep cell too (5 and 5.5 on one axis): a reader typing the field
        # from the first samples sees a float.
        assert isinstance(sample.meta["guidance_scale"], float) and '"guidance_scale":5.0' in json.dumps(
            sample.meta, separators=(",", ":"))
        assert isinstance(sample.meta["sweep"]["guidance_scale"], float)
        assert sample.meta["sweep"] == {k: float(v) if k == "guidance_scale" else v for k, v in row["sweep"].items()}
    assert {s.id for s in samples if s.meta["clip_score"] is None} == {UNSCORED, ERRORED}


def test_splits_follow_a_hash_of_the_id_whatever_else_is_selected(source):
    def point(row_id):
        return int(hashlib.sha256(row_id.encode()).hexdigest()[:16], 16) / 2**64

    every = sample_rows(select(str(source), None, None), "prompt", {"val": 0.3})
    some = sample_rows(select(str(source), None, CONDITION), "prompt", {"val": 0.3})
    want = {i: "val" if point(i) < 0.3 else "train" for i in every["id"].to_pylist()}
    assert dict(zip(every["id"].to_pylist(), every["split"].to_pylist())) == want
    assert dict(zip(some["id"].to_pylist(), some["split"].to_pylist())) == {i: want[i] for i in some["id"].to_pylist()}
    assert set(want.values()) == {"train", "val"}


def test_a_caption_the_rows_lack_is_refused(source):
    with pytest.raises(InputError, match=r"--caption=expanded_prompt: 22 selected rows have no expanded_prompt"):
        sample_rows(select(str(source), None, None), "expanded_prompt", {})


def test_an_unfinished_job_and_bad_options_are_refused(source, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(source, copy)
    os.remove(copy / "_SUCCESS")
    with pytest.raises(InputError, match="not a finished job output"):
        run(ExportArgs(str(copy), str(tmp_path / "out"), "csv"))
    for args, says in ((dict(split=(("val", 1.5),)), "a share in"), (dict(caption="text"), "--caption='text'"),
                       (dict(format="tar"), "--format='tar': unknown"), (dict(shard_size=0), "--shard-size=0")):
        with pytest.raises(InputError, match=says):
            run(ExportArgs(str(source), str(tmp_path / "out"), **{"format": "csv", **args}))
    assert not (tmp_path / "out").exists()
