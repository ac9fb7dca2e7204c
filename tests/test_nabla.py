"""NABLA sparse attention: switched on for the tiny model, sequence-parallel, validated and recorded.

On CPU, eager flex attention computes every score and applies only the mask function (the block
sparsity is honoured by the compiled GPU kernel), so frame equality alone cannot show that a gang
builds the right mask. The mask property the gang relies on is tested directly: NABLA's mask is per
head, so building it from the whole sequence for a slice of heads (what a Ulysses rank does) gives
exactly that slice of the single-device mask.
"""

import json

import numpy as np
import pytest
import torch

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from pipelines import ParallelSpec
from pipelines.render_common import set_attention_backend
from tests.helpers import TINY_RENDER, assert_like_one_device, oracle, write_dataset
from tests.gang_ranks import NABLA
from tests.gang_ranks import NABLA_REQUESTS as REQUESTS


@pytest.fixture(scope="module")
def nabla_pipe(model_cache):
    """Plain diffusers with NABLA switched on the way its docs say: config + flex backend."""
    from diffusers import Kandinsky5T2VPipeline

    from pipelines import resolve_model

    pipe = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    enable_nabla_as_documented(pipe)
    return pipe


def enable_nabla_as_documented(pipe) -> None:
    """NABLA on a plain pipeline with diffusers' own processors (the oracle never runs ours)."""
    from pipelines.nabla import NABLA_DEFAULTS

    pipe.transformer.register_to_config(attention_type="nabla",
                                        **{f"attention_{k}": v for k, v in NABLA_DEFAULTS.items()})
    pipe.transformer.attention_type = "nabla"
    # `pipe.transformer.set_attention_backend("flex")`, which also makes flex the process default for every model
    # loaded later (the other tests' oracles): the helper calls it and puts the default back.
    set_attention_backend(pipe.transformer, "flex")


def test_a_head_slice_of_the_mask_is_the_mask_of_that_head_slice():
    from diffusers import Kandinsky5T2VPipeline
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2

    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 512, 4, 16, generator=generator) for _ in range(2))  # (B, S, H, D): 8 blocks
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(2, 2, 2, 3, 1, 1, device="cpu")[None, None]
    full = nablaT_v2(q, k, sta, thr=0.7).to_dense()
    assert 0 < full.float().mean() < 1, "the mask is really sparse here"
    for start in (0, 2):
        part = nablaT_v2(q[:, :, start:start + 2], k[:, :, start:start + 2], sta, thr=0.7).to_dense()
        assert torch.equal(part, full[:, start:start + 2])


def test_fused_flex_tiles_divide_nablas_blocks():
    """On an H200 (torch 2.11) compiled flex refused NABLA's mask with torch's default 128-wide KV tile:
    the tiles we pin must divide the mask's own block size in both directions."""
    from diffusers import Kandinsky5T2VPipeline
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2

    from pipelines.nabla import NABLA_KERNEL_OPTIONS

    q = torch.randn(1, 256, 2, 16, generator=torch.Generator().manual_seed(0))
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(1, 2, 2, 3, 1, 1, device="cpu")[None, None]
    q_block, kv_block = nablaT_v2(q, q, sta, thr=0.9).BLOCK_SIZE
    assert q_block % NABLA_KERNEL_OPTIONS["BLOCK_M"] == 0 and kv_block % NABLA_KERNEL_OPTIONS["BLOCK_N"] == 0


def test_nabla_processors_follow_the_attention_type(model_cache):
    """NABLA runs through `nabla_attention` (compiled flex on CUDA: eager flex materialises every score,
    236 GiB for one 5 s layer on an H200), whether NABLA is switched on or shipped; regular restores stock."""
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

    from pipelines.factory import open_renderer
    from pipelines.nabla import NablaAttnProcessor, set_attention_type

    transformer = open_renderer("tiny", options=NABLA).pipe.transformer
    kinds = {type(b.self_attention.processor) for b in transformer.visual_transformer_blocks}
    assert kinds == {NablaAttnProcessor}
    set_attention_type(transformer, "regular")
    assert {type(b.self_attention.processor) for b in transformer.visual_transformer_blocks} == {Kandinsky5AttnProcessor}
    transformer.register_to_config(attention_type="nabla")  # as a 10 s checkpoint ships
    assert set_attention_type(transformer, None) == "nabla"
    assert {type(b.self_attention.processor) for b in transformer.visual_transformer_blocks} == {NablaAttnProcessor}


