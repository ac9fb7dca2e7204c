"""Gangs of the model layer as spawned CPU processes joined with gloo on loopback, several gangs per spawn.

One pair of rank processes renders every gang of a world size in turn (a fresh process group and renderer each),
so the suite pays their interpreter start and imports once: `run_gangs`. With `oracle=True`, rank 0 also renders
the requests with plain diffusers in its own process, on the same numerics (the host's own BLAS path, say); with
`preset_probe`, the ranks > 0 also try to build a tiny preset while in the process group."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp

from pipelines import ParallelSpec, RenderOptions, RenderRequest

PARALLEL_REQUESTS = [
    RenderRequest("a cat dancing", None, 64, 64, 17, 3, 5.0, 3),
    # Odd text length and a 3-frame-latent clip: lengths that do not divide the degree.
    RenderRequest("a red car driving through a city street at night", "blurry", 48, 32, 9, 2, 4.0, 11),
    RenderRequest("koi fish in a pond", None, 32, 32, 5, 2, 1.0, 5),  # no guidance: one call per step
]
NABLA = RenderOptions(attention_type="nabla", attention_backend="flex")
# 128 px: NABLA groups 8x8 latent patches; 17 frames = 5 latent frames, 320 tokens (5 blocks of 64).
NABLA_REQUESTS = [
    RenderRequest("a cat dancing", None, 128, 128, 17, 2, 5.0, 3),
    RenderRequest("a red car driving through a city street at night", "blurry", 128, 256, 9, 2, 4.0, 11),
]
PINNED_GANGS = {
    "sp2": (ParallelSpec(ulysses=2), PARALLEL_REQUESTS, None),
    "cfg2": (ParallelSpec(cfg=True), PARALLEL_REQUESTS, None),
    "sp2-nabla": (ParallelSpec(ulysses=2), NABLA_REQUESTS, NABLA),
}
"""The gangs rendered on the replicas' pinned numerics, once per session (the `cpu_gangs` fixture)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe_preset(cache: str) -> str:
    """What building a tiny preset under `cache` gives on this rank of a process group: "ok" or the error."""
    from pipelines.tiny import ensure_tiny

    try:
        ensure_tiny(cache, 0, "tiny-sr", "pipelines.tiny_sr:build_tiny_sr_pipeline")
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        return repr(exc)


def _rank_main(rank, world_size, jobs, ports, cache, queue, oracle, preset_probe):
    import os

    os.environ["KANDINSKY_BATCH_CACHE"] = cache
    import torch

    torch.set_num_threads(1)
    from pipelines import RenderOptions, resolve_model
    from pipelines.parallel import init_gang, open_gang

    try:
        resolve_model("tiny")  # as the worker does: built (once per node) before the process group exists
        results = {}
        for (name, (spec, requests, options)), port in zip(jobs.items(), ports):
            assert spec.world_size == world_size, (name, spec)
            init_gang(rank, world_size, "127.0.0.1", port, "cpu", timeout_s=120)
            if preset_probe and rank and "preset_probe" not in results:
                results["preset_probe"] = _probe_preset(preset_probe)
            gang = open_gang("tiny", spec, rank, device="cpu", options=options or RenderOptions())
            results[name] = [gang.render(r) for r in requests]
            gang.close()
        if oracle and rank == 0:
            from diffusers import Kandinsky5T2VPipeline

            from tests.helpers import oracle as plain

            pipe = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny"))
            pipe.set_progress_bar_config(disable=True)
            results["oracle"] = {name: [plain(pipe, r.__dict__) for r in requests]
                                 for name, (_, requests, _) in jobs.items()}
        queue.put((rank, results, None))
    except Exception as exc:  # noqa: BLE001 - reported to the test process
        queue.put((rank, None, repr(exc)))


def run_gangs(jobs: dict, cache: str, oracle: bool = False, preset_probe: str | None = None) -> dict:
    """Rank 0's frames per gang of `jobs` (name -> (spec, requests, options), one world size), rendered in turn by
    one set of spawned rank processes; with `oracle`, also `["oracle"][name]`: plain diffusers in rank 0's process;
    with `preset_probe` (a cache directory), also `["preset_probe"][rank]`: each rank > 0's `_probe_preset`."""
    world_size = {spec.world_size for spec, _, _ in jobs.values()}
    assert len(world_size) == 1, world_size
    world_size = world_size.pop()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports = [free_port() for _ in jobs]
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, jobs, ports, cache, queue, oracle, preset_probe))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        results = {rank: (out, err) for rank, out, err in (queue.get(timeout=300) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {rank: err for rank, (_, err) in results.items() if err}
    assert not errors, errors
    probes = {rank: out.pop("preset_probe") for rank, (out, _) in results.items() if "preset_probe" in out}
    for rank, (out, _) in results.items():
        if rank:
            assert all(frames == [None] * len(jobs[name][1]) for name, frames in out.items()), "only rank 0 writes"
    return results[0][0] | ({"preset_probe": probes} if preset_probe else {})
