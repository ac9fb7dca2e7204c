"""Sequence- and CFG-parallel gangs in the model layer: CPU processes joined with gloo on loopback.

The oracle: plain `Kandinsky5T2VPipeline(...)` output on one device. CFG parallel must equal it bit for bit;
sequence parallel within `SHARD_TOLERANCE`, on the pinned CPU code path the replicas use and on this
host's own fastest one (AVX-512 on an Intel Xeon), where shard GEMMs round differently from the whole.
"""

import pytest
import torch.multiprocessing as mp

from pipelines import CPU_NUMERICS_ENV, ParallelSpec
from tests.gang_ranks import PARALLEL_REQUESTS as REQUESTS
from tests.gang_ranks import free_port, run_gangs
from tests.helpers import assert_like_one_device, oracle


# SP 2 x CFG 2 (four ranks) runs through the whole job path in tests/test_gangs.py, with the same oracle.
@pytest.mark.parametrize("name", ["sp2", "cfg2"])
def test_gang_frames_match_a_single_device(name, cpu_gangs, tiny_pipe, record_property):
    spec, requests, _ = cpu_gangs.jobs[name]
    exact = [assert_like_one_device(got, oracle(tiny_pipe, r.__dict__), spec, r)
             for r, got in zip(requests, cpu_gangs.frames[name])]
    record_property("bit_identical", f"{sum(exact)}/{len(exact)}")


def test_sequence_parallel_keeps_its_tolerance_on_the_hosts_own_blas_path(model_cache, monkeypatch, record_property):
    """The promise may not rest on the pinned AVX2 path: gang and oracle both on this host's native kernels."""
    for name in CPU_NUMERICS_ENV:
        monkeypatch.delenv(name, raising=False)  # spawned processes inherit the environment as it is now
    spec = ParallelSpec(ulysses=2)
    out = run_gangs({"sp2": (spec, REQUESTS, None)}, model_cache, oracle=True)
    exact = [assert_like_one_device(got, want, spec, r)
             for r, got, want in zip(REQUESTS, out["sp2"], out["oracle"]["sp2"])]
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
    port = free_port()
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