def test_nabla_renders_as_plain_diffusers(model_cache, nabla_pipe):
    from pipelines.factory import open_renderer

    renderer = open_renderer("tiny", options=NABLA)
    assert renderer.pipe.transformer.config.attention_type == "nabla"
    request = REQUESTS[0]
    assert np.array_equal(renderer.render(request), oracle(nabla_pipe, request.__dict__))


# SP 2 x CFG 2 composes this with CFG parallel's branch exchange, which no attention processor touches
# (tests/test_parallel.py runs that shape): SP 2 alone here.
def test_sequence_parallel_nabla_matches_a_single_device(cpu_gangs, nabla_pipe, record_property):
    """The stock processor would build the mask from a 160-token shard (and fail to tile it by 64)."""
    spec = ParallelSpec(ulysses=2)
    frames = cpu_gangs.frames["sp2-nabla"]
    exact = [assert_like_one_device(got, oracle(nabla_pipe, r.__dict__), spec, r) for r, got in zip(REQUESTS, frames)]
    record_property("bit_identical", f"{sum(exact)}/{len(exact)}")


@pytest.mark.parametrize("overrides, message", [
    (["model.attention_type=sparse"], "model.attention_type='sparse'"),
    (["model.nabla_args={P: 1.5}"], "model.nabla_args.P=1.5"),
    (["model.nabla_args={wT: 4}"], "model.nabla_args.wT=4"),
    (["model.nabla_args={Q: 1}"], "model.nabla_args='Q'"),
])
def test_bad_nabla_keys_are_refused_naming_them(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, ["input.path=x", "output.uri=y", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["model.attention_type=nabla", "model.attention_backend=native"], "model.attention_backend='native'"),
    (["model.nabla_args={P: 0.8}"], "model.nabla_args="),
    (["model.attention_type=nabla", "cluster.sequence_parallel=2", "cluster.ring_degree=2"], "ring_degree=2"),
])
def test_nabla_options_the_model_cannot_run_are_refused_before_ray(tmp_path, model_cache, overrides, message):
    data = write_dataset(tmp_path / "p.parquet", [{"prompt": "a cat"}])
    cfg = load_config(None, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", *overrides])
    with pytest.raises(ConfigError, match=message):
        run(cfg, progress=False)
    assert not (tmp_path / "out").exists(), "nothing started"


@pytest.mark.slow
def test_nabla_gang_job_records_approximate_sparse_attention(tmp_path, ray_local, nabla_pipe):
    rows = [{"id": "a", "prompt": "a cat dancing", "height": 128, "width": 128, "num_frames": 9},
            {"id": "small", "prompt": "a dog", "height": 64, "width": 64}]
    data = write_dataset(tmp_path / "p.parquet", rows)
    uri = f"file://{tmp_path / 'out'}"
    cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", "output.format=npy", *TINY_RENDER,
                             "model.attention_type=nabla", "cluster.sequence_parallel=2", "cluster.replicas=1"])
    run(cfg, progress=False)
    manifest = {r["id"]: r for r in read_manifest(Storage(uri)).to_pylist()}
    ok, small = manifest["a"], manifest["small"]
    assert ok["status"] == "ok" and ok["approximate"] is True and ok["gang"] == "sp2"
    assert json.loads(ok["options"]) == {"attention_backend": "flex", "attention_type": "nabla"}
    assert_like_one_device(np.load(ok["uri"].removeprefix("file://")), oracle(nabla_pipe, ok), ParallelSpec(ulysses=2))
    # NABLA tiles 8x8 latent patches: 64 px is not a multiple of 128, so the row is invalid, not rendered.
    assert small["status"] == "invalid" and "multiple of 128" in small["error"]
