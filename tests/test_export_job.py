"""From render to a training set: a job rendered with fused scores (in-process replicas, the simulated model), then
`kandinsky-batch export` to each format with a `--where` on a score, read back by the readers people use.

Oracles: the job's manifest and scores table read with pyarrow, each object's sha256 recomputed here, VBench's own
file-name rule (`{prompt}-{index}{suffix}`, the suffix taken from the folder's first entry)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.cli import main
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.scores import read_scores
from kandinsky_batch.output.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk, waves", "a cat. on a windowsill"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, inprocess_module):
    """Three prompts x five seeds on the simulated model, scored by the replicas (motion, shot_cuts) as it renders."""
    from kandinsky_batch.config.load import load_config
    from kandinsky_batch.job import run

    root = tmp_path_factory.mktemp("export-job")
    rows = [{"id": f"p{i}.v1", "prompt": p, "dimension": ["scene"] if i else ["color", "scene"]}
            for i, p in enumerate(PROMPTS)]
    data = root / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("dimension", pa.list_(pa.string()))])), data)
    cfg = load_config(str(ROOT / "configs" / "vbench-lite-5s.yaml"), [
        f"input.path={data}", f"output.uri={root / 'out'}", "model.path=simulated", "render.height=32",
        "render.width=32", "render.num_frames=9", "render.num_inference_steps=2", "render.fps=8",
        "score.metrics=[motion,shot_cuts]"])
    assert run(cfg, progress=False).ok == 15
    out = root / "out"
    manifest = read_manifest(Storage(str(out))).to_pylist()
    scores = {r["id"]: r for r in read_scores(str(out)).to_pylist()}
    motions = sorted(r["motion"] for r in scores.values())
    assert motions[0] < motions[-1]  # the simulated clips move differently: a condition on motion selects
    return root, out, manifest, scores, motions[len(motions) // 3]


def _condition(cut: float) -> str:
    return f"motion > {cut!r} AND shot_cuts = 0"


def _export(job, dest: Path, fmt: str, *extra: str) -> dict[str, dict]:
    """Export the job with the condition; the manifest rows it should select, recomputed here."""
    _, out, manifest, scores, cut = job
    assert main(["export", str(out), "--format", fmt, "--to", str(dest), "--address", "inprocess",
                 "--where", _condition(cut), *extra]) == 0
    return {r["id"]: r for r in manifest if r["status"] == "ok" and scores[r["id"]]["motion"] > cut
            and scores[r["id"]]["shot_cuts"] == 0}


def test_webdataset_export_of_a_scored_job_reads_back_with_webdataset_hf_and_a_dataloader(job, tmp_path, monkeypatch):
    import datasets
    import torch.utils.data
    import webdataset as wds

    scores = job[3]
    dest = tmp_path / "wds"
    want = _export(job, dest, "webdataset", "--split", "val=0.3", "--shard-size", "3")
    assert 6 <= len(want) < 15  # the condition excludes some clips and keeps enough for several shards
    shards = sorted(str(p) for p in dest.glob("*.tar"))
    assert len(shards) >= 3

    seen = {}
    for sample in wds.WebDataset(shards, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["id"] not in seen and "." not in sample["__key__"]
        seen[meta["id"]] = meta
        assert hashlib.sha256(sample["mp4"]).hexdigest() == want[meta["id"]]["sha256"] == meta["sha256"]
        assert sample["txt"].decode() == meta["caption"] == want[meta["id"]]["prompt"]
        assert meta["motion"] == pytest.approx(scores[meta["id"]]["motion"], abs=0, rel=0)
        assert meta["dimension"] == want[meta["id"]]["dimension"] and isinstance(meta["guidance_scale"], float)
        assert sample["jpg"][:2] == b"\xff\xd8"
    assert set(seen) == set(want)

    # The same command again writes nothing: every object and metadata file keeps its bytes and its mtime.
    stamps = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}
    assert _export(job, dest, "webdataset", "--split", "val=0.3", "--shard-size", "3") == want
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()} == stamps

    index = pq.read_table(dest / "index.parquet").to_pylist()
    assert sorted(r["id"] for r in index) == sorted(want)
    assert {r["split"] for r in index} == {"train", "val"}

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    loaded = datasets.load_dataset(str(dest))
    assert {split: ds.num_rows for split, ds in loaded.items()} == \
        {("validation" if s == "val" else s): n for s, n in _counts(index).items()}
    for split, ds in loaded.items():
        for row in ds.cast_column("mp4", datasets.Video(decode=False)):
            assert hashlib.sha256(row["mp4"]["bytes"]).hexdigest() == row["json"]["sha256"] == want[row["json"]["id"]]["sha256"]
            assert row["json"]["motion"] == scores[row["json"]["id"]]["motion"]

    train = sorted(str(dest / f"{u}.tar") for u in {r["unit"] for r in index if r["split"] == "train"})
    pipeline = wds.WebDataset(train, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker).to_tuple("__key__", "json")
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    for _ in range(2):
        keys = [key for key, _ in loader]
        assert sorted(keys) == sorted(r["key"] for r in index if r["split"] == "train")


def _counts(index: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in index:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
    return counts


def test_vbench_export_names_each_prompts_five_seeds_as_vbench_looks_them_up(job, tmp_path):
    _, out, manifest, scores, _ = job
    dest = tmp_path / "vbench"
    # A condition on a score every clip passes: VBench wants each prompt's five seeds.
    assert main(["export", str(out), "--format", "vbench", "--to", str(dest), "--address", "inprocess",
                 "--where", "shot_cuts = 0 AND motion >= 0"]) == 0
    folder = dest / "videos"
    suffix = Path(os.listdir(folder)[0]).suffix
    assert suffix == ".mp4" and len(os.listdir(folder)) == 15
    by_name = {f"{r['prompt']}-{r['sweep_seed_index']}": r for r in manifest}
    for prompt in PROMPTS:
        for i in range(5):
            path = folder / f"{prompt}-{i}{suffix}"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == by_name[f"{prompt}-{i}"]["sha256"]


def test_csv_and_videofolder_exports_of_a_scored_job(job, tmp_path, monkeypatch):
    import datasets

    scores = job[3]
    want = _export(job, tmp_path / "csv", "csv")
    table = pcsv.read_csv(tmp_path / "csv" / "manifest.csv").to_pylist()
    assert sorted(r["id"] for r in table) == sorted(want)
    for r in table:
        assert r["aspect_ratio"] == r["height"] / r["width"] and r["resolution"] == r["height"] * r["width"]
        assert r["text"] == want[r["id"]]["prompt"] and r["motion"] == pytest.approx(scores[r["id"]]["motion"])
        path = r["path"].removeprefix("file://")
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == want[r["id"]]["sha256"]

    assert _export(job, tmp_path / "vf", "videofolder", "--split", "val=0.3") == want
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    loaded = datasets.load_dataset("videofolder", data_dir=str(tmp_path / "vf"))
    ids = []
    for ds in loaded.values():
        for row in ds.cast_column("video", datasets.Video(decode=False)):
            ids.append(row["id"])
            assert hashlib.sha256(Path(row["video"]["path"]).read_bytes()).hexdigest() == want[row["id"]]["sha256"]
    assert sorted(ids) == sorted(want)
