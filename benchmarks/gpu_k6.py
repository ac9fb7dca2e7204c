"""GPU part 5: one Kandinsky 6 Lite-size guided step (video and audio together) per backend, and its two decodes.

A random-weight `Kandinsky6Transformer3DModel` of the Lite size in bf16 is driven directly, as
`Kandinsky6TI2VAPipeline` calls it for a text-only row at 5 s 768x512: video latents from the HunyuanVideo VAE's
framing (4x time, 8x space, patch 1x2x2: 121 frames -> 31x64x96x16, 47,616 video tokens, with the pipeline's 16 zero
conditioning channels and zero mask: 33 input channels), audio latents on MMAudio's 44.1 kHz framing (one latent per
1024 samples: 121 frames at 24 fps -> 218 latents of 40 channels), and a text context padded to the pipeline's
`max_sequence_length` of 1024 tokens with the padding masked (300 prompt tokens for the cond call, 30 for the
negative prompt's). A guided step is two transformer calls, cond then uncond, each with its own mask. No Ray, no
checkpoint: the figures are costs, never quality.

Dims, `--dims lite` (3.18 B parameters as diffusers builds them):
- transformer: Kandinsky-6.0-Lite-5s-Diffusers' transformer/config.json (snapshot 6510114a) as written out in
  vllm-project/vllm-omni's test of the published bundles' weight names, and the same numbers in the ComfyUI and
  vLLM-Omni Kandinsky 6 ports' Lite detection tables (time_dim_a 512, out_audio_dim 40; `is_multimodal` is a key
  diffusers does not take). Video 1792 = 28 heads of 64, audio 896 = 14 heads of 64, 32 fused + 2 text blocks per
  modality, the released flags (ca_rope, cross_gates, fix_modulation, text_token_padding, 2 visual token types).
- audio decode: `MMAudioVAE()` and `MMAudioVocoder()` with their class defaults, which are MMAudio's 44.1 kHz VAE
  (`VAE_44k`: 128 mel bins, 40 latent channels, width 512, multipliers 1/2/4, 2 blocks) and NVIDIA's
  bigvgan_v2_44khz_128band_512x (1536 wide, upsampling 8/4/2/2/2/2): 0.31 B and 0.12 B parameters. The checkpoints'
  own audio_vae/ and vocoder/ config.json were not seen; the latent width 40 agrees with the transformer's.
- video decode: `AutoencoderKLHunyuanVideo` class defaults, framewise, as `gpu_step.py` times it.
`--dims tiny`: the `tiny-k6` preset's dims (pipelines/tiny_k6.py), a smoke test of the same code on the CPU.

Per option: seconds per guided step (median), first-step seconds (compile time), peak GPU memory; per video =
steps x step + video decode + audio decode (VAE and vocoder). Options, `--configs` (comma-separated): an attention
backend that takes the prompt's padding mask (native, _native_cudnn, _native_efficient, _native_math,
flash_varlen, ...; those in `pipelines.limits_k6.MASKLESS_BACKENDS` are refused, as the renderer refuses them), or
`best` = the fastest eager one timed before it; `+compile` = `compile_repeated_blocks(fullgraph=True)`.

    python benchmarks/gpu_k6.py --clip 5s                                          # on the GPU, ~2 minutes
    .venv/bin/python benchmarks/gpu_k6.py --dims tiny --device cpu --clip tiny      # smoke test
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time

import torch

from _common import machine, table, write_json
from _gpu import (CLIPS, VAE_LITE, VAE_TINY, error_text, is_cuda, keep_fp32, latent_frames, made_on, peak_gib,
                  reset_peak, sync, timed)
from gpu_step import time_decode
from pipelines import tiny_k6
from pipelines.limits_k6 import FRAME_RATE, K6_MAX_SEQUENCE_LENGTH, MASKLESS_BACKENDS, audio_samples

LITE_K6 = dict(
    in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512, patch_size=(1, 2, 2),
    model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24), visual_cond=True,
    in_audio_dim=40, out_audio_dim=40, model_dim_a=896, time_dim_a=512, ff_dim_a=3584, axes_dims_a=(16, 24, 24),
    audio_freqs_scaling=0.144, scale_factor=(1.0, 2.0, 2.0), text_token_padding=True, ca_rope=True,
    cross_gates=True, fix_modulation=True, visual_token_type_num_embeddings=2,
)
# (transformer, audio VAE, vocoder, video VAE); {} = the class defaults (see the docstring for why they are real).
DIMS = {"lite": (LITE_K6, {}, {}, VAE_LITE),
        "tiny": (tiny_k6.TRANSFORMER, tiny_k6.AUDIO_VAE, tiny_k6.VOCODER, VAE_TINY)}
PROMPT_TOKENS, NEGATIVE_TOKENS = 300, 30  # unmasked tokens of the 1024; the rest is padding
GUIDANCE_SCALE = 5.0
DEFAULT_CONFIGS = "native,_native_cudnn,best+compile"
EAGER_BACKENDS = {"native", "_native_cudnn", "_native_efficient", "_native_math", "flash_varlen", "_flash_varlen_3",
                  "sage_varlen"}
MODIFIERS = {"compile"}


def build(cls, dims: dict, device: str, dtype: torch.dtype):
    """A random-weight diffusers model made on the device, fp32 where `from_pretrained` would keep it."""
    torch.manual_seed(0)
    with made_on(device, dtype):
        model = cls(**dims)
    keep_fp32(model)
    return model.eval()


def audio_latents(clip: dict, audio_vae_dims: dict) -> int:
    """Audio latents of a clip, as the pipeline sizes them: the video's seconds in whole latents."""
    from diffusers import MMAudioVAE

    config = {name: p.default for name, p in inspect.signature(MMAudioVAE.__init__).parameters.items()}
    config.update(audio_vae_dims)
    hop = 2 * config["hop_length"]  # MMAudioVAE.latent_hop_length: its encoder halves the mel frames once
    return audio_samples(clip["num_frames"], config["sample_rate"], hop, FRAME_RATE) // hop


