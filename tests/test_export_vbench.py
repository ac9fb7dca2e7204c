"""The vbench format: the folder VBench's standard mode reads, and the prompt list a VBench sweep renders."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.errors import InputError, ResumeConflict
from kandinsky_batch.export import vbench
from kandinsky_batch.export.sample import Unit
from kandinsky_batch.output.storage import Storage
from tests.export_source import put_sample

ROOT = Path(__file__).resolve().parents[1]
# The real wheel, as a user gets it (`pip download vbench==0.1.5 --no-deps`); VBENCH_WHEEL names one already there.
VBENCH = "vbench==0.1.5"
# Prompts of VBench's suite: one with a trailing period and a comma, one with a non-ASCII letter.
PROMPTS = ["A 3D model of a 1800s victorian house.",
           "A tranquil tableau of at the edge of the Arabian Desert, the ancient city of Petra beckoned with its "
           "enigmatic rock-carved façades"]


def _samples(source: Storage, prompts=PROMPTS, seeds: int = vbench.SEEDS) -> list:
    return [put_sample(source, f"p{p}__seed-{i}", 10 * p + i,
                       {"prompt": prompt, "sweep_seed_index": i, "dimension": ["scene"], "clip_score": 0.5})
            for p, prompt in enumerate(prompts) for i in range(seeds)]


def _vbench_standard_lookup(videos_path: str, prompts: list[str]) -> dict[str, list[str]]:
    """VBench 0.1.5's `build_full_info_json` in mode `vbench_standard`, as written upstream (its file names)."""
    video_names = os.listdir(videos_path)
    postfix = Path(video_names[0]).suffix
    found = {}
    for prompt in prompts:
        found[prompt] = [f"{prompt}-{i}{postfix}" for i in range(5) if f"{prompt}-{i}{postfix}" in video_names]
    return found


def _vbench_prompt_from_filename(path: str) -> str:
    """`vbench.utils.get_prompt_from_filename`, as written upstream."""
    prompt = Path(path).stem
    return re.sub(r"-\d+$", "", prompt) if re.search(r"-\d+$", prompt) else prompt


@pytest.fixture
def source(tmp_path) -> Storage:
    return Storage(f"file://{tmp_path / 'src'}")


def test_the_folder_holds_only_each_prompts_five_mp4s_named_as_vbench_looks_them_up(tmp_path, source):
    samples = _samples(source)
    vbench.check(samples)
    dest = Storage(f"file://{tmp_path / 'dest'}")
    rows = vbench.write_unit(Unit("batch-000000", "train", tuple(samples[:4])), source, dest)
    rows += vbench.write_unit(Unit("batch-000001", "train", tuple(samples[4:])), source, dest)
    index = pa.Table.from_pylist([r.__dict__ for r in rows])
    vbench.finish(dest, index, samples)

    folder = os.path.join(dest.root, vbench.VIDEOS_DIR)
    names = sorted(os.listdir(folder))
    assert names == sorted(f"{p}-{i}.mp4" for p in PROMPTS for i in range(5))
    assert _vbench_standard_lookup(folder, PROMPTS) == {p: [f"{p}-{i}.mp4" for i in range(5)] for p in PROMPTS}
    assert {_vbench_prompt_from_filename(n) for n in names} == set(PROMPTS)
    by_name = {f"{s.meta['prompt']}-{s.meta['sweep_seed_index']}.mp4": s for s in samples}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == by_name[name].sha256
    assert [(r.path, r.offset, r.sha256) for r in rows] == [
        (f"videos/{s.meta['prompt']}-{s.meta['sweep_seed_index']}.mp4", 0, s.sha256) for s in samples]
    assert sorted(dest.list()) == sorted(f"videos/{n}" for n in names)


def test_a_resumed_export_accepts_its_videos_and_other_bytes_or_strays_are_refused(tmp_path, source):
    samples = _samples(source, PROMPTS[:1])
    dest = Storage(f"file://{tmp_path / 'dest'}")
    unit = Unit("batch-000000", "train", tuple(samples))
    rows = vbench.write_unit(unit, source, dest)
    assert vbench.write_unit(unit, source, dest) == rows
    index = pa.Table.from_pylist([r.__dict__ for r in rows])
    # A killed writer's temp file would be `os.listdir`'s first entry as often as not: finish removes it.
    leftover = os.path.join(dest.root, vbench.VIDEOS_DIR, ".tmp-0123")
    Path(leftover).write_bytes(b"partial")
    os.utime(leftover, (0, 0))
    vbench.finish(dest, index, samples)
    assert not os.path.exists(leftover)
    dest.put_bytes("videos/notes.txt", b"x")
    with pytest.raises(ResumeConflict, match="notes.txt"):
        vbench.finish(dest, index, samples)
    dest.put_bytes(rows[0].path, b"another video")
    with pytest.raises(ResumeConflict, match=re.escape(PROMPTS[0])):
        vbench.write_unit(unit, source, dest)


