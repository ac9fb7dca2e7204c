"""GPU part 3: the memory plan. Peak GPU memory of a whole Lite (and Pro) replica on one GPU, by phase.

Random-weight components of the real sizes, in bf16, on the device: Qwen2.5-VL 7B and CLIP ViT-L text encoders,
the Lite DiT, the HunyuanVideo VAE. Phases as a render runs them: encode (prompt and negative prompt, 128 template
+ 300 prompt tokens each), one CFG step at the clip's size, the VAE decode (framewise, the pipeline's default).
First with the text encoders resident, then with them moved to the CPU (`model.offload_text_encoder`), and the
seconds that move takes each way (paid once per new prompt; a replica caches each prompt's embeddings).
Then a Pro-size DiT (4096 / 16384 / 60+4 blocks) replaces the Lite one: resident size, step peak and seconds.

    python benchmarks/gpu_memory.py --backend _native_cudnn          # on the GPU
    .venv/bin/python benchmarks/gpu_memory.py --dims tiny --device cpu --clip tiny   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from _common import machine, table, write_json
from _gpu import (CLIPS, LITE, PRO, TEXT_TOKENS, TINY, VAE_LITE, VAE_TINY, allocated_gib, build_text_encoders,
                  build_transformer, build_vae, error_text, is_cuda, latent_frames, peak_gib, reset_peak, sync,
                  timed, transformer_inputs)

TEMPLATE_TOKENS = 128  # the pipeline's Qwen template head, encoded with every prompt
SIZES = {"lite": ("7b", LITE, VAE_LITE, PRO), "tiny": ("tiny", TINY, VAE_TINY, dict(TINY, num_visual_blocks=4))}


def gib(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


def encode(qwen, clip_model, text_tokens: int, device: str) -> None:
    """The pipeline's two text-encoder calls for a prompt and its negative prompt (hidden states kept)."""
    g = torch.Generator("cpu").manual_seed(0)
    with torch.inference_mode():
        for _ in range(2):
            ids = torch.randint(0, qwen.config.text_config.vocab_size, (1, TEMPLATE_TOKENS + text_tokens), generator=g)
            qwen(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), return_dict=True,
                 output_hidden_states=True)
            clip_ids = torch.randint(0, clip_model.config.vocab_size, (1, 77), generator=g).to(device)
            clip_model(input_ids=clip_ids)


def cfg_step(model, args: dict) -> None:
    with torch.inference_mode():
        cond, uncond = model(**args), model(**args)
        uncond + 5.0 * (cond - uncond)


