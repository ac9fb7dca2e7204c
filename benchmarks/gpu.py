"""Benchmark 3, GPU: one Lite-size Kandinsky 5 DiT step and VAE decode, per option, against 139 s and the FLOP floor.

A random-weight `Kandinsky5Transformer3DModel` with the T2V Lite dims (`../shared/FACTS.md`) in bf16 and an
`AutoencoderKLHunyuanVideo` with the HunyuanVideo VAE config (the class defaults) are driven directly: random
latents for 5 s 768x512 (31x64x96x16 -> 47,616 visual tokens), a 300-token Qwen-size text context and a CLIP-size
pooled vector stand in for the text encoders, which only run once per video. No Ray, no checkpoint.

Per option: seconds per denoising step with CFG (two forwards, as the pipeline does, or one batch-2 forward),
VAE decode seconds for the whole video (the pipeline's default framewise decode), and per video =
steps x step + decode. The floor is the DiT's FLOPs (counted from the dims) x forwards / the device's bf16
matmul peak (measured here on CUDA; 798 TFLOP/s was measured on an H100). Published: 139 s (Lite sft 5 s,
one H100, PyTorch 2.8, FlashAttention 3).

Options, `--configs` (comma-separated; `+` joins modifiers): an attention backend for
`set_attention_backend` (native, _native_flash, _native_cudnn, _native_efficient, flash, sage; one whose package
is missing is reported unavailable), `+compile` (regional `compile_repeated_blocks(fullgraph=True)`),
`+batched` (cond and uncond in one batch-2 forward; equal text lengths here, a real pipeline would pad),
`+nabla` (NABLA sparse attention with the 10 s checkpoints' P/STA window, the pipeline's own sparse params;
forces the flex backend, so name it as `flex+nabla` or `flex+nabla+compile`). Step caches (MagCache,
FirstBlockCache) skip whole steps: their per-video cost is computed steps x step, and on random weights
the skip count means nothing, so they are left to a run with real checkpoints.

Run on a GPU: python benchmarks/gpu.py
Smoke test on CPU: .venv/bin/python benchmarks/gpu.py --dims tiny --device cpu
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

from pathlib import Path

import torch

from _common import machine, table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipelines` on a GPU box with no install

LITE = dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512,
            patch_size=(1, 2, 2), model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
            axes_dims=(16, 24, 24), visual_cond=False, attention_type="regular")
TINY = dict(LITE, in_text_dim=32, in_text_dim2=32, time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1,
            num_visual_blocks=2, axes_dims=(4, 6, 6))
# HunyuanVideo's VAE is the class defaults (block_out_channels 128/256/512/512, 2 layers per block, 32 groups).
VAE_LITE: dict = {}
VAE_TINY = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
DIMS = {"lite": (LITE, VAE_LITE, dict(num_frames=121, height=512, width=768, text_tokens=300)),
        "tiny": (TINY, VAE_TINY, dict(num_frames=17, height=128, width=128, text_tokens=16))}
DEFAULT_CONFIGS = ("native,_native_flash,_native_cudnn,flash,sage,native+batched,native+compile,"
                   "_native_cudnn+compile+batched,flex+nabla,flex+nabla+compile")
PUBLISHED_SECONDS = 139.0
H100_PEAK_TFLOPS = 798.0


def forward_flops(dims: dict, visual_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one DiT forward (linears and attention; norms, RoPE and modulation are negligible)."""
    d, ff, n, t = dims["model_dim"], dims["ff_dim"], visual_tokens, text_tokens
    text_block = t * (8 * d * d + 4 * d * ff) + 4 * t * t * d
    # Visual block: self-attention qkv+out, cross-attention q+out (k, v on the text), feed-forward, both attentions.
    visual_block = n * (12 * d * d + 4 * d * ff) + t * 4 * d * d + 4 * n * n * d + 4 * n * t * d
    return dims["num_text_blocks"] * text_block + dims["num_visual_blocks"] * visual_block


