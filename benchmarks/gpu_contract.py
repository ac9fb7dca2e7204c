"""GPU part 1: the seed contract on CUDA. What `pipelines/` renders equals plain diffusers for the same seed?

The tiny preset (`model.path=tiny`, random weights: its frames are noise) is loaded twice on the device, once
as plain `Kandinsky5T2VPipeline.from_pretrained` (the oracle: the pipeline called with the prompt and a CPU
generator seeded with the row's seed) and once through `pipelines.Renderer` (the product's path: prompts
encoded once and passed back as embeddings). For fp32 and bf16, per check: the largest difference in uint8
levels and the fraction of pixels that differ at all.

Checks: one row; the same row rendered twice (run-to-run determinism); two rows in one batched call
(`render.batch_size=2`) against two plain single calls; batched guidance (cond and uncond in one forward).

    python benchmarks/gpu_contract.py                                # on the GPU
    .venv/bin/python benchmarks/gpu_contract.py --device cpu         # smoke test
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from _common import machine, table, write_json
from _gpu import error_text

from pipelines import RenderOptions, RenderRequest, resolve_model, to_uint8
from pipelines.render import Renderer

PROMPTS = ("a cat dancing in the rain", "a dog running on the beach")
SHAPE = dict(height=128, width=128, num_frames=17, num_inference_steps=4, guidance_scale=5.0)


def request(prompt: str, seed: int) -> RenderRequest:
    return RenderRequest(prompt=prompt, negative_prompt=None, seed=seed, **SHAPE)


def plain(pipe, req: RenderRequest) -> np.ndarray:
    """The oracle: plain diffusers with the request's values and a CPU generator seeded with its seed."""
    out = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, height=req.height, width=req.width,
               num_frames=req.num_frames, num_inference_steps=req.num_inference_steps,
               guidance_scale=req.guidance_scale, generator=torch.Generator("cpu").manual_seed(req.seed),
               output_type="np").frames
    return to_uint8(out[0])


def compare(check: str, dtype: str, got: np.ndarray, want: np.ndarray) -> dict:
    """Largest uint8 difference and the fraction of values that differ."""
    if got.shape != want.shape:
        return {"check": check, "dtype": dtype, "error": f"shape {got.shape} != {want.shape}"}
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return {"check": check, "dtype": dtype, "exact": bool(diff.max() == 0), "max_levels": int(diff.max()),
            "fraction_differing": float((diff > 0).mean()), "values": int(diff.size)}


def run_dtype(device: str, dtype: torch.dtype, nabla: bool) -> list[dict]:
    from diffusers import Kandinsky5T2VPipeline

    name = str(dtype).removeprefix("torch.")
    path = resolve_model("tiny")
    pipe = Kandinsky5T2VPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    a, b = request(PROMPTS[0], 11), request(PROMPTS[1], 12)
    want_a, want_b = plain(pipe, a), plain(pipe, b)
    results = []

    ours = Renderer("tiny", device=device, dtype=dtype)
    got = ours.render(a)
    results.append(compare("one row", name, got, want_a))
    results.append(compare("same row twice", name, ours.render(a), got))
    lengths = [ours.encode(r.prompt)[0].shape[0] for r in (a, b)]
    if lengths[0] == lengths[1]:
        batch = ours.render_batch([a, b])
        results.append(compare("batch of 2, row 1", name, batch[0], want_a))
        results.append(compare("batch of 2, row 2", name, batch[1], want_b))
    else:
        results.append({"check": "batch of 2", "dtype": name, "error": f"prompt token lengths differ: {lengths}"})
    del ours

    # Cond and uncond batch only when their texts are as long: the negative prompt is the other prompt.
    c = RenderRequest(**{**a.__dict__, "negative_prompt": PROMPTS[1]})
    guided = Renderer("tiny", device=device, dtype=dtype, options=RenderOptions(batched_guidance=True))
    guided.apply_options()
    got = guided.render(c)
    row = compare("batched guidance", name, got, plain(pipe, c))
    row["batched_steps"] = guided.steps.batched_steps
    results.append(row)
    del guided

    offloaded = Renderer("tiny", device=device, dtype=dtype, options=RenderOptions(offload_text_encoder=True))
    results.append(compare("offload_text_encoder", name, offloaded.render(a), want_a))
    del offloaded
    if nabla:
        results.append(compare_nabla(pipe, device, dtype, a))
    return results


def compare_nabla(pipe, device: str, dtype: torch.dtype, req: RenderRequest) -> dict:
    """NABLA through `pipelines/` (fused flex, compiled on CUDA) against diffusers' own NABLA + flex processors."""
    from pipelines.nabla import NABLA_DEFAULTS

    pipe.transformer.register_to_config(attention_type="nabla",
                                        **{f"attention_{k}": v for k, v in NABLA_DEFAULTS.items()})
    pipe.transformer.attention_type = "nabla"
    pipe.transformer.set_attention_backend("flex")
    want = plain(pipe, req)
    ours = Renderer("tiny", device=device, dtype=dtype,
                    options=RenderOptions(attention_type="nabla", attention_backend="flex"))
    ours.apply_options()
    return compare("NABLA (flex)", str(dtype).removeprefix("torch."), ours.render(req), want)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--nabla", default="bfloat16", help="dtypes to check NABLA in")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_contract.json)")
    args = parser.parse_args()

    results = []
    for name in args.dtypes.split(","):
        try:
            results += run_dtype(args.device, getattr(torch, name), nabla=name in args.nabla.split(","))
        except Exception as exc:  # noqa: BLE001 - report it; the other dtype still runs
            results.append({"check": "all", "dtype": name, "error": error_text(exc)})
        print(results[-1], file=sys.stderr, flush=True)
    print(table(["check", "dtype", "exact", "max uint8 levels", "fraction of values differing", "note"],
                [[r["check"], r["dtype"], r.get("exact"), r.get("max_levels"), r.get("fraction_differing"),
                  r.get("error")] for r in results]))
    path = write_json("gpu_contract", {"benchmark": "gpu_contract", "machine": machine(),
                                       "params": {"device": args.device, **SHAPE, "prompts": PROMPTS},
                                       "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
