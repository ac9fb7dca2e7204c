"""Per-video speed options: exact ones keep the seed contract, batched guidance stays within ±1 uint8
level, approximate ones are recorded as such in the manifest."""

import json

import numpy as np
import pytest

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from pipelines import RenderOptions, RenderRequest, load_spec, open_renderer
from tests.helpers import TINY_RENDER, oracle, write_dataset


def test_each_distinct_text_is_encoded_once_per_replica(model_cache, tiny_pipe):
    renderer = open_renderer("tiny")
    calls = []
    encode = renderer.pipe.encode_prompt
    renderer.pipe.encode_prompt = lambda text, **kw: calls.append(text) or encode(text, **kw)
    requests = [RenderRequest("a cat", None, 32, 32, 5, 2, 5.0, seed) for seed in range(3)]
    requests.append(RenderRequest("a dog", "blurry", 32, 32, 5, 2, 5.0, 9))
    for request in requests:
        assert np.array_equal(renderer.render(request), oracle(tiny_pipe, request.__dict__))
    assert sorted(calls) == sorted(["a cat", requests[0].effective_negative_prompt(), "a dog", "blurry"])


def _same_length_negative(prompt: str) -> str:
    """A negative prompt with exactly as many text tokens as `prompt`, so the two branches can share a batch."""
    spec = load_spec("tiny")
    target = spec.prompt_tokens(prompt)
    for words in range(1, 40):
        candidate = " ".join(["blurry"] * words)
        if spec.prompt_tokens(candidate) == target:
            return candidate
    raise AssertionError("no same-length negative prompt found")


def test_batched_guidance_stays_within_one_level(model_cache, tiny_pipe):
    renderer = open_renderer("tiny", options=RenderOptions(batched_guidance=True))
    prompt = "a cat dancing in the rain"
    request = RenderRequest(prompt, _same_length_negative(prompt), 48, 32, 9, 3, 5.0, 4)
    frames = renderer.render(request)
    assert renderer.steps.batched_steps == request.num_inference_steps, "both branches ran as one batch"
    diff = np.abs(frames.astype(int) - oracle(tiny_pipe, request.__dict__).astype(int))
    assert diff.max() <= 1
    # Different text lengths cannot share a batch without padding: those fall back to two exact calls.
    other = RenderRequest(prompt, "blurry, low quality, ugly, deformed, static cartoon", 32, 32, 5, 2, 5.0, 4)
    assert np.array_equal(renderer.render(other), oracle(tiny_pipe, other.__dict__))
    assert renderer.steps.batched_steps == 0


@pytest.mark.parametrize("options", [RenderOptions(attention_backend="native"),
                                     RenderOptions(offload_text_encoder=True)], ids=["native", "offload"])
def test_exact_options_keep_the_seed_contract(options, model_cache, tiny_pipe):
    request = RenderRequest("a red car", None, 32, 32, 5, 2, 5.0, 21)
    assert np.array_equal(open_renderer("tiny", options=options).render(request), oracle(tiny_pipe, request.__dict__))


def test_a_replicas_attention_backend_is_its_models_alone(model_cache, tiny_pipe):
    """diffusers' `set_attention_backend` also sets the process default: a model loaded after a replica chose a
    backend (the next model of a replica switching models, an oracle) must keep the default, and render as before."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    renderer = open_renderer("tiny", options=RenderOptions(attention_type="nabla", attention_backend="flex"))
    chosen = {block.self_attention.processor._attention_backend
              for block in renderer.pipe.transformer.visual_transformer_blocks}
    assert {str(b) for b in chosen} == {"AttentionBackendName.FLEX"} != {str(default)}
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    request = RenderRequest("a red car", None, 32, 32, 5, 2, 5.0, 21)
    assert np.array_equal(open_renderer("tiny").render(request), oracle(tiny_pipe, request.__dict__))


def test_step_cache_keeps_cond_and_uncond_apart(model_cache, tiny_pipe):
    """TaylorSeer runs through diffusers' hooks with separate cache contexts for the two branches."""
    renderer = open_renderer("tiny", options=RenderOptions(cache="taylorseer"))
    contexts = []
    enter = renderer.pipe.transformer.cache_context
    renderer.pipe.transformer.cache_context = lambda name: contexts.append(name) or enter(name)
    frames = renderer.render(RenderRequest("a cat", None, 32, 32, 5, 4, 5.0, 1))
    assert frames.shape == (5, 32, 32, 3)
    assert contexts == ["cond", "uncond"] * 4