def matmul_peak_tflops(device: str, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """Sustained TFLOP/s of a large square matmul on the device: the denominator of the floor."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_transformer(dims: dict, device: str, dtype: torch.dtype):
    """A random-weight DiT made on the device, cast as `from_pretrained` would (some modules kept in fp32)."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = Kandinsky5Transformer3DModel(**dims)
    model.to(dtype=dtype).eval()
    keep = set(model._keep_in_fp32_modules or [])
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    return model


def inputs(dims: dict, video: dict, device: str, dtype: torch.dtype, batch: int) -> dict:
    """Random stand-ins for what the pipeline passes the transformer at one step."""
    frames = (video["num_frames"] - 1) // 4 + 1
    h, w = video["height"] // 8, video["width"] // 8
    g = torch.Generator("cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    pos = [torch.arange(n, device=device) for n in (frames, h // 2, w // 2)]
    # The pipeline's RoPE scale: (1, 2, 2) for sizes between 480 and 854 pixels, else (1, 3.16, 3.16).
    scale = (1, 2, 2) if all(480 <= s <= 854 for s in (video["height"], video["width"])) else (1, 3.16, 3.16)
    return dict(
        hidden_states=rand(batch, frames, h, w, dims["in_visual_dim"]),
        encoder_hidden_states=rand(batch, video["text_tokens"], dims["in_text_dim"]),
        pooled_projections=rand(batch, dims["in_text_dim2"]),
        timestep=torch.full((batch,), 999.0, device=device, dtype=dtype),
        visual_rope_pos=pos, text_rope_pos=torch.arange(video["text_tokens"], device=device),
        scale_factor=scale, return_dict=False,
    )


def sparse_params(model, latents, device: str) -> dict:
    """NABLA's per-call parameters, built by the pipeline's own method from the model's config."""
    from diffusers import Kandinsky5T2VPipeline

    holder = Kandinsky5T2VPipeline.__new__(Kandinsky5T2VPipeline)
    holder.__dict__["transformer"] = model  # get_sparse_params reads only the transformer's config
    return Kandinsky5T2VPipeline.get_sparse_params(holder, latents, device)


def time_steps(model, args: dict, batched: bool, device: str, warmup: int, repeats: int) -> tuple[float, float]:
    """(first step seconds, median step seconds) of a CFG step: two forwards, or one batch-2 forward."""

    def step():
        with torch.inference_mode():
            if batched:
                cond, uncond = model(**args).chunk(2)
            else:
                cond, uncond = model(**args), model(**args)
            return uncond + 5.0 * (cond - uncond)

    times = []
    for _ in range(warmup + repeats):
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[warmup:])


def time_decode(vae_dims: dict, video: dict, device: str, dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of one VAE decode of the whole video's latents (framewise, as the pipeline runs it)."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLHunyuanVideo(**vae_dims)
    vae.to(dtype=dtype).eval()
    frames = (video["num_frames"] - 1) // 4 + 1
    latents = torch.randn(1, 16, frames, video["height"] // 8, video["width"] // 8, device=device, dtype=dtype)
    times = []
    for _ in range(1 + repeats):
        _sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = vae.decode(latents / vae.config.scaling_factor).sample
        _sync(device)
        times.append(time.perf_counter() - started)
    if out.shape[2] != video["num_frames"]:
        raise RuntimeError(f"VAE decoded {out.shape[2]} frames, expected {video['num_frames']}")
    del vae, out
    return statistics.median(times[1:])


def run_config(name: str, dims: dict, video: dict, device: str, dtype: torch.dtype, warmup: int,
               repeats: int) -> dict:
    """Build a fresh DiT (compiled regions never leak into the next option) and time one CFG step."""
    backend, *mods = name.split("+")
    unknown = set(mods) - {"compile", "batched", "nabla"}
    if unknown:
        raise ValueError(f"--configs: {name!r} has unknown modifiers {sorted(unknown)} "
                         "(allowed: compile, batched, nabla)")
    batched = "batched" in mods
    model = build_transformer(dims, device, dtype)
    if "nabla" in mods:
        from pipelines.nabla import set_attention_type

        set_attention_type(model, "nabla")
    try:
        try:
            model.set_attention_backend(backend)
        except Exception as exc:  # noqa: BLE001 - a backend whose package or hardware is missing
            return {"config": name, "error": f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
        if "compile" in mods:
            model.compile_repeated_blocks(fullgraph=True)
        args = inputs(dims, video, device, dtype, batch=2 if batched else 1)
        if "nabla" in mods:
            args["sparse_params"] = sparse_params(model, args["hidden_states"], device)
        first, step = time_steps(model, args, batched, device, warmup + (2 if "compile" in mods else 0), repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        return {"config": name, "step_s": step, "first_step_s": first, "peak_gib": peak}
    except Exception as exc:  # noqa: BLE001 - one option failing must not lose the others' figures
        return {"config": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="lite", help="lite: real size; tiny: smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"options to time (default: {DEFAULT_CONFIGS})")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per video")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per option (+2 when compiled)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per option (median)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu.json)")
    args = parser.parse_args()

    dims, vae_dims, video = DIMS[args.dims]
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    visual_tokens = ((video["num_frames"] - 1) // 4 + 1) * (video["height"] // 16) * (video["width"] // 16)
    flops = forward_flops(dims, visual_tokens, video["text_tokens"])
    peak = matmul_peak_tflops(args.device, dtype, size=8192 if cuda else 1024, repeats=20 if cuda else 3)
    floor = 2 * args.steps * flops / (peak * 1e12)
    print(f"{args.dims} dims on {args.device} ({dtype}): {visual_tokens} visual tokens, {flops:.3g} FLOP per forward,"
          f" matmul peak {peak:.1f} TFLOP/s, DiT floor {floor:.1f} s per video", file=sys.stderr)

    decode = time_decode(vae_dims, video, args.device, dtype, repeats=1)
    print(f"VAE decode: {decode:.3f} s", file=sys.stderr)
    results = []
    for name in args.configs.split(","):
        result = run_config(name.strip(), dims, video, args.device, dtype, args.warmup, args.repeats)
        if "step_s" in result:
            result["per_video_s"] = args.steps * result["step_s"] + decode
            result["tflops"] = 2 * flops / result["step_s"] / 1e12
            result["vs_published"] = result["per_video_s"] / PUBLISHED_SECONDS
            result["vs_floor"] = result["per_video_s"] / floor
        results.append(result)
        print(f"{name}: {result}", file=sys.stderr)

    print(table(["option", "s/step (CFG)", "first step s", "TFLOP/s", "VAE decode s", "s/video",
                 "vs 139 s", "vs floor", "peak GiB", "note"],
                [[r["config"], r.get("step_s"), r.get("first_step_s"), r.get("tflops"),
                  decode if "step_s" in r else None, r.get("per_video_s"), r.get("vs_published"), r.get("vs_floor"),
                  r.get("peak_gib"), r.get("error")]
                 for r in results]))
    print(f"floor: {2 * args.steps} forwards x {flops:.3g} FLOP / {peak:.3g} TFLOP/s = {floor:.3g} s"
          + ("" if args.dims == "lite" else "  (tiny dims: a smoke test, not a measurement)"))
    path = write_json("gpu", {
        "benchmark": "gpu", "machine": machine(),
        "params": {"dims": args.dims, "device": args.device, "dtype": str(dtype), "steps": args.steps, **video,
                   "visual_tokens": visual_tokens, "transformer": dims, "vae": vae_dims or "HunyuanVideo defaults"},
        "flops_per_forward": flops, "matmul_peak_tflops": peak, "floor_s": floor,
        "published_s": PUBLISHED_SECONDS, "vae_decode_s": decode, "results": results,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