def decode(vae, clip: dict, device: str, dtype: torch.dtype) -> None:
    shape = (1, 16, latent_frames(clip), clip["height"] // 8, clip["width"] // 8)
    latents = torch.randn(*shape, generator=torch.Generator("cpu").manual_seed(0)).to(device, dtype)
    with torch.inference_mode():
        vae.decode(latents / vae.config.scaling_factor)


def phase(name: str, fn, device: str, **extra) -> dict:
    """Run one phase; its peak memory (everything resident counted) and seconds."""
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    try:
        fn()
        sync(device)
        return {"phase": name, "seconds": time.perf_counter() - started, "peak_gib": peak_gib(device),
                "resident_gib": allocated_gib(device), **extra}
    except Exception as exc:  # noqa: BLE001 - out of memory is a finding, not a crash
        return {"phase": name, "error": error_text(exc), **extra}


def moved(modules, target: str, device: str) -> float:
    sync(device)
    started = time.perf_counter()
    for module in modules:
        module.to(target)
    sync(device)
    if is_cuda(device):
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", choices=sorted(SIZES), default="lite")
    parser.add_argument("--clip", choices=sorted(CLIPS), default="5s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="native", help="attention backend for the DiT steps")
    parser.add_argument("--parts", default="whole,streamed,pro",
                        help="whole: every phase, encoders resident then moved to the CPU; streamed: encoding with "
                             "the encoders group-offloaded (the product's offload_text_encoder); pro: a Pro-size DiT")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_memory.json)")
    args = parser.parse_args()

    te_size, dit_dims, vae_dims, pro_dims = SIZES[args.dims]
    clip, text_tokens, device = CLIPS[args.clip], TEXT_TOKENS[args.dims], args.device
    dtype = torch.bfloat16 if is_cuda(device) else torch.float32
    results, components = [], {}

    parts = set(args.parts.split(","))
    to_cpu = to_gpu = streamed_setup = None

    # 1. Every component of a replica on the device.
    qwen, clip_model = build_text_encoders(te_size, device, dtype)
    dit = build_transformer(dit_dims, device, dtype)
    dit.set_attention_backend(args.backend)
    vae = build_vae(vae_dims, device, dtype)
    components = {"qwen2.5-vl": gib(qwen), "clip-l": gib(clip_model), "lite_dit": gib(dit), "vae": gib(vae)}
    print(f"components GiB: {components}", file=sys.stderr, flush=True)
    step_args = transformer_inputs(dit_dims, clip, text_tokens, device, dtype)

    # 2. The phases with the text encoders resident, then moved to the CPU whole.
    if "whole" in parts:
        results.append(phase("encode", lambda: encode(qwen, clip_model, text_tokens, device), device, offload=False))
        results.append(phase("CFG step (Lite)", lambda: cfg_step(dit, step_args), device, offload=False))
        results.append(phase("VAE decode", lambda: decode(vae, clip, device, dtype), device, offload=False))
        to_cpu = moved((qwen, clip_model), "cpu", device)
        results.append(phase("CFG step (Lite)", lambda: cfg_step(dit, step_args), device, offload=True))
        results.append(phase("VAE decode", lambda: decode(vae, clip, device, dtype), device, offload=True))
        to_gpu = moved((qwen, clip_model), device, device)
        print(results, file=sys.stderr, flush=True)

    # 3. The product's offload (pipelines.render): group offloading from pinned memory, streamed per encoding.
    if "streamed" in parts and is_cuda(device):
        from diffusers.hooks import apply_group_offloading

        sync(device)
        started = time.perf_counter()
        for module in (qwen, clip_model):
            apply_group_offloading(module, onload_device=torch.device(device), offload_type="leaf_level",
                                   use_stream=True)
        torch.cuda.empty_cache()
        streamed_setup = time.perf_counter() - started
        for name in ("encode (streamed, first)", "encode (streamed)"):
            results.append(phase(name, lambda: encode(qwen, clip_model, text_tokens, device), device, offload=True))
        print(results[-2:], file=sys.stderr, flush=True)

    # 4. A Pro-size DiT in the Lite one's place.
    pro = {}
    if "pro" in parts:
        del dit
        gc.collect()
        reset_peak(device)
        try:
            model = build_transformer(pro_dims, device, dtype)
            model.set_attention_backend(args.backend)
            pro = {"pro_dit_gib": gib(model), "resident_gib": allocated_gib(device)}
            pro_args = transformer_inputs(pro_dims, clip, text_tokens, device, dtype)
            reset_peak(device)
            first, seconds = timed(lambda: cfg_step(model, pro_args), device, 0, 1)
            pro.update(step_s=seconds, step_peak_gib=peak_gib(device))
            del model
        except Exception as exc:  # noqa: BLE001
            pro["error"] = error_text(exc)
        print(f"pro: {pro}", file=sys.stderr, flush=True)

    print(table(["phase", "text encoders", "peak GiB", "resident GiB", "seconds", "note"],
                [[r["phase"], "on CPU" if r["offload"] else "on GPU", r.get("peak_gib"), r.get("resident_gib"),
                  r.get("seconds"), r.get("error")] for r in results]))
    print(f"components GiB: {components}; text encoders to CPU {to_cpu} s, back {to_gpu} s; "
          f"group offloading set up in {streamed_setup} s; Pro: {pro}")
    path = write_json("gpu_memory", {
        "benchmark": "gpu_memory", "machine": machine(),
        "params": {"dims": args.dims, "clip": args.clip, "device": device, "dtype": str(dtype),
                   "backend": args.backend, "text_tokens": text_tokens, **clip},
        "components_gib": components, "offload_to_cpu_s": to_cpu, "offload_to_gpu_s": to_gpu,
        "group_offload_setup_s": streamed_setup,
        "phases": results, "pro": pro,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