@pytest.mark.slow
def test_options_and_approximation_are_recorded_in_the_manifest(tmp_path, inprocess):
    data = write_dataset(tmp_path / "p.parquet", [{"id": "a", "prompt": "a cat"}, {"id": "b", "prompt": "a dog"}])
    base = [f"input.path={data}", "output.format=npy", "cluster.replicas=1", *TINY_RENDER]
    run(load_config(None, [*base, f"output.uri=file://{tmp_path / 'exact'}"]), progress=False)
    run(load_config(None, [*base, f"output.uri=file://{tmp_path / 'cached'}", "model.cache=taylorseer",
                           "model.batched_guidance=true"]), progress=False)
    exact = read_manifest(Storage(f"file://{tmp_path / 'exact'}")).to_pylist()
    cached = read_manifest(Storage(f"file://{tmp_path / 'cached'}")).to_pylist()
    assert {(r["options"], r["approximate"]) for r in exact} == {(None, False)}
    assert {r["approximate"] for r in cached} == {True}
    assert json.loads(cached[0]["options"]) == {"batched_guidance": True, "cache": "taylorseer"}
    # Re-running the approximate prefix without the cache would mix outputs: refused, naming the option.
    with pytest.raises(Exception, match="options"):
        run(load_config(None, [*base, f"output.uri=file://{tmp_path / 'cached'}"]), progress=False)


def test_bad_cache_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="model.cache='teacache'"):
        load_config(None, ["input.path=x", "output.uri=y", "model.cache=teacache"])


