"""The simulated model behind the orchestration benchmark: Lite's limits, sleeps proportional to the modelled
cost, deterministic frames, no torch, and a real job through it. No test asserts a timing."""

import subprocess
import sys

import numpy as np
import pytest

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode
from pipelines import RenderRequest, load_spec, open_renderer
from pipelines.simulated import DEFAULT_SECONDS_PER_MEGAUNIT, SimulatedRenderer, cost, simulated_spec
from tests.helpers import write_dataset


def _request(num_frames=121, steps=50, guidance=5.0, height=512, width=768, seed=0) -> RenderRequest:
    return RenderRequest(prompt="a cat", negative_prompt=None, height=height, width=width, num_frames=num_frames,
                         num_inference_steps=steps, guidance_scale=guidance, seed=seed)


def test_spec_has_lite_limits():
    spec = load_spec("simulated:0.5")
    assert (spec.spatial_multiple, spec.temporal_multiple, spec.num_heads, spec.max_prompt_tokens) == (16, 4, 28, 512)
    assert spec.attention_type == "regular"
    assert spec.prompt_tokens("a cat, dancing in the rain") == 7  # words and punctuation marks


@pytest.mark.parametrize("path", ["simulatedx", "simulated:", "simulated:-1", "simulated:nan", "simulated:fast"])
def test_malformed_path_is_refused_naming_it(path):
    with pytest.raises(ValueError, match=f"model.path='{path}'"):
        simulated_spec(path)


def test_render_sleeps_for_the_modelled_cost():
    slept = []
    renderer = SimulatedRenderer("simulated:2", sleep=slept.append)
    for request in (_request(), _request(num_frames=241), _request(guidance=1.0), _request(steps=16, guidance=1.0)):
        renderer.render(request)
    base = 31 * 32 * 48 * 50 * 2
    assert cost(_request()) == base
    assert slept == pytest.approx([2e-6 * base, 2e-6 * base * 61 / 31, 1e-6 * base, 1e-6 * base * 16 / 50])


def test_a_batch_sleeps_once_for_the_sum_and_keeps_each_rows_frames():
    slept = []
    renderer = SimulatedRenderer("simulated:1", sleep=slept.append)
    requests = [_request(seed=3), _request(seed=4, num_frames=241)]
    frames = renderer.render_batch(requests)
    assert slept == pytest.approx([renderer.seconds(requests[0]) + renderer.seconds(requests[1])])
    assert [f.tolist() for f in frames] == [renderer.render(r).tolist() for r in requests]


def test_default_unit_makes_a_5s_row_about_half_a_second():
    slept = []
    renderer = SimulatedRenderer("simulated", sleep=slept.append)
    renderer.render(_request())
    renderer.render(_request(num_frames=241))
    assert renderer.seconds_per_unit == DEFAULT_SECONDS_PER_MEGAUNIT / 1e6
    assert slept == pytest.approx([0.5, 0.98], abs=0.01)


def test_frames_depend_on_the_seed_alone():
    renderer = open_renderer("simulated:0")
    assert renderer.device == "simulated" and renderer.load_seconds >= 0
    a = renderer.render(_request(seed=1))
    assert a.dtype == np.uint8 and a.shape == (1, 16, 16, 3)
    assert np.array_equal(a, renderer.render(_request(seed=1, num_frames=241, steps=3)))
    assert not np.array_equal(a, renderer.render(_request(seed=2)))


def test_imports_neither_torch_nor_diffusers():
    code = ("import sys, pipelines.simulated; from pipelines import open_renderer, load_spec; "
            "load_spec('simulated'); open_renderer('simulated'); "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
def test_job_through_the_simulated_model(tmp_path, inprocess):
    """Rows in = rows out: every row ok, its npy object holds the seed's frames, verify passes."""
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "num_frames": 121 if i % 2 else 241} for i in range(6)]
    data = write_dataset(tmp_path / "prompts.parquet", rows)
    uri = f"file://{tmp_path / 'out'}"
    cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", "output.format=npy",
                             "model.path=simulated:0.01", "cluster.replicas=2"])
    result = run(cfg, progress=False)
    assert (result.rows, result.ok, result.rendered, result.failed) == (6, 6, 6, 0)
    storage = Storage(uri)
    manifest = read_manifest(storage).to_pylist()
    assert sorted(r["id"] for r in manifest) == sorted(r["id"] for r in rows)
    renderer = SimulatedRenderer("simulated:0")
    for row in manifest:
        assert row["status"] == "ok" and row["model"] == "simulated:0.01" and ":simulated" in row["worker"]
        frames = decode(storage.get_bytes(storage.key_of(row["uri"])), "npy")
        assert np.array_equal(frames, renderer.render(_request(seed=row["seed"])))
    assert verify(uri) == []


@pytest.mark.slow
def test_a_job_feeds_its_live_metrics(tmp_path, inprocess, monkeypatch):
    """Every committed row is counted by status, and queue depth, busy fractions and the rate are set."""
    import kandinsky_batch.progress as progress
    from kandinsky_batch.fleet.metrics import JobMetrics

    made = []

    class Recording(JobMetrics):
        def __init__(self, run_id, backend=None):
            super().__init__(run_id, backend)
            self.busy_seen, self.queued_seen = {}, []
            made.append(self)

        def busy(self, replica, fraction):
            self.busy_seen[replica] = fraction
            super().busy(replica, fraction)

        def queued(self, count):
            self.queued_seen.append(count)
            super().queued(count)

    monkeypatch.setattr(progress, "JobMetrics", Recording)
    monkeypatch.setattr(progress, "METRICS_SECONDS", 0.0)
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(12)] + [{"id": "blank", "prompt": " "}]
    data = write_dataset(tmp_path / "prompts.parquet", rows)
    cfg = load_config(None, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", "output.format=npy",
                             "model.path=simulated:0.05", "cluster.replicas=2"])
    result = run(cfg, progress=False)
    (metrics,) = made
    assert metrics.counts["ok"] == result.ok == 12 and metrics.counts["invalid"] == 1
    assert metrics.queued_seen and max(metrics.queued_seen) > 0
    assert set(metrics.busy_seen) <= {w["worker"] for w in result.workers} and metrics.busy_seen
    assert all(0.0 <= f <= 1.0 for f in metrics.busy_seen.values())
    assert metrics.videos_per_hour > 0


def test_the_driver_validates_with_the_real_tokenizer_without_torch(model_cache):
    """Preflight and validation of a tiny-model job import neither torch nor diffusers (the driver stays small)."""
    load_spec("tiny")  # builds the tiny model in the session's cache if needed (that needs torch; validating does not)
    code = ("import sys, numpy as np, pyarrow as pa; from pipelines import load_spec;"
            "from kandinsky_batch.intake.ids import IdIndex; from kandinsky_batch.intake.rows import RowValidator;"
            "from kandinsky_batch.config.load import load_config;"
            "cfg = load_config(None, ['input.path=x', 'output.uri=y']); table = pa.table({'prompt': ['a cat', ' ']});"
            "validated = RowValidator(cfg, load_spec('tiny'), IdIndex.build(None, 2, cfg.output.format))"
            ".validate(table, np.arange(2)); tasks, invalid = validated.task_list(), validated.invalid;"
            "print(len(tasks), len(invalid), tasks[0].text_tokens[0], 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "3", "False", "False"]
