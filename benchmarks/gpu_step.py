"""GPU part 2: one Lite-size Kandinsky 5 DiT step and the VAE decode, per option, against 139 s and the FLOP floor.

A random-weight `Kandinsky5Transformer3DModel` with the T2V Lite dims in bf16 and an `AutoencoderKLHunyuanVideo`
with the HunyuanVideo config are driven directly: random latents for the clip (5 s 768x512: 31x64x96x16 ->
47,616 visual tokens; 10 s: 93,696), a 300-token Qwen-size text context and a CLIP-size pooled vector stand in
for the text encoders, which run once per video. No Ray, no checkpoint.

Per option: seconds per denoising step with CFG (two forwards, as the pipeline runs them, or one batch-2
forward), first-step seconds (compile time), peak GPU memory, and per video = steps x step + decode (the
pipeline's framewise decode). The floor is the DiT's FLOPs (counted from the dims) x forwards / this device's
measured bf16 matmul rate.

Options, `--configs` (comma-separated; `+` joins modifiers): an attention backend for `set_attention_backend`
(native, _native_flash, _native_cudnn, flash, sage, flex; a missing package is reported unavailable), or
`best` = the fastest eager backend timed before it in the same run; `+compile` (regional
`compile_repeated_blocks(fullgraph=True)`), `+batched` (cond and uncond in one batch-2 forward), `+nabla`
(NABLA with the 10 s checkpoints' P/STA window and the pipeline's own sparse params; needs `flex`).

    python benchmarks/gpu_step.py --clip 5s                        # on the GPU
    .venv/bin/python benchmarks/gpu_step.py --dims tiny --device cpu --clip tiny   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from _common import machine, table, write_json
from _gpu import (CLIPS, LITE, PUBLISHED_SECONDS, TEXT_TOKENS, TINY, VAE_LITE, VAE_TINY, build_transformer,
                  build_vae, error_text, forward_flops, is_cuda, latent_frames, matmul_peak_tflops, peak_gib,
                  reset_peak, sync, timed, transformer_inputs, visual_tokens)

DIMS = {"lite": (LITE, VAE_LITE), "tiny": (TINY, VAE_TINY)}
DEFAULT_CONFIGS = "native,_native_flash,_native_cudnn,flash,sage,native+batched,best+compile+batched"
EAGER_BACKENDS = {"native", "_native_flash", "_native_cudnn", "_native_efficient", "flash", "sage"}
MODIFIERS = {"compile", "batched", "nabla"}


def sparse_params(model, latents, device: str) -> dict:
    """NABLA's per-call parameters, built by the pipeline's own method from the model's config."""
    from diffusers import Kandinsky5T2VPipeline

    holder = Kandinsky5T2VPipeline.__new__(Kandinsky5T2VPipeline)
    holder.__dict__["transformer"] = model  # get_sparse_params reads only the transformer's config
    return Kandinsky5T2VPipeline.get_sparse_params(holder, latents, device)