def _tail_runs(renderer) -> list:
    """Counts the last visual block's attention calls: a skipped step never reaches it."""
    calls = []
    renderer.pipe.transformer.visual_transformer_blocks[-1].self_attention.register_forward_hook(
        lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("options", [
    RenderOptions(cache="firstblock", cache_args=(("threshold", 10.0),)),
    RenderOptions(cache="magcache", cache_args=(("mag_ratios", "lite-sft-5s"),)),
], ids=["firstblock", "magcache"])
def test_step_caches_skip_blocks_and_are_approximate(options, model_cache, tiny_pipe):
    """FirstBlockCache binds Kandinsky 5's `visual_embed` blocks; MagCache runs with published ratios."""
    renderer = open_renderer("tiny", options=options)
    runs = _tail_runs(renderer)
    request = RenderRequest("a cat", None, 32, 32, 5, 10, 5.0, 1)
    frames = renderer.render(request)
    assert 0 < len(runs) < 2 * request.num_inference_steps, "some steps skipped the tail blocks"
    assert not np.array_equal(frames, oracle(tiny_pipe, request.__dict__)), "approximate, as recorded"
    assert options.approximate
    # Another step count: MagCache re-interpolates its ratios; both caches start afresh per video.
    runs.clear()
    shorter = RenderRequest("a cat", None, 32, 32, 5, 6, 5.0, 1)
    assert renderer.render(shorter).shape == (5, 32, 32, 3)
    assert 0 < len(runs) < 2 * shorter.num_inference_steps


def test_published_mag_ratios_are_picked_from_the_checkpoint_name():
    from pipelines.caching import published_ratios, ratios_for_model
    from pipelines.mag_ratios import PUBLISHED

    assert ratios_for_model("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers") == "lite-sft-5s"
    assert ratios_for_model("s3://models/Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers") == "pro-sft-10s"
    assert ratios_for_model("kandinskylab/Kandinsky-5.0-T2V-Lite-distilled16steps-5s-Diffusers") is None
    assert ratios_for_model("tiny") is None
    for name, (_, _, interleaved) in PUBLISHED.items():
        ratios = published_ratios(name)
        assert len(ratios) == 50 and ratios[0] == 1.0, name  # one per step of the 50-step calibration run
        assert ratios[1] == pytest.approx(interleaved[0] if not any(interleaved[1::2])
                                          else (interleaved[0] + interleaved[1]) / 2)


@pytest.mark.parametrize("overrides, message", [
    (["model.cache=magcache"], "model.cache_args.mag_ratios=None: .*no.* published"),
    (["model.cache=magcache", "model.cache_args={mag_ratios: lite-sft-7s}"], "mag_ratios='lite-sft-7s'"),
    (["model.cache=firstblock", "cluster.sequence_parallel=2"], "FirstBlockCache"),
    # A typo in an argument would fail every row on the replicas: named before Ray starts instead.
    (["model.cache=magcache", "model.cache_args={mag_ratios: lite-sft-5s, threshhold: 0.1}"],
     r"model\.cache_args\.threshhold=0\.1: not an argument of diffusers\.MagCacheConfig \(known: .*threshold"),
    (["model.cache=firstblock", "model.cache_args={treshold: 0.1}"], r"model\.cache_args\.treshold=0\.1"),
    (["model.cache=taylorseer", "model.cache_args={num_inference_steps: 8}"], "num_inference_steps"),
])
def test_cache_settings_the_model_cannot_use_are_refused_before_ray(tmp_path, model_cache, overrides, message):
    data = write_dataset(tmp_path / "p.parquet", [{"prompt": "a cat"}])
    cfg = load_config(None, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", *overrides])
    with pytest.raises(ConfigError, match=message):
        run(cfg, progress=False)


def test_a_batch_of_rows_stays_within_one_level_of_single_calls(model_cache, tiny_pipe):
    renderer = open_renderer("tiny")
    requests = [RenderRequest("a cat dancing", None, 32, 48, 9, 3, 5.0, seed) for seed in (0, 7, 2**40)]
    frames = renderer.render_batch(requests)
    assert len(frames) == len(requests)
    for request, got in zip(requests, frames):
        single = oracle(tiny_pipe, request.__dict__)
        assert got.shape == single.shape
        assert np.abs(got.astype(int) - single.astype(int)).max() <= 1, request.seed
    assert not np.array_equal(frames[0], frames[1]), "each row keeps its own seed"


def test_job_batches_alike_rows_and_keeps_each_seed(tmp_path, inprocess, tiny_pipe):
    # A seed sweep (batchable) plus one row of another size (its own batch). In-process replicas: batching is the
    # queue's and the worker's code, the same behind either transport (a batch crosses Ray as the list every Ray
    # test sends).
    rows = [{"id": f"sweep-{s}", "prompt": "a cat dancing", "seed": s, "height": None} for s in range(5)]
    rows.append({"id": "other", "prompt": "a cat dancing", "seed": 1, "height": 48})
    data = write_dataset(tmp_path / "p.parquet", rows)
    cfg = load_config(None, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", "output.format=npy",
                             "cluster.replicas=1", "render.batch_size=3", *TINY_RENDER])
    assert run(cfg, progress=False).ok == len(rows)
    storage = Storage(f"file://{tmp_path / 'out'}")
    manifest = read_manifest(storage).to_pylist()
    # Rows of one batch share its render time; the sweep of 5 forms batches of 3 and 2.
    sizes = sorted(np.unique([r["render_seconds"] for r in manifest], return_counts=True)[1].tolist())
    assert sizes == [1, 2, 3]
    for row in manifest:
        got = np.load(__import__("io").BytesIO(storage.get_bytes(storage.key_of(row["uri"]))))
        assert np.abs(got.astype(int) - oracle(tiny_pipe, row).astype(int)).max() <= 1, row["id"]
