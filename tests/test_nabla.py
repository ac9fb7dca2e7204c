"""NABLA sparse attention: switched on for the tiny model, sequence-parallel, validated and recorded.

On CPU, eager flex attention computes every score and applies only the mask function (the block
sparsity is honoured by the compiled GPU kernel), so frame equality alone cannot show that a gang
builds the right mask. The mask property the gang relies on is tested directly: NABLA's mask is per
head, so building it from the whole sequence for a slice of heads (what a Ulysses rank does) gives
exactly that slice of the single-device mask. A gang's frames against plain diffusers with NABLA: in the model layer
(tests/test_parallel.py) and through a job on Ray (tests/test_gangs.py).
"""

import numpy as np
import pytest
import torch

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from tests.helpers import oracle, write_dataset
from tests.gang_ranks import NABLA
from tests.gang_ranks import NABLA_REQUESTS as REQUESTS


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