def time_decode(vae_dims: dict, clip: dict, device: str, dtype: torch.dtype, tiled: bool) -> dict:
    """Seconds and peak memory of one VAE decode of the whole clip's latents (after a short warm-up decode)."""
    reset_peak(device)
    vae = build_vae(vae_dims, device, dtype)
    if tiled:
        vae.enable_tiling()
    g = torch.Generator("cpu").manual_seed(0)
    shape = (1, 16, latent_frames(clip), clip["height"] // 8, clip["width"] // 8)
    latents = torch.randn(*shape, generator=g).to(device, dtype)
    try:
        with torch.inference_mode():
            vae.decode(latents[:, :, :2] / vae.config.scaling_factor)  # kernels chosen, workspaces allocated
            sync(device)
            started = time.perf_counter()
            frames = vae.decode(latents / vae.config.scaling_factor).sample.shape[2]
            sync(device)
            seconds = time.perf_counter() - started
        if frames != clip["num_frames"]:
            raise RuntimeError(f"VAE decoded {frames} frames, expected {clip['num_frames']}")
        return {"decode": "tiled" if tiled else "framewise", "seconds": seconds, "peak_gib": peak_gib(device)}
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported, the other figures still come
        return {"decode": "tiled" if tiled else "framewise", "error": error_text(exc)}
    finally:
        del vae
        gc.collect()
        reset_peak(device)


def run_config(name: str, dims: dict, clip: dict, text_tokens: int, device: str, dtype: torch.dtype,
               warmup: int, repeats: int) -> dict:
    """Build a fresh DiT (compiled regions never leak into the next option) and time one CFG step."""
    backend, *mods = name.split("+")
    unknown = set(mods) - MODIFIERS
    if unknown:
        raise ValueError(f"--configs: {name!r} has unknown modifiers {sorted(unknown)} (allowed: {sorted(MODIFIERS)})")
    batched = "batched" in mods
    reset_peak(device)
    model = build_transformer(dims, device, dtype)
    if "nabla" in mods:
        from pipelines.nabla import set_attention_type

        set_attention_type(model, "nabla")
    try:
        try:
            model.set_attention_backend(backend)
        except Exception as exc:  # noqa: BLE001 - a backend whose package or hardware is missing
            return {"config": name, "error": f"unavailable: {error_text(exc)}"}
        if "compile" in mods:
            model.compile_repeated_blocks(fullgraph=True)
        args = transformer_inputs(dims, clip, text_tokens, device, dtype, batch=2 if batched else 1)
        if "nabla" in mods:
            args["sparse_params"] = sparse_params(model, args["hidden_states"], device)

        outputs = []

        def step():
            with torch.inference_mode():
                if batched:
                    cond, uncond = model(**args).chunk(2)
                else:
                    cond, uncond = model(**args), model(**args)
                outputs[:] = [uncond + 5.0 * (cond - uncond)]

        first, seconds = timed(step, device, warmup + (1 if "compile" in mods else 0), repeats)
        if not torch.isfinite(outputs[0]).all():
            return {"config": name, "error": "non-finite output"}
        return {"config": name, "step_s": seconds, "first_step_s": first, "peak_gib": peak_gib(device)}
    except Exception as exc:  # noqa: BLE001 - one option failing must not lose the others' figures
        return {"config": name, "error": error_text(exc)}
    finally:
        model = None  # noqa: F841 - freed before the next option is built
        gc.collect()
        reset_peak(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="lite", help="lite: real size; tiny: smoke test")
    parser.add_argument("--clip", choices=sorted(CLIPS), default="5s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"options to time (default: {DEFAULT_CONFIGS})")
    parser.add_argument("--decode", default="framewise,tiled", help="VAE decodes to time ('' for none)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per video")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per option (+1 when compiled)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per option (median)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_step.json)")
    args = parser.parse_args()

    # 1. The clip, its FLOPs and this device's matmul rate: the floor.
    dims, vae_dims = DIMS[args.dims]
    clip, text_tokens = CLIPS[args.clip], TEXT_TOKENS[args.dims]
    cuda = is_cuda(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = visual_tokens(clip)
    flops = forward_flops(dims, tokens, text_tokens)
    peak = matmul_peak_tflops(args.device, dtype, size=8192 if cuda else 1024, repeats=20 if cuda else 3)
    floor = 2 * args.steps * flops / (peak * 1e12)
    print(f"{args.dims} dims, {args.clip} clip on {args.device} ({dtype}): {tokens} visual tokens, {flops:.3g} FLOP "
          f"per forward, matmul {peak:.1f} TFLOP/s, DiT floor {floor:.1f} s per video", file=sys.stderr, flush=True)

    # 2. VAE decodes: framewise (the pipeline's default) and tiled.
    decodes = [time_decode(vae_dims, clip, args.device, dtype, tiled=kind == "tiled")
               for kind in filter(None, args.decode.split(","))]
    print(f"decode: {decodes}", file=sys.stderr, flush=True)
    decode = next((d["seconds"] for d in decodes if "seconds" in d and d["decode"] == "framewise"), None)

    # 3. One CFG step per option; `best` is the fastest eager backend so far.
    results = []
    for name in (n.strip() for n in args.configs.split(",") if n.strip()):
        if name.split("+")[0] == "best":
            eager = [r for r in results if "step_s" in r and r["config"] in EAGER_BACKENDS]
            fastest = min(eager, key=lambda r: r["step_s"])["config"] if eager else "native"
            name = name.replace("best", fastest, 1)
        result = run_config(name, dims, clip, text_tokens, args.device, dtype, args.warmup, args.repeats)
        if "step_s" in result:
            result["tflops"] = 2 * flops / result["step_s"] / 1e12
            if decode is not None:
                result["per_video_s"] = args.steps * result["step_s"] + decode
                result["vs_published"] = result["per_video_s"] / PUBLISHED_SECONDS
                result["vs_floor"] = result["per_video_s"] / floor
        results.append(result)
        print(f"{name}: {result}", file=sys.stderr, flush=True)
        sync(args.device)

    print(table(["option", "s/step (CFG)", "first step s", "TFLOP/s", "s/video", "vs 139 s", "vs floor", "peak GiB",
                 "note"],
                [[r["config"], r.get("step_s"), r.get("first_step_s"), r.get("tflops"), r.get("per_video_s"),
                  r.get("vs_published"), r.get("vs_floor"), r.get("peak_gib"), r.get("error")] for r in results]))
    if decodes:
        print(table(["VAE decode", "s", "peak GiB", "note"],
                    [[d["decode"], d.get("seconds"), d.get("peak_gib"), d.get("error")] for d in decodes]))
    print(f"floor: {2 * args.steps} forwards x {flops:.3g} FLOP / {peak:.3g} TFLOP/s = {floor:.3g} s"
          + ("" if args.dims == "lite" else "  (tiny dims: a smoke test, not a measurement)"))
    path = write_json("gpu_step", {
        "benchmark": "gpu_step", "machine": machine(),
        "params": {"dims": args.dims, "clip": args.clip, "device": args.device, "dtype": str(dtype),
                   "steps": args.steps, **clip, "text_tokens": text_tokens, "visual_tokens": tokens,
                   "transformer": dims, "vae": vae_dims or "HunyuanVideo defaults"},
        "flops_per_forward": flops, "matmul_peak_tflops": peak, "floor_s": floor, "published_s": PUBLISHED_SECONDS,
        "vae_decode_s": decode, "decodes": decodes, "results": results,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