@pytest.mark.parametrize("change, message", [
    (lambda s: s[:-1], r"prompt 'A 3D model.*': seed indices \[4\] are missing"),
    (lambda s: [*s, replace(s[0], id="other-model__seed-0")], "ids 'p0__seed-0' and 'other-model__seed-0' both make"),
    (lambda s: [replace(x, meta={**x.meta, "prompt": "a/b"}) for x in s], r"prompt 'a/b' .* holds '/'"),
    (lambda s: [replace(x, meta={**x.meta, "prompt": "long " * 60}) for x in s], "bytes long, over the 255"),
    (lambda s: [replace(s[0], meta={**s[0].meta, "sweep_seed_index": None}), *s[1:]], "sweep_seed_index=None"),
    (lambda s: [replace(x, media={"npy": "videos/a.npy"}) for x in s], r"media=\['npy'\]: VBench reads mp4"),
])
def test_check_refuses_what_vbench_would_misread_naming_the_prompt(source, change, message):
    with pytest.raises(InputError, match=message):
        vbench.check(change(_samples(source, PROMPTS[:1])))


def test_more_seeds_than_five_are_kept_for_the_static_filter_when_they_run_from_zero(source):
    vbench.check(_samples(source, PROMPTS[:1], seeds=25))  # temporal_flickering samples 25, then filters to 5
    with pytest.raises(InputError, match=r"seed indices \[5\] are missing"):
        vbench.check([s for s in _samples(source, PROMPTS[:1], seeds=7) if s.meta["sweep_seed_index"] != 5])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The vbench wheel: VBENCH_WHEEL, else downloaded from the package registry (its JSON is read, never installed)."""
    if os.environ.get("VBENCH_WHEEL"):
        return Path(os.environ["VBENCH_WHEEL"])
    folder = tmp_path_factory.mktemp("vbench-wheel")
    _script([sys.executable, "-m", "pip", "download", VBENCH, "--no-deps", "--quiet", "-d", str(folder)])
    return next(folder.glob("vbench-*.whl"))


def _script(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, (argv, proc.stderr[-3000:])


def test_the_prompt_script_reads_the_wheel_into_one_row_per_distinct_prompt(tmp_path, wheel):
    import json
    import zipfile

    out = tmp_path / "vbench-prompts.parquet"
    _script([sys.executable, str(ROOT / "jobs" / "vbench_prompts.py"), str(wheel), str(out)])
    table = pq.read_table(out)
    assert table.schema == pa.schema([("id", pa.string()), ("prompt", pa.string()),
                                      ("dimension", pa.list_(pa.string()))])
    with zipfile.ZipFile(wheel) as archive:
        entries = json.loads(archive.read("vbench/VBench_full_info.json"))
    assert (len(entries), table.num_rows) == (946, 944)
    rows = table.to_pylist()
    assert [r["prompt"] for r in rows] == list(dict.fromkeys(e["prompt_en"] for e in entries))
    merged = {}
    for entry in entries:
        merged.setdefault(entry["prompt_en"], set()).update(entry["dimension"])
    assert {r["prompt"]: set(r["dimension"]) for r in rows} == merged
    shared = next(r for r in rows if r["prompt"] == "The bund Shanghai, oil painting")
    assert set(shared["dimension"]) == {"appearance_style", "overall_consistency", "aesthetic_quality",
                                        "imaging_quality"} and len(shared["dimension"]) == 4
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == 944 and not any("." in i for i in ids)
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)
    again = tmp_path / "again.parquet"
    json_path = tmp_path / "VBench_full_info.json"
    json_path.write_text(json.dumps(entries))
    _script([sys.executable, str(ROOT / "jobs" / "vbench_prompts.py"), str(json_path), str(again)])
    assert pq.read_table(again).equals(table)


def test_a_vbench_sweep_renders_each_prompt_as_five_seed_indices_carrying_its_dimensions(tmp_path, inprocess):
    from kandinsky_batch.config.load import load_config
    from kandinsky_batch.job import run
    from kandinsky_batch.output.manifest import read_manifest

    rows = [{"id": "a-3d-model-0123456789", "prompt": PROMPTS[0], "dimension": ["scene", "color"]}]
    data = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("dimension", pa.list_(pa.string()))])), data)
    cfg = load_config(str(ROOT / "configs" / "vbench-lite-5s.yaml"), [
        f"input.path={data}", f"output.uri={tmp_path / 'out'}", "model.path=simulated", "render.height=32",
        "render.width=32", "render.num_frames=5", "render.num_inference_steps=2", "render.fps=8"])
    assert run(cfg, progress=False).ok == 5
    manifest = read_manifest(Storage(cfg.output.uri)).to_pylist()
    assert sorted((r["prompt"], r["sweep_seed_index"]) for r in manifest) == [(PROMPTS[0], i) for i in range(5)]
    assert {tuple(r["dimension"]) for r in manifest} == {("scene", "color")}
