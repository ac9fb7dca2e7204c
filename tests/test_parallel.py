"""Sequence- and CFG-parallel gangs in the model layer: CPU processes joined with gloo on loopback.

The oracle: plain `Kandinsky5T2VPipeline(...)` output on one device. CFG parallel must equal it bit for bit;
sequence parallel within `SHARD_TOLERANCE`, on the pinned CPU code path the replicas use and on this
host's own fastest one (AVX-512 on an Intel Xeon), where shard GEMMs round differently from the whole.
"""

import socket

import pytest
import torch.multiprocessing as mp

from pipelines import CPU_NUMERICS_ENV, ParallelSpec, RenderRequest
from tests.helpers import assert_like_one_device, oracle

REQUESTS = [
    RenderRequest("a cat dancing", None, 64, 64, 17, 3, 5.0, 3),
    # Odd text length and a 3-frame-latent clip: lengths that do not divide the degree.
    RenderRequest("a red car driving through a city street at night", "blurry", 48, 32, 9, 2, 4.0, 11),
    RenderRequest("koi fish in a pond", None, 32, 32, 5, 2, 1.0, 5),  # no guidance: one call per step
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, spec, port, cache, requests, queue, options=None):
    import os

    os.environ["KANDINSKY_BATCH_CACHE"] = cache
    import torch

    torch.set_num_threads(1)
    from pipelines import resolve_model
    from pipelines.parallel import init_gang, open_gang

    try:
        resolve_model("tiny")  # as the worker does: built (once per node) before the process group exists
        init_gang(rank, spec.world_size, "127.0.0.1", port, "cpu", timeout_s=120)
        from pipelines import RenderOptions

        gang = open_gang("tiny", spec, rank, device="cpu", options=options or RenderOptions())
        frames = [gang.render(r) for r in requests]
        gang.close()
        queue.put((rank, frames, None))
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        queue.put((rank, None, repr(exc)))


def run_gang(spec: ParallelSpec, cache: str, requests, options=None) -> list:
    """Rank 0's frames for `requests`, rendered by a gang of spawned CPU processes joined with gloo."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, spec, port, cache, requests, queue, options)) for r in range(spec.world_size)]
    for p in procs:
        p.start()
    try:
        results = dict((rank, (frames, err)) for rank, frames, err in (queue.get(timeout=240) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {rank: err for rank, (_, err) in results.items() if err}
    assert not errors, errors
    assert all(results[rank][0] == [None] * len(requests) for rank in results if rank != 0), "only rank 0 writes"
    return results[0][0]


# SP 2 x CFG 2 (four ranks) runs through the whole job path in tests/test_gangs.py, with the same oracle.
@pytest.mark.parametrize("spec", [ParallelSpec(ulysses=2), ParallelSpec(cfg=True)], ids=lambda s: s.name)
def test_gang_frames_match_a_single_device(spec, model_cache, tiny_pipe, record_property):
    frames = run_gang(spec, model_cache, REQUESTS)
    exact = [assert_like_one_device(got, oracle(tiny_pipe, r.__dict__), spec, r) for r, got in zip(REQUESTS, frames)]
    record_property("bit_identical", f"{sum(exact)}/{len(exact)}")


def _oracle_main(cache, requests, queue):
    import os

    os.environ["KANDINSKY_BATCH_CACHE"] = cache
    import torch

    torch.set_num_threads(1)
    from diffusers import Kandinsky5T2VPipeline

    from pipelines import resolve_model

    pipe = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    queue.put([oracle(pipe, r.__dict__) for r in requests])


def test_sequence_parallel_keeps_its_tolerance_on_the_hosts_own_blas_path(model_cache, monkeypatch, record_property):
    """The promise may not rest on the pinned AVX2 path: gang and oracle both on this host's native kernels."""
    for name in CPU_NUMERICS_ENV:
        monkeypatch.delenv(name, raising=False)  # spawned processes inherit the environment as it is now
    spec = ParallelSpec(ulysses=2)
    frames = run_gang(spec, model_cache, REQUESTS)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_oracle_main, args=(model_cache, REQUESTS, queue))
    proc.start()
    try:
        wanted = queue.get(timeout=240)
    finally:
        proc.join(timeout=30)
    exact = [assert_like_one_device(got, want, spec, r) for r, got, want in zip(REQUESTS, frames, wanted)]
    record_property("bit_identical", f"{sum(exact)}/{len(exact)}")


def test_shape_names_and_head_divisibility():
    assert [ParallelSpec().name, ParallelSpec(ulysses=4).name, ParallelSpec(cfg=True).name,
            ParallelSpec(ulysses=2, cfg=True).name] == ["1", "sp4", "cfg2", "sp2xcfg2"]
    assert ParallelSpec(ulysses=2, cfg=True).world_size == 4
    assert ParallelSpec(ulysses=7).problems(28) == []
    [problem] = ParallelSpec(ulysses=8).problems(28)
    assert "sequence_parallel=8" in problem and "28" in problem and "7" in problem
    # NABLA runs with Ulysses (mask built after the all-to-all), not with ring attention.
    assert ParallelSpec(ulysses=2).problems(28, "nabla") == []
    [ring] = ParallelSpec(ulysses=2, ring=2).problems(28, "nabla")
    assert "ring_degree=2" in ring and "NABLA" in ring
    assert ParallelSpec(cfg=True).problems(28, "nabla") == []
    # FirstBlockCache decides from a shard: refused with sequence parallel, fine with CFG parallel.
    [fbc] = ParallelSpec(ulysses=2).problems(28, cache="firstblock")
    assert "FirstBlockCache" in fbc
    assert ParallelSpec(cfg=True).problems(28, cache="firstblock") == []


def test_a_tiny_preset_is_never_built_without_weights_on_a_gang_rank(tmp_path):
    """transformers saves weights on rank 0 of a process group only: a rank > 0 must not build (and so cache) a
    preset, or every later load on that node would find its text encoders empty."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_build_on_rank, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results[1].startswith("RuntimeError('building a tiny preset on rank 1 of a process group")
    assert not list(tmp_path.glob("tiny-sr-*")), "nothing half-built is left in the cache"


def _build_on_rank(rank, port, cache, queue):
    from pipelines.parallel import init_gang
    from pipelines.tiny import ensure_tiny

    init_gang(rank, 2, "127.0.0.1", port, "cpu", timeout_s=60)
    try:
        if rank == 1:
            ensure_tiny(cache, 0, "tiny-sr", "pipelines.tiny_sr:build_tiny_sr_pipeline")
        queue.put((rank, "ok"))
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        queue.put((rank, repr(exc)))
