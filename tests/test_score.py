"""The scoring stage (`kandinsky-batch score`): over a job output and over a Parquet of other videos, resume,
runs with other metric sets, CPU and GPU pools, real Ray, and fused scoring equal to the stage's.

Oracle: each video's temporal_flickering computed here from its committed bytes (decoded with the output's own
decoder, then VBench's cv2.absdiff formula); rows in = rows out; a re-run writes nothing."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from kandinsky_batch import score
from kandinsky_batch.config.load import load_config
from kandinsky_batch.fleet import inprocess
from kandinsky_batch.job import run as render
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.scores import read_rows, read_runs, read_scores
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.video import decode, encode
from pipelines.scoring.metric import Metric
from pipelines.scoring.registry import METRICS
from tests.helpers import write_dataset
from tests.sweep_output import write_sweep

FLICKER = "temporal_flickering"


def _vbench(frames: np.ndarray) -> float:
    maes = [np.mean(cv2.absdiff(frames[i], frames[i + 1])) for i in range(len(frames) - 1)]
    return (255.0 - np.mean(maes)) / 255.0


class _Brightness:
    """A second metric for these tests: the mean uint8 value over every frame, / 255."""

    provenance = {"library": "numpy"}

    def __call__(self, video):
        if video.frames.mean() > 250:
            raise ValueError("frames: too bright to score")
        return float(video.frames.mean() / 255)


def load_brightness(weights=None):
    return _Brightness()


@pytest.fixture
def brightness(monkeypatch):
    """`brightness` (CPU) and `brightness_gpu` (a model metric's device) in the registry for one test."""
    for name, device in (("brightness", "cpu"), ("brightness_gpu", "gpu")):
        monkeypatch.setitem(METRICS, name, Metric(name, "tests.test_score:load_brightness", "mean / 255",
                                                  device=device))


def _score(source, *extra):
    """The stage in-process; temporal_flickering unless `extra` names the metrics (the default set, every metric
    needing no weights, is `test_the_default_metrics_are_those_needing_no_weights`'s)."""
    metrics = [] if any(e.startswith("score.metrics=") for e in extra) else [f"score.metrics=[{FLICKER}]"]
    return score.run(load_config(None, [f"score.source={source}", "cluster.address=inprocess",
                                        "cluster.replicas=2", *metrics, *extra]), progress=False)


def test_the_default_metrics_are_those_needing_no_weights():
    cfg = load_config(None, ["score.source=s3://b/out"])
    assert cfg.score.names() == sorted(n for n, m in METRICS.items() if m.weights is None)
    assert {"temporal_flickering", "motion", "ocr", "loudness"} <= set(cfg.score.names())
    assert "clip_score" not in cfg.score.names()
    render_job = load_config(None, ["input.path=p.parquet", "output.uri=out"])
    assert render_job.score.names() == []  # a render job scores only what it names


@pytest.fixture
def job(tmp_path):
    """A finished sweep output: 6 cells, one failed and one invalid."""
    storage = write_sweep(f"file://{tmp_path / 'job'}", axes={"model": ["tiny", "tiny-b"]},
                          outcomes={"p0.tiny-b": ("failed", "boom"), "p2.tiny": ("invalid", "prompt=' ': blank")})
    return storage


def _expected(storage: Storage) -> dict[str, float]:
    ok = [r for r in read_manifest(storage).to_pylist() if r["status"] == "ok"]
    return {r["id"]: _vbench(decode(storage.get_bytes(r["key"]), "mp4")) for r in ok}


def test_a_job_output_scores_every_ok_row_once_and_a_rerun_scores_nothing(job, inprocess):
    result = _score(job.root)
    expected = _expected(job)
    assert (result.rows, result.scored, result.errors, result.skipped) == (6, 4, 0, {"failed": 1, "invalid": 1})
    rows = read_rows(job.under("scores")).to_pylist()
    assert sorted(r["id"] for r in rows if r["scored"]) == sorted(expected)  # each ok row once
    table = {r["id"]: r for r in read_scores(job.root).to_pylist()}
    for rid, want in expected.items():
        assert table[rid][FLICKER] == pytest.approx(want, abs=1e-12)
        assert table[rid]["video_sha256"] == hashlib.sha256(job.get_bytes(f"videos/{rid}.mp4")).hexdigest()
    assert table["p0.tiny-b"]["score_error"] == "status='failed': not scored (only the job's ok rows are)"
    assert table["p2.tiny"]["score_error"].startswith("status='invalid'")
    parts = job.under("scores").list()
    again = _score(job.root)
    assert (again.scored, again.already, again.skipped) == (0, 4, {"failed": 1, "invalid": 1})
    assert sorted(job.under("scores").list()) == sorted(parts), "a re-run wrote something"
    runs = read_runs(job.root)
    assert [r["counts"]["scored"] for r in runs["runs"]] == [4, 0]
    assert runs["columns"][FLICKER]["provenance"]["reference"].startswith("VBench")


def test_another_metric_set_adds_columns_and_one_row_per_video(job, inprocess, brightness):
    _score(job.root, f"score.metrics=[{FLICKER}]")
    second = _score(job.root, f"score.metrics=[{FLICKER},brightness]")
    assert second.scored == 4  # brightness only: flicker is in the table already
    [new_part] = [p for p in read_rows(job.under("scores"), ["run"])["run"].unique().to_pylist()
                  if p == read_runs(job.root)["runs"][-1]["run_id"]]
    assert new_part
    table = read_scores(job.root)
    assert table.column_names == ["id", "video_sha256", "brightness", FLICKER, "score_error", "video", "scored_at"]
    assert table.num_rows == 6 and len(set(zip(*(table[c].to_pylist() for c in ("id", "video_sha256"))))) == 6
    for row in table.to_pylist():
        if row["video_sha256"]:
            frames = decode(job.get_bytes(row["video"]), "mp4")
            assert row["brightness"] == pytest.approx(frames.mean() / 255)
            assert row[FLICKER] == pytest.approx(_vbench(frames), abs=1e-12)


def test_model_metrics_go_to_gpu_replicas_when_the_cluster_has_gpus(job, inprocess, brightness, monkeypatch):
    monkeypatch.setattr(inprocess_module(), "gpus", lambda: 1)
    result = _score(job.root, f"score.metrics=[{FLICKER},brightness_gpu]")
    pools = {w["worker"].split("/")[0]: sorted(w["provenance"]) for w in result.workers}
    assert pools == {"score-cpu": [FLICKER], "score-gpu": ["brightness_gpu"]}
    assert result.scored == 4 and len(read_rows(job.under("scores"))) == 2 * 4 + 2  # two halves per video
    table = read_scores(job.root).to_pylist()
    assert len(table) == 6 and all(r[FLICKER] is not None and r["brightness_gpu"] is not None
                                   for r in table if r["video_sha256"])


def inprocess_module():
    return inprocess


def test_a_parquet_of_videos_scores_them_with_row_level_errors(tmp_path, inprocess, brightness):
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    (clips / "noise.npy").write_bytes(encode(noise, "npy", 8))
    (clips / "still.mp4").write_bytes(encode(np.full((9, 32, 32, 3), 90, np.uint8), "mp4", 8))
    (clips / "white.npy").write_bytes(encode(np.full((9, 32, 32, 3), 255, np.uint8), "npy", 8))
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "garbage.mp4").write_bytes(b"not an mp4 at all")
    videos = ["clips/noise.npy", "clips/still.mp4", "clips/white.npy", "clips/empty.mp4", "clips/garbage.mp4",
              "clips/gone.mp4", " "]
    data = write_dataset(tmp_path / "videos.parquet", [{"video": v, "prompt": f"p{i}"} for i, v in enumerate(videos)])
    out = tmp_path / "scores"
    result = _score(data, f"score.out={out}", f"score.metrics=[{FLICKER},brightness]")
    # The white clip scores its flicker, not its brightness: a row with an error counts there.
    assert (result.rows, result.scored, result.errors, result.skipped) == (7, 2, 4, {"empty": 1})
    table = {r["id"]: r for r in read_scores(str(out)).to_pylist()}
    assert table["0"][FLICKER] == pytest.approx(_vbench(noise), abs=1e-12) and table["0"]["score_error"] is None
    assert table["1"][FLICKER] == 1.0 and table["1"]["video"] == "clips/still.mp4"
    assert table["2"][FLICKER] == 1.0 and table["2"]["brightness"] is None  # one metric's error, not the row's
    assert table["2"]["score_error"] == "brightness: ValueError: frames: too bright to score"
    assert table["3"]["score_error"] == "video='clips/empty.mp4': zero-length object (0 bytes)"
    assert table["4"]["score_error"].startswith("video='clips/garbage.mp4': cannot be decoded as .mp4")
    assert table["5"]["score_error"].startswith("video='clips/gone.mp4': no such object")
    assert table["6"]["score_error"].startswith("video=' ': empty")
    assert table["3"]["video_sha256"] == hashlib.sha256(b"").hexdigest() and table["5"]["video_sha256"] is None
    parts = sorted(out.iterdir())
    again = _score(data, f"score.out={out}", f"score.metrics=[{FLICKER},brightness]")
    assert (again.scored, again.already, again.errors) == (0, 2, 4)
    assert sorted(out.iterdir()) == parts, "unchanged errors were written again"


