"""Evaluation sweeps: the `sweep:` block, each input row expanded into its cells, and a real two-model sweep.

The config and expansion tests run the streaming front end without Ray (the simulated model's limits); the
end-to-end test renders a sweep of two tiny models x 2 step counts x 3 seeds with in-process replicas and checks
every cell against plain diffusers for its model, seed and parameters, then adds a seed. A sweep of a single-replica
model beside a gang model (two models sharing the fleet, a gang placed beside single actors) runs on a real local Ray
in tests/test_gangs.py, where the gang tests share their actors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.intake.windows import Intake
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.intake.preflight import preflight
from kandinsky_batch.intake.rows import derive_seed
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import object_key
from kandinsky_batch.config.sweep import Sweep
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode
from tests.helpers import TINY_RENDER, oracle, write_dataset

ROWS = [{"id": "cat", "prompt": "a cat dancing"}, {"id": "dog", "prompt": "a dog running"}]


def _cfg(tmp_path, *extra, rows=ROWS):
    data = write_dataset(tmp_path / "in.parquet", rows)
    return load_config(None, [f"input.path={data}", f"output.uri={tmp_path / 'out'}", "model.path=simulated",
                              *extra])


def _cells(cfg) -> tuple[list, list[dict]]:
    """Every task and invalid row the front end makes of the dataset (no Ray)."""
    checked = preflight(cfg)
    recorded: list[dict] = []
    intake = Intake(checked.dataset, checked.lanes, checked.sweep, cfg.render.seed, recorded.append).start()
    windows = []
    while not intake.exhausted:
        windows += intake.poll()
    intake.check()
    return [t for w in windows for tasks in w.values() for t in tasks], recorded


@pytest.mark.parametrize("override, message", [
    ("sweep.colour=[1]", "sweep.colour: unknown axis"),
    ("sweep.num_inference_steps=[]", "sweep.num_inference_steps=[]: must be a non-empty list"),
    ("sweep.num_inference_steps=[4,0]", "sweep.num_inference_steps[1]=0: must be a positive integer"),
    ("sweep.num_inference_steps=[4,4]", "lists a value twice"),
    ("sweep.guidance_scale=[1.0,-2.0]", "sweep.guidance_scale[1]=-2.0: must be a finite number >= 0"),
    ("sweep.seeds=0", "sweep.seeds=0: a count must be in [1, 1000]"),
    ("sweep.seeds=[1,-1]", "sweep.seeds[1]=-1: must be an integer in"),
    ("sweep.model=[simulated,simulated]", "lists a value twice"),
    ("sweep.model=[{path: simulated},{path: 'simulated:0.2'}]", None),
    ("sweep.model=[{path: simulated, cache: bogus}]", "sweep.model[0]: model.cache='bogus'"),
    ("sweep.model=[{path: simulated, colour: red}]", "sweep.model[0].colour: unknown key"),
    ("sweep.model=[{path: simulated, name: 'a b'}]", "sweep.model[0].name='a b': must match"),
    ("sweep.model=[{path: simulated, name: x},{path: 'simulated:0.2', name: x}]", "two values are labelled 'x'"),
    ("sweep.model=[{path: simulated, cluster: {sequence_parallel: 0}}]",
     "sweep.model[0].cluster.sequence_parallel=0: must be >= 1"),
    ("sweep.model=[{path: simulated, cluster: {replicas: 2}}]", "may set only sequence_parallel"),
    ("sweep.model=[{path: simulated, render: {seed: 3}}]", "sweep.model[0].render={'seed': 3}: may set only"),
    ("sweep.model=[{path: simulated, render: {num_frames: 8}}]", "sweep.model[0].render.num_frames=8: must be 4k+1"),
])
def test_bad_sweeps_are_refused_naming_the_key_and_value(tmp_path, override, message):
    if message is None:
        sweep = Sweep.parse(_cfg(tmp_path, override))
        assert [m.label for m in sweep.models] == ["simulated", "simulated-0.2"]
        return
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, override)
    assert message in str(err.value)


def test_every_row_expands_into_every_cell_with_readable_stable_ids(tmp_path):
    cfg = _cfg(tmp_path, "sweep.model=[simulated,{name: slow, path: 'simulated:0.2'}]",
               "sweep.num_inference_steps=[4,16]", "sweep.guidance_scale=[1.0,5.0]", "sweep.seeds=2")
    tasks, invalid = _cells(cfg)
    assert not invalid and len(tasks) == 2 * 2 * 2 * 2 * 2
    by_id = {t.id: t for t in tasks}
    cell = by_id["cat__slow__steps-16__cfg-5.0__seed-1"]
    assert (cell.num_inference_steps, cell.guidance_scale, cell.prompt) == (16, 5.0, "a cat dancing")
    assert json.loads(cell.sweep) == {"model": "slow", "num_inference_steps": 16, "guidance_scale": 5.0, "seed": 1}
    assert object_key(cell.id, "mp4") == f"videos/{cell.id}.mp4"  # ids are their own object keys
    # Seed k of a row is the seed it gets with render.seed + k: seed 0 is its seed without a sweep, and every
    # model and setting of a prompt renders from the same noise.
    assert cell.seed == derive_seed(cfg.render.seed + 1, "cat")
    assert {t.seed for t in tasks if t.id.startswith("cat__") and t.id.endswith("seed-0")} == {derive_seed(0, "cat")}
    # Adding a value to an axis keeps every existing id.
    more = _cfg(tmp_path, "sweep.model=[simulated,{name: slow, path: 'simulated:0.2'}]",
                "sweep.num_inference_steps=[4,16,32]", "sweep.guidance_scale=[1.0,5.0]", "sweep.seeds=3")
    assert set(by_id) < {t.id for t in _cells(more)[0]}


def test_with_replica_groups_each_model_has_a_pool_per_group(tmp_path):
    rows = [{"id": "short", "prompt": "a cat"}, {"id": "long", "prompt": "a dog", "num_frames": 241}]
    cfg = _cfg(tmp_path, "sweep.model=[{name: a, path: simulated},{name: b, path: 'simulated:0.2'}]",
               "cluster.groups=[{name: short, max_tokens: 50000},{name: long}]", rows=rows)
    checked = preflight(cfg)
    intake = Intake(checked.dataset, checked.lanes, checked.sweep, 0, lambda row: None).start()
    assert intake.wait_first()
    (window,) = intake.poll()
    intake.close()
    assert {pool: [t.id for t in tasks] for pool, tasks in window.items()} == {
        "a/short": ["short__a"], "a/long": ["long__a"], "b/short": ["short__b"], "b/long": ["long__b"]}


def test_a_model_value_carries_its_own_render_defaults(tmp_path):
    cfg = _cfg(tmp_path, "sweep.model=[{name: full, path: simulated},"
                         "{name: fast, path: simulated, render: {num_inference_steps: 16, guidance_scale: 1.0}}]")
    tasks, _ = _cells(cfg)
    assert {(t.id.split("__")[1], t.num_inference_steps, t.guidance_scale) for t in tasks} == {
        ("full", 50, 5.0), ("fast", 16, 1.0)}


def test_row_columns_override_axes_and_explicit_seeds_apply_to_every_row(tmp_path):
    rows = [{"id": "cat", "prompt": "a cat", "num_inference_steps": 7}, {"id": "dog", "prompt": "a dog"}]
    cfg = _cfg(tmp_path, "sweep.num_inference_steps=[4,16]", "sweep.seeds=[11,12]", rows=rows)
    tasks, _ = _cells(cfg)
    by_id = {t.id: t for t in tasks}
    assert by_id["cat__steps-16__seed-11"].num_inference_steps == 7  # the row's own value wins, as recorded
    assert by_id["dog__steps-16__seed-11"].num_inference_steps == 16
    assert {t.seed for t in tasks} == {11, 12}
    # The cell's seed axis as a typed column apart from the effective seed: its position in the list.
    assert by_id["dog__steps-4__seed-12"].row()["sweep_seed_index"] == 1
    assert by_id["dog__steps-4__seed-11"].row()["sweep_seed_index"] == 0
    assert "sweep_model" not in by_id["dog__steps-4__seed-11"].row()  # no model axis


def test_invalid_cells_name_the_axis_value_and_rule_and_the_rest_of_the_grid_renders(tmp_path):
    rows = ROWS + [{"id": "own", "prompt": "a koi", "seed": 5}]
    cfg = _cfg(tmp_path, "sweep.model=[{name: full, path: simulated},{name: nabla, path: simulated, "
                         "attention_type: nabla}]", "sweep.height=[128,192]", "sweep.seeds=1",
               "render.width=128", rows=rows)
    tasks, invalid = _cells(cfg)
    errors = {r["id"]: r["error"] for r in invalid}
    # NABLA needs 128-px sizes: 192 is refused for that model only, naming the axis and the model.
    assert errors["cat__nabla__h-192__seed-0"].startswith("sweep axis height=192: must be a positive multiple of 128")
    assert "sweep model 'nabla'" in errors["cat__nabla__h-192__seed-0"]
    assert "cat__full__h-192__seed-0" in {t.id for t in tasks}
    # A row with its own seed cannot take a seeds axis: its cells are invalid, the others render.
    assert errors["own__full__h-128__seed-0"].startswith("seed=5: the row sets its own seed")
    assert len(tasks) == 2 * 2 * 2 - 2 and len(invalid) == 2 + 4
    assert all(json.loads(r["sweep"])["model"] in ("full", "nabla") for r in invalid)


@pytest.mark.slow
def test_a_two_model_sweep_renders_each_cell_once_on_its_model_as_plain_diffusers(tmp_path, inprocess, tiny_pipe):
    from diffusers import Kandinsky5T2VPipeline

    from pipelines import resolve_model

    sweep = ["sweep.model=[tiny,{name: tiny-b, path: 'tiny:1'}]", "sweep.num_inference_steps=[1,2]"]
    cfg = _cfg(tmp_path, *TINY_RENDER, "model.path=tiny", "output.format=npy", "cluster.replicas=2", *sweep,
               "sweep.seeds=3")
    result = run(cfg, progress=False)
    assert (result.rows, result.ok, result.rendered, result.input_rows) == (24, 24, 24, 2)

    storage = Storage(cfg.output.uri)
    rows = read_manifest(storage).to_pylist()
    assert len({r["id"] for r in rows}) == 24
    other = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny:1"))
    other.set_progress_bar_config(disable=True)
    pipes = {"tiny": tiny_pipe, "tiny:1": other}
    differs = set()
    for row in rows:
        cell = json.loads(row["sweep"])
        assert row["model"] == {"tiny": "tiny", "tiny-b": "tiny:1"}[cell["model"]]
        assert row["worker"].startswith(cell["model"] + "/replica"), row["worker"]  # a replica of its model
        assert row["num_inference_steps"] == cell["num_inference_steps"]
        assert row["seed"] == derive_seed(cfg.render.seed + cell["seed"], row["id"].split("__")[0])
        assert (row["sweep_model"], row["sweep_seed_index"]) == (cell["model"], cell["seed"])  # typed, apart
        frames = decode(storage.get_bytes(row["key"]), "npy")
        np.testing.assert_array_equal(frames, oracle(pipes[row["model"]], row), err_msg=row["id"])
        if row["model"] not in differs:  # the two models really are two models: one row of each, on the other
            assert not np.array_equal(frames, oracle(pipes["tiny:1" if row["model"] == "tiny" else "tiny"], row))
            differs.add(row["model"])
    assert differs == {"tiny", "tiny:1"}
    assert read_success(storage)["sweep"]["axes"] == ["model", "num_inference_steps", "seed"]

    # A fourth seed renders only its 8 new cells; the 24 are done.
    more = _cfg(tmp_path, *TINY_RENDER, "model.path=tiny", "output.format=npy", "cluster.replicas=2", *sweep,
                "sweep.seeds=4")
    again = run(more, progress=False)
    assert (again.rows, again.rendered, again.skipped) == (32, 8, 24)
    new = [r for r in read_manifest(storage).to_pylist() if r["id"].endswith("__seed-3")]
    assert len(new) == 8 and all(r["status"] == "ok" for r in new)
    assert verify(cfg.output.uri) == []
