"""The output prefix as a contract: every record kept, objects found wherever the prefix now is, the user's columns
carried through, and the media readable by Hugging Face `datasets` with a path join.

One job renders once (module fixture); each test works on its own copy of that output.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import urllib.request
from datetime import date
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.layout import MANIFEST_DIR
from kandinsky_batch.output.report import write_report
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import verify
from tests.conftest import S3_BUCKET
from tests.helpers import TINY_RENDER

pytestmark = pytest.mark.slow

USER = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("caption", pa.string()),
                  ("tags", pa.list_(pa.string())), ("score", pa.float32()), ("shot", pa.date32()),
                  ("status", pa.string())])
ROWS = [
    {"id": f"a{i}", "prompt": f"a cat number {i}", "caption": f"cat {i}", "tags": ["cat", f"n{i}"],
     "score": i / 2, "shot": date(2026, 1, i + 1), "status": "licensed" if i % 2 else "pending"}
    for i in range(4)
]


def _cfg(data: Path, out: Path, *extra: str):
    return load_config(None, [f"input.path={data}", f"output.uri={out}", "output.format=mp4", "cluster.replicas=1",
                              *TINY_RENDER, *extra])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, inprocess_module) -> tuple[Path, Path]:
    """(dataset, output) of one finished 4-row job with user columns."""
    root = tmp_path_factory.mktemp("contract")
    data = root / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS, schema=USER), data)
    out = root / "out"
    result = run(_cfg(data, out), progress=False)
    assert (result.ok, result.rendered) == (4, 4)
    return data, out


def _copy(out: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(out, target)
    return target


def _hidden(out: Path):
    """Move the original output out of the way, so nothing read afterwards can come from it."""
    class Hide:
        def __enter__(self):
            out.rename(out.with_name(out.name + ".hidden"))

        def __exit__(self, *exc):
            out.with_name(out.name + ".hidden").rename(out)
    return Hide()


def test_the_users_columns_go_through_to_the_manifest_with_their_types(rendered):
    _, out = rendered
    manifest = read_manifest(Storage(str(out)))
    schema = manifest.schema
    assert schema.field("caption").type == pa.string() and schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("score").type == pa.float32() and schema.field("shot").type == pa.date32()
    # An input column named like a manifest column keeps its values under `input_NAME`; the row's status is the job's.
    assert schema.field("input_status").type == pa.string()
    by_id = {r["id"]: r for r in manifest.to_pylist()}
    for row in ROWS:
        got = by_id[row["id"]]
        assert (got["caption"], got["tags"], got["score"], got["shot"]) == (
            row["caption"], row["tags"], row["score"], row["shot"])
        assert (got["input_status"], got["status"]) == (row["status"], "ok")


def test_objects_are_recorded_by_key_relative_to_the_prefix(rendered):
    from pipelines import resolve_model
    from pipelines.weights import directory_digest

    _, out = rendered
    raw = pq.read_table(next((out / MANIFEST_DIR).glob("*.parquet"))).to_pylist()
    for row in raw:
        assert row["key"] == f"videos/{row['id']}.mp4" and row["poster_key"] == f"posters/{row['id']}.jpg"
        assert row["uri"] is None and row["poster"] is None  # nothing absolute is stored
        # The weights that rendered it: the tiny preset's files, hashed.
        assert row["weights"] == f"sha256:{directory_digest(resolve_model('tiny'))}"


def test_a_copied_output_verifies_reports_and_resumes_from_where_it_is_now(rendered, tmp_path):
    data, out = rendered
    moved = _copy(out, tmp_path)
    with _hidden(out):
        assert verify(str(moved)) == []
        index = write_report(str(moved))
        page = Path(index).read_text()
        hrefs = re.findall(r'(?:href|src|data-video)="([^"]+\.(?:mp4|jpg))"', page)
        assert hrefs, "the report links no video"
        for href in hrefs:
            target = (Path(index).parent / href).resolve()
            assert target.is_file() and moved.resolve() in target.parents, href
        again = run(_cfg(data, moved), progress=False)
        assert (again.rendered, again.skipped, again.ok) == (0, 4, 4)
        assert {r["uri"] for r in read_manifest(Storage(str(moved))).to_pylist()} == {
            f"file://{moved}/videos/a{i}.mp4" for i in range(4)}


def test_another_dataset_or_a_subset_into_the_prefix_keeps_every_earlier_record(rendered, tmp_path):
    data, out = rendered
    prefix = _copy(out, tmp_path)
    # A subset of the same dataset: nothing renders, nothing is dropped.
    subset = tmp_path / "subset.parquet"
    pq.write_table(pq.read_table(data).slice(0, 2), subset)
    result = run(_cfg(subset, prefix), progress=False)
    assert (result.rows, result.rendered, result.skipped, result.kept) == (2, 0, 2, 2)
    assert len(read_manifest(Storage(str(prefix)))) == 4 and verify(str(prefix)) == []
    # Another dataset, other columns: its rows join the earlier ones, each keeping its own columns.
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["b0", "b1"], "prompt": ["a dog", "a red car"], "source": ["web", "studio"],
                             "num_frames": [5, 9]}), other)
    result = run(_cfg(other, prefix), progress=False)
    assert (result.rows, result.ok, result.rendered, result.kept) == (2, 2, 2, 4)
    rows = {r["id"]: r for r in read_manifest(Storage(str(prefix))).to_pylist()}
    assert sorted(rows) == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert all(rows[i]["status"] == "ok" for i in rows)
    assert (rows["a1"]["caption"], rows["a1"]["source"]) == ("cat 1", None)
    assert (rows["b1"]["caption"], rows["b1"]["source"], rows["b1"]["num_frames"]) == (None, "studio", 9)
    assert verify(str(prefix)) == []


def test_hugging_face_datasets_opens_the_media_with_a_path_join(rendered, tmp_path):
    import datasets  # a test dependency (pyproject [test]), not a runtime one
    prefix = _copy(out := rendered[1], tmp_path)
    with _hidden(out):
        ds = datasets.load_dataset("parquet", data_files=str(prefix / "manifest" / "*.parquet"), split="train")
        ds = ds.map(lambda row: {"video": str(prefix / row["key"]), "image": str(prefix / row["poster_key"])})
        ds = ds.cast_column("video", datasets.Video(decode=False)).cast_column("image", datasets.Image())
        assert len(ds) == 4
        for row in ds:
            with open(row["video"]["path"], "rb") as handle:
                assert hashlib.sha256(handle.read()).hexdigest() == row["sha256"]
            assert row["image"].size == (32, 32)  # the poster decodes through datasets' Image feature
            assert row["caption"].startswith("cat ")


def test_an_output_synced_to_another_s3_prefix_verifies_reports_and_resumes(rendered, tmp_path,
                                                                             s3_storage_options):
    data, out = rendered
    fs = fsspec.filesystem("s3", **s3_storage_options)
    first, second = f"{S3_BUCKET}/synced", f"{S3_BUCKET}/elsewhere/again"
    fs.put(f"{out}/", f"{first}/", recursive=True)  # `aws s3 sync out s3://b/synced`
    fs.copy(f"{first}/", f"{second}/", recursive=True)  # then to another prefix of the bucket
    fs.rm(first, recursive=True)
    uri = f"s3://{second}"
    with _hidden(out):
        assert verify(uri, s3_storage_options) == []
        index = write_report(uri, tmp_path / "report", storage_options=s3_storage_options)
        page = Path(index).read_text()
        links = [html.unescape(link) for link in re.findall(r'data-video="(http[^"]+)"', page)]
        assert len(links) == 4 and all("/elsewhere/again/videos/" in link for link in links), links[:2]
        shas = {r["key"]: r["sha256"] for r in read_manifest(Storage(uri, s3_storage_options)).to_pylist()}
        for link in links:  # presigned: they play from the new prefix
            with urllib.request.urlopen(link, timeout=10) as response:
                key = "videos/" + link.split("?")[0].rsplit("/", 1)[1]
                assert hashlib.sha256(response.read()).hexdigest() == shas[key]
        cfg = _cfg(data, Path("/unused"))
        cfg.output.uri, cfg.output.storage_options = uri, s3_storage_options
        again = run(cfg, progress=False)
        assert (again.rendered, again.skipped) == (0, 4)


def test_an_older_output_recorded_by_absolute_uris_still_reads_after_a_move(rendered, tmp_path):
    _, out = rendered
    prefix = _copy(out, tmp_path)
    # As outputs were written before the key columns: absolute URIs of a folder that no longer exists.
    [part] = (prefix / MANIFEST_DIR).glob("*.parquet")
    table = pq.read_table(part)
    old = table.drop_columns(["key", "poster_key"])
    old = old.set_column(old.schema.get_field_index("uri"), "uri",
                         pa.array([f"file:///gone/out/{k}" for k in table["key"].to_pylist()]))
    old = old.set_column(old.schema.get_field_index("poster"), "poster",
                         pa.array([f"file:///gone/out/{k}" for k in table["poster_key"].to_pylist()]))
    pq.write_table(old, part)
    assert verify(str(prefix)) == []
    rows = read_manifest(Storage(str(prefix))).to_pylist()
    assert {r["key"] for r in rows} == {f"videos/a{i}.mp4" for i in range(4)}
    assert all(os.path.exists(r["uri"][len("file://"):]) for r in rows)


def test_a_pinned_hub_revision_loads_that_snapshot_and_is_recorded(tmp_path, monkeypatch, model_cache):
    import huggingface_hub.constants as hub

    from kandinsky_batch.config.schema import ConfigError
    from kandinsky_batch.intake.preflight import preflight
    from pipelines import resolve_model
    from pipelines.resolve import pinned
    from pipelines.weights import weights_fingerprint

    # A hub snapshot in a Hugging Face cache of its own (offline: nothing is downloaded here).
    repo, commit = "kandinskylab/Tiny-Diffusers", "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hub" / "models--kandinskylab--Tiny-Diffusers"
    shutil.copytree(resolve_model("tiny"), folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    data = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"]}), data)

    cfg = _cfg(data, tmp_path / "out", f"model.path={repo}", f"model.revision={commit[:12]}")
    cfg.model.revision = commit
    checked = preflight(cfg)
    assert checked.stamp.row({})["model_revision"] == commit and checked.spec.kind == "t2v"
    assert resolve_model(pinned(repo, commit)) == str(folder / "snapshots" / commit)
    assert weights_fingerprint(pinned(repo, commit)) == f"hub:{repo}@{commit}"
    for path in ("tiny", str(tmp_path)):
        with pytest.raises(ConfigError, match=r"model.revision='v1': model.path=.* is not a hub id"):
            preflight(_cfg(data, tmp_path / "out", f"model.path={path}", "model.revision=v1"))
