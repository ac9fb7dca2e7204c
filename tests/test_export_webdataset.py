"""The webdataset format read back by the readers people use: webdataset, HF `datasets`, a torch DataLoader, tar."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import replace

import pytest

from kandinsky_batch.errors import InputError, ResumeConflict
from kandinsky_batch.export import webdataset as wds_format
from kandinsky_batch.export.sample import Unit
from kandinsky_batch.output.storage import Storage
from tests.export_source import put_sample

LATENTS = "latents.safetensors"


def _meta(i: int, score) -> dict:
    return {"prompt": f"a cat number {i}, dancing", "seed": 100 + i, "clip_score": score, "num_frames": 9,
            "guidance_scale": 5.0, "sweep": {"steps": 4}, "dimension": ["scene", "color"]}


def _samples(source: Storage, count: int, score=lambda i: 20.5 + i) -> list:
    # Ids with dots and a slash: their keys are dot-free and the ids travel in the json.
    return [put_sample(source, f"row.{i}/v1", i, _meta(i, score(i)), extra={LATENTS: bytes([i]) * (40 + i)})
            for i in range(count)]


def _export(tmp_path, samples: list, per_shard: int) -> tuple[Storage, list, list[str]]:
    source, dest = Storage(f"file://{tmp_path / 'src'}"), Storage(f"file://{tmp_path / 'dest'}")
    wds_format.check(samples)
    rows, names = [], []
    for n, start in enumerate(range(0, len(samples), per_shard)):
        unit = Unit(f"train-{n:06d}", "train", tuple(samples[start:start + per_shard]))
        rows += wds_format.write_unit(unit, source, dest)
        names.append(f"train-{n:06d}.tar")
    return dest, rows, [dest.root + "/" + name for name in names]


@pytest.fixture
def source(tmp_path) -> Storage:
    return Storage(f"file://{tmp_path / 'src'}")


def test_webdataset_reads_every_sample_once_with_its_fields_and_bytes(tmp_path, source):
    import webdataset as wds

    samples = _samples(source, 5)
    _, _, urls = _export(tmp_path, samples, per_shard=2)
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == [s.key for s in samples]
    for sample, item in zip(samples, got):
        assert set(item) == {"__key__", "__url__", "__local_path__", "mp4", "json", "txt", "jpg", LATENTS}
        assert hashlib.sha256(item["mp4"]).hexdigest() == sample.sha256
        assert item["jpg"] == source.get_bytes(sample.media["jpg"])
        assert item[LATENTS] == source.get_bytes(sample.media[LATENTS])
        assert item["txt"].decode("utf-8") == sample.caption
        assert json.loads(item["json"]) == {**sample.meta, "key": sample.key, "caption": sample.caption}


def test_hf_datasets_types_every_field_from_samples_that_differ_after_the_fifth(tmp_path, source):
    import datasets

    # HF infers features from the first 5 samples: the 6th has a null score, the 7th an integral float.
    scores = {5: None, 6: 25.0}
    samples = _samples(source, 8, score=lambda i: scores.get(i, 20.5 + i))
    dest, _, _ = _export(tmp_path, samples, per_shard=8)
    ds = datasets.load_dataset("webdataset", data_dir=dest.root, split="train", cache_dir=str(tmp_path / "hf"))
    # Where HF's own inference works (every type shows in the first five), the dataset card declares the same.
    assert _card_features(wds_format.dataset_card(samples)) == ds.features
    ds = ds.cast_column("mp4", datasets.Video(decode=False)).cast_column("jpg", datasets.Image(decode=False))
    json_features = ds.features["json"]
    assert json_features["clip_score"] == datasets.Value("float64")
    assert json_features["guidance_scale"] == datasets.Value("float64")
    assert json_features["seed"] == datasets.Value("int64")
    assert json_features["dimension"] == datasets.List(datasets.Value("string"))
    assert ds.features["txt"] == datasets.Value("string")
    assert ds.features[LATENTS] == datasets.Value("binary")
    assert len(ds) == len(samples)
    for sample, row in zip(samples, ds):
        assert row["__key__"] == sample.key
        assert row["json"] == {**sample.meta, "key": sample.key, "caption": sample.caption}
        assert hashlib.sha256(row["mp4"]["bytes"]).hexdigest() == sample.sha256
        assert row["jpg"]["bytes"] == source.get_bytes(sample.media["jpg"])
        assert row["txt"] == sample.caption
    assert ds[5]["json"]["clip_score"] is None
    assert isinstance(ds[6]["json"]["clip_score"], float) and ds[6]["json"]["clip_score"] == 25.0


def test_a_dataloader_with_two_workers_yields_every_sample_once_per_epoch(tmp_path, source):
    import torch
    import webdataset as wds

    samples = _samples(source, 7)
    _, _, urls = _export(tmp_path, samples, per_shard=2)
    assert len(urls) == 4
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker).to_tuple("__key__", "mp4")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    want = {s.key: s.sha256 for s in samples}
    for _epoch in range(2):
        got = [(key, hashlib.sha256(video).hexdigest()) for key, video in loader]
        assert sorted(got) == sorted(want.items())


def test_index_offsets_point_at_each_samples_first_member(tmp_path, source):
    samples = _samples(source, 3)
    # A 150-character id is its own key: its member names need a PAX header, where the offset then points.
    samples.append(put_sample(source, "x" * 128, 3, _meta(3, 1.5), extra={LATENTS: b"L"}))
    dest, rows, _ = _export(tmp_path, samples, per_shard=4)
    assert [r.key for r in rows] == [s.key for s in samples]
    data = dest.get_bytes("train-000000.tar")
    for sample, row in zip(samples, rows):
        assert (row.path, row.unit, row.id, row.sha256, row.bytes) == (
            "train-000000.tar", "train-000000", sample.id, sample.sha256, sample.bytes)
        with tarfile.open(fileobj=io.BytesIO(data[row.offset:]), mode="r|") as tar:
            member = tar.next()
            assert member.name == f"{sample.key}.mp4"
            assert hashlib.sha256(tar.extractfile(member).read()).hexdigest() == sample.sha256
    short = rows[0]
    header = tarfile.TarInfo.frombuf(data[short.offset:short.offset + 512], "utf-8", "strict")
    assert header.name == f"{short.key}.mp4"
    assert rows[0].offset == 0 and rows[1].offset > 0


def test_members_have_fixed_headers_in_sample_then_extension_order(tmp_path, source):
    samples = _samples(source, 2)
    dest, _, _ = _export(tmp_path, samples, per_shard=2)
    with tarfile.open(fileobj=io.BytesIO(dest.get_bytes("train-000000.tar"))) as tar:
        members = tar.getmembers()
    order = ["mp4", "json", "txt", "jpg", LATENTS]
    assert [m.name for m in members] == [f"{s.key}.{ext}" for s in samples for ext in order]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}


def test_the_same_unit_gives_the_same_bytes_and_a_rerun_accepts_them(tmp_path, source):
    samples = _samples(source, 3)
    unit = Unit("train-000000", "train", tuple(samples))
    first, second = Storage(f"file://{tmp_path / 'a'}"), Storage(f"file://{tmp_path / 'b'}")
    rows = wds_format.write_unit(unit, source, first)
    assert wds_format.write_unit(unit, source, second) == rows
    assert first.get_bytes("train-000000.tar") == second.get_bytes("train-000000.tar")
    assert wds_format.write_unit(unit, source, first) == rows  # a resumed export: the shard is already there
    assert first.list() == ["train-000000.tar"]


def test_an_existing_shard_with_other_bytes_is_refused(output_target, source):
    uri, options = output_target
    dest = Storage(uri, options)
    samples = _samples(source, 2)
    dest.put_bytes("train-000000.tar", b"another export's shard")
    with pytest.raises(ResumeConflict, match="train-000000.tar"):
        wds_format.write_unit(Unit("train-000000", "train", tuple(samples)), source, dest)
    assert dest.get_bytes("train-000000.tar") == b"another export's shard"
    rows = wds_format.write_unit(Unit("train-000001", "train", tuple(samples)), source, dest)
    assert [r.path for r in rows] == ["train-000001.tar"] * 2 and dest.exists("train-000001.tar")


def test_a_video_whose_bytes_changed_since_the_manifest_is_refused_naming_the_id(tmp_path, source):
    samples = _samples(source, 2)
    source.put_bytes(samples[1].media["mp4"], b"not the rendered video")
    dest = Storage(f"file://{tmp_path / 'dest'}")
    with pytest.raises(InputError, match=r"id 'row\.1/v1'.*sha256"):
        wds_format.write_unit(Unit("train-000000", "train", tuple(samples)), source, dest)
    assert dest.list() == []


def _second(**changes):
    """A change to the second sample only (a value, or a function of the sample)."""

    def apply(samples, fields=changes):
        first, second = samples
        made = {k: v(second) if callable(v) else v for k, v in fields.items()}
        return [first, replace(second, **made)]

    return apply


def _every(**changes):
    """A change to every sample alike."""

    return lambda samples: [replace(s, **{k: v(s) for k, v in changes.items()}) for s in samples]


@pytest.mark.parametrize("change, message", [
    (_second(media=lambda s: {k: v for k, v in s.media.items() if k != LATENTS}), "media extensions"),
    (_second(meta=lambda s: {**s.meta, "extra": 1}), r"meta keys differ .*extra \['extra'\]"),
    (_second(key="row.1"), "key 'row.1' must be"),
    (_second(key="row/1"), "key .row/1. must be non-empty and free of"),
    (lambda samples: [samples[0], replace(samples[1], key=samples[0].key)],
     "is shared by ids 'row.0/v1' and 'row.1/v1'"),
    (_second(meta=lambda s: {**s.meta, "seed": 1.0}), r"meta\['seed'\] is integer in id 'row.0/v1' but float"),
    (_second(meta=lambda s: {**s.meta, "clip_score": float("nan")}), "id 'row.1/v1': meta cannot be written as JSON"),
    (_every(meta=lambda s: {**s.meta, "caption": "another"}), r"meta\['caption'\]='another'"),
    (_every(media=lambda s: {**s.media, "txt": "x.txt"}), "media extension 'txt'"),
    (_every(media=lambda s: {**s.media, "npy": "x.npy"}), "exactly one video"),
])
def test_check_refuses_samples_a_loader_would_read_inconsistently(source, change, message):
    with pytest.raises(InputError, match=message):
        wds_format.check(change(_samples(source, 2)))


def test_the_dataset_card_types_fields_hf_would_infer_as_null_from_the_first_five(tmp_path, source):
    import datasets

    # A score null in the first five samples: HF's inference types it null and fails on the 6th sample's float.
    samples = _samples(source, 7, score=lambda i: None if i < 5 else 25.0)
    samples = [replace(s, media={k: v for k, v in s.media.items() if k != LATENTS}) for s in samples]
    dest, _, _ = _export(tmp_path, samples, per_shard=7)
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        datasets.load_dataset("webdataset", data_dir=dest.root, split="train", cache_dir=str(tmp_path / "hf0"))
    wds_format.finish(dest, None, samples)
    assert dest.list() == ["README.md", "train-000000.tar"]
    ds = datasets.load_dataset(dest.root, split="train", cache_dir=str(tmp_path / "hf1"))
    ds = ds.cast_column("mp4", datasets.Video(decode=False)).cast_column("jpg", datasets.Image(decode=False))
    assert [row["json"]["clip_score"] for row in ds] == [None] * 5 + [25.0, 25.0]
    assert [hashlib.sha256(row["mp4"]["bytes"]).hexdigest() for row in ds] == [s.sha256 for s in samples]



def _card_features(card: bytes):
    import datasets
    import yaml

    front = card.decode("utf-8").split("---\n")[1]
    return datasets.Features._from_yaml_list(yaml.safe_load(front)["dataset_info"]["features"])
