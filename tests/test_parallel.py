"""Sequence- and CFG-parallel gangs in the model layer: CPU processes joined with gloo on loopback.

The oracle: plain `Kandinsky5T2VPipeline(...)` output on one device. CFG parallel must equal it bit for bit;
sequence parallel within `SHARD_TOLERANCE`, on the pinned CPU code path the replicas use and on this
host's own fastest one (AVX-512 on an Intel Xeon), where shard GEMMs round differently from the whole.
"""

import pytest

from pipelines import CPU_NUMERICS_ENV, ParallelSpec
from tests.gang_ranks import NABLA_REQUESTS
from tests.gang_ranks import PARALLEL_REQUESTS as REQUESTS
from tests.gang_ranks import run_gangs
from tests.helpers import assert_like_one_device, oracle

pytestmark = pytest.mark.slow  # spawned rank processes


@pytest.fixture(scope="module")
def one_device(tiny_pipe):
    """Plain diffusers' frames of a request, rendered once for every gang that renders it."""
    frames = {}

    def of(request):
        if request not in frames:
            frames[request] = oracle(tiny_pipe, request.__dict__)
        return frames[request]

    return of


# SP 2 x CFG 2 (four ranks) runs through the whole job path in tests/test_gangs.py, with the same oracle.
@pytest.mark.parametrize("name", ["sp2", "cfg2"])
def test_gang_frames_match_a_single_device(name, cpu_gangs, one_device, record_property):
    spec, requests, _ = cpu_gangs.jobs[name]
    exact = [assert_like_one_device(got, one_device(r), spec, r) for r, got in zip(requests, cpu_gangs.frames[name])]
    record_property("bit_identical", f"{sum(exact)}/{len(exact)}")


# SP 2 x CFG 2 composes this with CFG parallel's branch exchange, which no attention processor touches
# (the test above runs that shape through a job): SP 2 alone here.
def test_sequence_parallel_nabla_matches_a_single_device(cpu_gangs, nabla_pipe, record_property):
    """The stock processor would build the mask from a 160-token shard (and fail to tile it by 64)."""
    spec = ParallelSpec(ulysses=2)
    frames = cpu_gangs.frames["sp2-nabla"]
    exact = [assert_like_one_device(got, oracle(nabla_pipe, r.__dict__), spec, r)
             for r, got in zip(NABLA_REQUESTS, frames)]
    record_property("bit_identical", f"{sum(exact)}/{len(exact)}")


@pytest.fixture(scope="module")
def native_gang(model_cache, tmp_path_factory):
    """One SP 2 gang spawned on this host's native kernels, plain diffusers beside it in rank 0's process, and
    rank 1's attempt to build a tiny preset inside the process group (into a cache of its own)."""
    probe = tmp_path_factory.mktemp("preset-probe")
    with pytest.MonkeyPatch.context() as patch:
        for name in CPU_NUMERICS_ENV:
            patch.delenv(name, raising=False)  # spawned processes inherit the environment as it is now
        out = run_gangs({"sp2": (ParallelSpec(ulysses=2), REQUESTS, None)}, model_cache, oracle=True,
                        preset_probe=str(probe))
    return out, probe


def test_sequence_parallel_keeps_its_tolerance_on_the_hosts_own_blas_path(native_gang, record_property):
    """The promise may not rest on the pinned AVX2 path: gang and oracle both on this host's native kernels."""
    out, _ = native_gang
    spec = ParallelSpec(ulysses=2)
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


def test_a_tiny_preset_is_never_built_without_weights_on_a_gang_rank(native_gang):
    """transformers saves weights on rank 0 of a process group only: a rank > 0 must not build (and so cache) a
    preset, or every later load on that node would find its text encoders empty (rank 1 of the gang above tries)."""
    out, probe = native_gang
    assert out["preset_probe"][1].startswith("RuntimeError('building a tiny preset on rank 1 of a process group")
    assert not list(probe.glob("tiny-sr-*")), "nothing half-built is left in the cache"