def test_a_parquet_dataset_needs_out_and_a_video_column(tmp_path):
    data = write_dataset(tmp_path / "v.parquet", [{"video": "a.mp4"}])
    with pytest.raises(Exception, match=r"score.out: not set, and score.source=.* is a Parquet dataset"):
        _score(data)
    other = write_dataset(tmp_path / "p.parquet", [{"prompt": "a cat"}])
    with pytest.raises(Exception, match="required column 'video' is missing"):
        _score(other, f"score.out={tmp_path / 'o'}")


def test_the_stage_on_a_real_local_ray(job, ray_local):
    # One replica: Ray's actor path is the point, not how rows spread over replicas (the in-process tests' two).
    result = score.run(load_config(None, [f"score.source={job.root}", "cluster.replicas=1",
                                          f"score.metrics=[{FLICKER}]"]), progress=False)
    assert result.scored == 4 and all(not w["node"].startswith("inprocess") for w in result.workers)
    table = {r["id"]: r[FLICKER] for r in read_scores(job.root).to_pylist() if r["video_sha256"]}
    assert table == pytest.approx(_expected(job), abs=1e-12)


def test_fused_scoring_equals_the_stage_for_the_same_objects(tmp_path, inprocess):
    data = write_dataset(tmp_path / "in.parquet", [{"id": "a", "prompt": "a cat"}, {"id": "b", "prompt": "a dog"}])
    out = tmp_path / "out"
    # The simulated model (frames of noise from the seed, no diffusers to load): what is compared is the scoring of
    # the committed objects, whoever rendered them.
    render(load_config("configs/tiny.yaml", [f"input.path={data}", f"output.uri={out}", "model.path=simulated:0",
                                            f"score.metrics=[{FLICKER}]"]), progress=False)
    fused = read_scores(str(out))
    assert fused.num_rows == 2 and fused["score_error"].null_count == 2
    staged = _score(str(out), f"score.out={tmp_path / 'stage'}")
    assert staged.scored == 2
    stage = read_scores(str(tmp_path / "stage"))
    for column in ("id", "video_sha256", FLICKER, "video"):
        assert fused[column].to_pylist() == stage[column].to_pylist(), column
    manifest = {r["id"]: r["sha256"] for r in read_manifest(Storage(str(out))).to_pylist()}
    assert dict(zip(fused["id"].to_pylist(), fused["video_sha256"].to_pylist())) == manifest
    assert read_runs(str(out))["runs"][0]["fused"] is True
    assert _score(str(out), f"score.metrics=[{FLICKER}]").already == 2  # the stage over the fused table: all scored


def test_validate_counts_what_score_would_do_and_starts_nothing(job, tmp_path, capsys):
    from kandinsky_batch.cli import main

    (tmp_path / "score.yaml").write_text(f"score:\n  source: {job.root}\n  metrics: [{FLICKER}]\n")
    args = ["validate", str(tmp_path / "score.yaml")]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "rows: 6: 4 to score, 0 scored already, skipped: 1 failed, 1 invalid")
    assert not (job.fs.exists(f"{job.root}/scores")), "validate wrote the scores table"
    _score(job.root, f"score.metrics=[{FLICKER}]")
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "rows: 6: 0 to score, 4 scored already, skipped: 1 failed, 1 invalid")
