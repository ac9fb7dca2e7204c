"""GPU part 4: no idle GPU between rows. The render actor's own two threads, driven without Ray.

`kandinsky_batch.fleet.worker.RenderWorker` (the class Ray wraps as the render actor) is built directly on a
real-size random-weight model saved in diffusers format and loaded through `from_pretrained`: the Lite DiT
and the HunyuanVideo VAE at full size, the tiny preset's text encoders (they run once per prompt). Rows are
handed to it as the actor's concurrency group does: two `render` calls in flight, tickets in order, so
one row encodes (H.264), checksums and uploads (local disk) while the next renders.

After one warm-up row, over the next `--rows` rows: the GPU's busy fraction between the first and the last
render from the CUDA kernels' own timestamps (torch.profiler; the union of kernel intervals over the window),
the host-side gaps between consecutive renders, NVML's utilization samples where NVML answers, and where the
GPU idled: the longest gaps between kernels with the host ops that ran in them (to find what is left to overlap).

    python benchmarks/gpu_overlap.py                                          # on the GPU
    .venv/bin/python benchmarks/gpu_overlap.py --dims tiny --device cpu --clip tiny   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from _common import machine, table, write_json
from _gpu import CLIPS, LITE, TINY, VAE_LITE, VAE_TINY, build_transformer, build_vae, is_cuda

DIMS = {"lite": (LITE, VAE_LITE), "tiny": (TINY, VAE_TINY)}
PROMPTS = ("a cat dancing in the rain", "a dog running on the beach at sunset",
           "a red car driving through a city street at night", "slow motion waves crashing on rocks")


def save_model(path: Path, dims: dict, vae_dims: dict, device: str, dtype: torch.dtype) -> Path:
    """A diffusers directory: real-size DiT and VAE, the tiny preset's text encoders and tokenizers."""
    from diffusers import Kandinsky5T2VPipeline

    from pipelines.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline()
    width = tiny.text_encoder.config.text_config.hidden_size
    transformer = build_transformer(dict(dims, in_text_dim=width, in_text_dim2=tiny.text_encoder_2.config.hidden_size),
                                    device, dtype)
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer, vae=build_vae(vae_dims, device, dtype), text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer, text_encoder_2=tiny.text_encoder_2, tokenizer_2=tiny.tokenizer_2,
        scheduler=tiny.scheduler)
    pipe.to("cpu").save_pretrained(path, safe_serialization=True)
    del pipe, transformer
    if is_cuda(device):
        torch.cuda.empty_cache()
    return path


class Intervals:
    """(start, end) host times of every call of a wrapped function, thread-safe."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.spans.append((started, time.perf_counter()))
        return timed


def union_seconds(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def profiled_spans(prof) -> tuple[list[tuple[float, float]], list[tuple[float, float, str]]]:
    """(GPU kernel and copy spans, host op spans with names), in seconds on the profiler's one clock."""
    from torch.autograd import DeviceType

    try:
        events = [(e.device_type(), e.start_ns() / 1e9, (e.start_ns() + e.duration_ns()) / 1e9, e.name())
                  for e in prof.profiler.kineto_results.events()]
    except AttributeError:  # another torch's private API: the public, slower one
        events = [(e.device_type, e.time_range.start / 1e6, e.time_range.end / 1e6, e.name) for e in prof.events()]
    gpu = [(start, end) for kind, start, end, _ in events if kind == DeviceType.CUDA]
    host = [(start, end, name) for kind, start, end, name in events if kind == DeviceType.CPU]
    return gpu, host


def idle_gaps(spans: list[tuple[float, float]], host: list[tuple[float, float, str]], top: int = 8) -> dict:
    """Where the device idled: total idle split by gap length, and the longest gaps with the host ops inside."""
    from collections import Counter

    gaps, end = [], None
    for start, stop in sorted(spans):
        if end is not None and start > end:
            gaps.append((start - end, end, start))
        end = stop if end is None else max(end, stop)
    gaps.sort(reverse=True)
    longest = []
    for seconds, a, b in gaps[:top]:
        ops = Counter(name for start, stop, name in host if start < b and stop > a)
        longest.append({"ms": seconds * 1000, "host_ops": ops.most_common(6)})
    return {"idle_s": sum(g[0] for g in gaps), "idle_in_gaps_under_1ms_s": sum(g[0] for g in gaps if g[0] < 1e-3),
            "gaps": len(gaps), "longest": longest}