def step_inputs(dims: dict, clip: dict, num_audio: int, device: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """The cond and uncond keyword arguments of one guided step, as the pipeline builds them for a text-only row."""
    frames, h, w = latent_frames(clip), clip["height"] // 8, clip["width"] // 8
    g = torch.Generator("cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    latents = rand(1, frames, h, w, dims["in_visual_dim"])
    if dims["visual_cond"]:  # [latent | conditioning latent (always zero) | mask (zero without an image)]
        latents = torch.cat([latents, torch.zeros_like(latents), torch.zeros_like(latents[..., :1])], dim=-1)
    common = dict(hidden_states=latents, audio_hidden_states=rand(1, num_audio, dims["in_audio_dim"]),
                  timestep=torch.full((1,), 999.0, device=device), return_dict=False)  # float32, as the scheduler's

    def text(tokens: int) -> dict:
        mask = torch.arange(K6_MAX_SEQUENCE_LENGTH, device=device)[None] < tokens
        return dict(encoder_hidden_states=rand(1, K6_MAX_SEQUENCE_LENGTH, dims["in_text_dim"]),
                    pooled_projections=rand(1, dims["in_text_dim2"]), encoder_attention_mask=mask)

    return {**common, **text(PROMPT_TOKENS)}, {**common, **text(NEGATIVE_TOKENS)}


def time_audio_decode(vae_dims: dict, vocoder_dims: dict, clip: dict, device: str, dtype: torch.dtype) -> list[dict]:
    """Seconds of the MMAudioVAE decode and of the vocoder for the clip's audio latents, and their joint peak."""
    from diffusers import MMAudioVAE, MMAudioVocoder

    reset_peak(device)
    vae, vocoder = build(MMAudioVAE, vae_dims, device, dtype), build(MMAudioVocoder, vocoder_dims, device, dtype)
    num_audio = audio_latents(clip, vae_dims)
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, vae.config.latent_channels, num_audio, generator=g).to(device, dtype)
    try:
        with torch.inference_mode():
            vocoder(vae.decode(latents[..., :8] / vae.config.scaling_factor).sample)  # kernels chosen
            sync(device)
            started = time.perf_counter()
            mel = vae.decode(latents / vae.config.scaling_factor).sample
            sync(device)
            decoded = time.perf_counter()
            samples = vocoder(mel).sample.shape[-1]
            sync(device)
            done = time.perf_counter()
        expected = audio_samples(clip["num_frames"], vae.config.sample_rate, vae.latent_hop_length, FRAME_RATE)
        if samples != expected:
            raise RuntimeError(f"vocoder gave {samples} samples, expected {expected}")
        peak = peak_gib(device)
        return [{"decode": "audio VAE (MMAudioVAE)", "seconds": decoded - started, "peak_gib": peak},
                {"decode": "vocoder (MMAudioVocoder)", "seconds": done - decoded, "peak_gib": peak,
                 "samples": samples}]
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported, the other figures still come
        return [{"decode": "audio VAE + vocoder", "error": error_text(exc)}]
    finally:
        del vae, vocoder
        gc.collect()
        reset_peak(device)


def run_config(name: str, dims: dict, clip: dict, num_audio: int, device: str, dtype: torch.dtype, warmup: int,
               repeats: int) -> dict:
    """Build a fresh DiT (compiled regions never leak into the next option) and time one guided step."""
    from diffusers import Kandinsky6Transformer3DModel

    backend, *mods = name.split("+")
    reset_peak(device)
    model = build(Kandinsky6Transformer3DModel, dims, device, dtype)
    try:
        try:
            model.set_attention_backend(backend)
        except Exception as exc:  # noqa: BLE001 - a backend whose package or hardware is missing
            return {"config": name, "error": f"unavailable: {error_text(exc)}"}
        if "compile" in mods:
            model.compile_repeated_blocks(fullgraph=True)
        cond_args, uncond_args = step_inputs(dims, clip, num_audio, device, dtype)
        outputs = []

        def step():
            with torch.inference_mode():
                cond, uncond = model(**cond_args), model(**uncond_args)
                outputs[:] = [u + GUIDANCE_SCALE * (c - u) for c, u in zip(cond, uncond)]

        first, seconds = timed(step, device, warmup + (1 if "compile" in mods else 0), repeats)
        result = {"config": name, "step_s": seconds, "first_step_s": first, "peak_gib": peak_gib(device)}
        if not all(torch.isfinite(o).all() for o in outputs):  # random bf16 weights: timed all the same
            result["note"] = "non-finite output"
        return result
    except Exception as exc:  # noqa: BLE001 - one option failing must not lose the others' figures
        return {"config": name, "error": error_text(exc)}
    finally:
        model = None  # freed before the next option is built
        gc.collect()
        reset_peak(device)


def check_configs(configs: list[str]) -> None:
    """ValueError for an option this model cannot run as the renderer would (naming the option and the rule)."""
    for name in configs:
        backend, *mods = name.split("+")
        if unknown := set(mods) - MODIFIERS:
            raise ValueError(f"--configs: {name!r} has unknown modifiers {sorted(unknown)} "
                             f"(allowed: {sorted(MODIFIERS)})")
        if backend in MASKLESS_BACKENDS:
            raise ValueError(f"--configs: {name!r}: backend {backend!r} cannot apply the prompt's padding mask "
                             "(pipelines.limits_k6.MASKLESS_BACKENDS; use native or a varlen one)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", choices=sorted(DIMS), default="lite", help="lite: real size; tiny: smoke test")
    parser.add_argument("--clip", choices=sorted(CLIPS), default="5s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"options to time (default: {DEFAULT_CONFIGS})")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per video")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per option (+1 when compiled)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per option (median)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_k6.json)")
    args = parser.parse_args()
    configs = [n.strip() for n in args.configs.split(",") if n.strip()]
    check_configs(configs)

    # 1. The clip in latents: video tokens after the patch, audio latents on the audio VAE's framing.
    dims, audio_vae_dims, vocoder_dims, vae_dims = DIMS[args.dims]
    clip, device = CLIPS[args.clip], args.device
    dtype = torch.bfloat16 if is_cuda(device) else torch.float32
    num_audio = audio_latents(clip, audio_vae_dims)
    video_tokens = latent_frames(clip) * (clip["height"] // 16) * (clip["width"] // 16)
    print(f"{args.dims} dims, {args.clip} clip on {device} ({dtype}): {video_tokens} video tokens, {num_audio} audio "
          f"latents, {K6_MAX_SEQUENCE_LENGTH} text tokens ({PROMPT_TOKENS} / {NEGATIVE_TOKENS} unmasked)",
          file=sys.stderr, flush=True)

    # 2. Decodes: the video VAE framewise (the pipeline's default), then the audio VAE and the vocoder.
    decodes = [time_decode(vae_dims, clip, device, dtype, tiled=False)]
    decodes[0]["decode"] = "video VAE (framewise)"
    decodes += time_audio_decode(audio_vae_dims, vocoder_dims, clip, device, dtype)
    print(f"decode: {decodes}", file=sys.stderr, flush=True)
    decode_s = sum(d["seconds"] for d in decodes) if all("seconds" in d for d in decodes) else None

    # 3. One guided step per option; `best` is the fastest eager backend so far.
    results = []
    for name in configs:
        if name.split("+")[0] == "best":
            eager = [r for r in results if "step_s" in r and r["config"] in EAGER_BACKENDS]
            name = name.replace("best", min(eager, key=lambda r: r["step_s"])["config"] if eager else "native", 1)
        result = run_config(name, dims, clip, num_audio, device, dtype, args.warmup, args.repeats)
        if "step_s" in result and decode_s is not None:
            result["per_video_s"] = args.steps * result["step_s"] + decode_s
        results.append(result)
        print(f"{name}: {result}", file=sys.stderr, flush=True)
        sync(device)

    print(table(["option", "s/step (cond+uncond)", "first step s", f"s/video ({args.steps} steps + decodes)",
                 "peak GiB", "note"],
                [[r["config"], r.get("step_s"), r.get("first_step_s"), r.get("per_video_s"), r.get("peak_gib"),
                  r.get("error") or r.get("note")] for r in results]))
    print(table(["decode", "s", "peak GiB", "note"],
                [[d["decode"], d.get("seconds"), d.get("peak_gib"), d.get("error")] for d in decodes]))
    if args.dims != "lite":
        print("(tiny dims: a smoke test, not a measurement)")
    path = write_json("gpu_k6", {
        "benchmark": "gpu_k6", "machine": machine(),
        "params": {"dims": args.dims, "clip": args.clip, "device": device, "dtype": str(dtype), "steps": args.steps,
                   **clip, "frame_rate": FRAME_RATE, "video_tokens": video_tokens, "audio_latents": num_audio,
                   "text_tokens": K6_MAX_SEQUENCE_LENGTH, "prompt_tokens": PROMPT_TOKENS,
                   "negative_tokens": NEGATIVE_TOKENS, "guidance_scale": GUIDANCE_SCALE, "transformer": dims,
                   "audio_vae": audio_vae_dims or "MMAudioVAE defaults", "vocoder": vocoder_dims or
                   "MMAudioVocoder defaults", "vae": vae_dims or "HunyuanVideo defaults"},
        "decode_s": decode_s, "decodes": decodes, "results": results,
    }, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