class NvmlSampler:
    """GPU utilization (% of time a kernel ran, per NVML's own sample period), sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.samples: list[tuple[float, int]] = []
        self.interval, self._stop = interval, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML: no samples
            self._nvml = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self._nvml:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._nvml:
            self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            rate = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            self.samples.append((time.perf_counter(), rate))
            self._stop.wait(self.interval)

    def mean(self, start: float, end: float) -> float | None:
        inside = [rate for t, rate in self.samples if start <= t <= end]
        return statistics.mean(inside) / 100 if inside else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="lite")
    parser.add_argument("--clip", choices=sorted(CLIPS), default="5s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per row (reduced: the point is the gaps)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_overlap.json)")
    args = parser.parse_args()

    import kandinsky_batch.fleet.worker as worker_module
    from kandinsky_batch.intake.rows import Task
    from kandinsky_batch.fleet.worker import RenderWorker, WorkerSpec

    # 1. A real-size model on disk, loaded by the render actor class through from_pretrained.
    dims, vae_dims = DIMS[args.dims]
    clip, cuda = CLIPS[args.clip], is_cuda(args.device)
    work = Path(tempfile.mkdtemp(prefix="kb-overlap-"))
    started = time.perf_counter()
    model = save_model(work / "model", dims, vae_dims, args.device, torch.bfloat16 if cuda else torch.float32)
    saved_s = time.perf_counter() - started
    spec = WorkerSpec(model_path=str(model), output_uri=(work / "out").as_uri(), format="mp4", fps=24)
    worker = RenderWorker(spec, replica=0)
    renders, encodes = Intervals(), Intervals()
    worker.renderer.render = renders.wrap(worker.renderer.render)
    worker_module.encode = encodes.wrap(worker_module.encode)
    tasks = [Task(id=f"row{i}", row_index=i, prompt=PROMPTS[i % len(PROMPTS)], negative_prompt=None, seed=i,
                  num_inference_steps=args.steps, guidance_scale=5.0, **clip) for i in range(args.rows + 1)]

    # 2. A warm-up row, then the rows two at a time in ticket order, as the actor's concurrency group runs them.
    warm = worker.render([(tasks[0], 1)], 0)[0]
    if warm["status"] != "ok":
        raise RuntimeError(f"warm-up row failed: {warm['error']}")
    renders.spans.clear(), encodes.spans.clear()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with NvmlSampler() as nvml, torch.profiler.profile(activities=activities) as prof:
        with ThreadPoolExecutor(max_workers=RenderWorker.CONCURRENCY) as pool:
            futures = [pool.submit(worker.render, [(task, 1)], ticket) for ticket, task in enumerate(tasks[1:], 1)]
            rows = [row for future in futures for row in future.result()]
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        raise RuntimeError(f"rows failed: {failed}")

    # 3. The window from the first render's start to the last one's end: who was busy in it.
    spans = sorted(renders.spans)
    window = (spans[0][0], spans[-1][1])
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    kernels, host = profiled_spans(prof)
    busy_gpu = None
    if kernels:
        first, last = min(s for s, _ in kernels), max(e for _, e in kernels)
        busy_gpu = union_seconds(kernels) / (last - first)
    # On the CPU (dry run) there are no kernels: the gap analysis runs over the host ops instead.
    idle = idle_gaps(kernels or [(a, b) for a, b, _ in host], host)
    result = {
        "rows": args.rows, "steps": args.steps, **clip, "model_saved_s": saved_s,
        "load_s": worker.renderer.load_seconds, "window_s": window[1] - window[0],
        "render_s": [e - s for s, e in spans], "encode_commit_s": [e - s for s, e in sorted(encodes.spans)],
        "gaps_ms": [g * 1000 for g in gaps], "busy_host": union_seconds(spans) / (window[1] - window[0]),
        "busy_gpu_kernels": busy_gpu, "kernels": len(kernels), "busy_nvml": nvml.mean(*window),
        "idle": idle if kernels else {"dry_run_over_host_ops": idle},
        "bytes": [row["bytes"] for row in rows],
    }
    print(table(["rows", "steps", "window s", "render s (median)", "encode s (median)", "max gap ms",
                 "busy (renders, host)", "busy (GPU kernels)", "busy (NVML)"],
                [[args.rows, args.steps, result["window_s"], statistics.median(result["render_s"]),
                  statistics.median(result["encode_commit_s"]), max(result["gaps_ms"], default=0.0),
                  result["busy_host"], busy_gpu, result["busy_nvml"]]]))
    print(f"idle: {idle['idle_s']:.3f} s in {idle['gaps']} gaps ({idle['idle_in_gaps_under_1ms_s']:.3f} s in gaps "
          f"under 1 ms); longest: {idle['longest'][:3]}" + ("" if kernels else "  (dry run: host ops, not kernels)"))
    path = write_json("gpu_overlap", {"benchmark": "gpu_overlap", "machine": machine(),
                                      "params": {"dims": args.dims, "device": args.device}, "result": result},
                      args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
