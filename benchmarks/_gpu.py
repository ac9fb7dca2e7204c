"""What the GPU benchmarks share: Kandinsky 5 dims, random-weight components built on the device, timing.

Dims are the T2V Lite and Pro transformer configs (`../shared/FACTS.md`), the HunyuanVideo VAE (the class
defaults), a Qwen2.5-VL 7B and a CLIP ViT-L/14 text encoder: the shapes, not the weights (nothing can be
downloaded on the GPU machine), so every figure is a cost, never a quality.
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pipelines` on a GPU box with no install

LITE = dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512,
            patch_size=(1, 2, 2), model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
            axes_dims=(16, 24, 24), visual_cond=False, attention_type="regular")
# Pro: 4096 / 16384 / 60+4 blocks / 32 heads of 128 (FACTS.md); time_dim as Kandinsky's released Pro configs.
PRO = dict(LITE, model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48),
           time_dim=1024)
TINY = dict(LITE, in_text_dim=32, in_text_dim2=32, time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1,
            num_visual_blocks=2, axes_dims=(4, 6, 6))
# HunyuanVideo's VAE is the class defaults (block_out_channels 128/256/512/512, 2 layers per block, 32 groups).
VAE_LITE: dict = {}
VAE_TINY = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
# Qwen2.5-VL 7B (the text encoder of every Kandinsky 5 checkpoint) and CLIP ViT-L/14's text tower.
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
               rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"})
QWEN_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, max_position_embeddings=77, projection_dim=768)
QWEN_TINY = dict(QWEN_7B, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=1000,
                 rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"})
QWEN_TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32)
CLIP_TINY = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 projection_dim=32, vocab_size=1000)

# 24 fps; 5 s = 121 frames, 10 s = 241. 768x512 is a Lite size and a multiple of 128 (NABLA's unit).
CLIPS = {"5s": dict(num_frames=121, height=512, width=768), "10s": dict(num_frames=241, height=512, width=768),
         "tiny": dict(num_frames=17, height=128, width=128), "tiny10s": dict(num_frames=33, height=128, width=128)}
TEXT_TOKENS = {"lite": 300, "tiny": 16}
PUBLISHED_SECONDS = 139.0  # Lite sft 5 s, one H100, PyTorch 2.8, FlashAttention 3 (Kandinsky 5 README)


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def sync(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if is_cuda(device) else None


def allocated_gib(device: str) -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if is_cuda(device) else None


@contextmanager
def made_on(device: str, dtype: torch.dtype):
    """Modules built inside are created on `device` directly in `dtype` (no fp32 copy of a 19 B model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def keep_fp32(model) -> None:
    """Cast back the modules a model keeps in fp32, as `from_pretrained` does."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()


def build_transformer(dims: dict, device: str, dtype: torch.dtype):
    """A random-weight Kandinsky 5 DiT made on the device."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    with made_on(device, dtype):
        model = Kandinsky5Transformer3DModel(**dims)
    keep_fp32(model)
    return model.eval()


def build_vae(vae_dims: dict, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    with made_on(device, dtype):
        vae = AutoencoderKLHunyuanVideo(**vae_dims)
    return vae.eval()


def build_text_encoders(size: str, device: str, dtype: torch.dtype):
    """(Qwen2.5-VL, CLIP text) with random weights: `7b` the real sizes, `tiny` a smoke test."""
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision, clip = (QWEN_7B, QWEN_7B_VISION, CLIP_L) if size == "7b" else (QWEN_TINY, QWEN_TINY_VISION, CLIP_TINY)
    torch.manual_seed(0)
    with made_on(device, dtype):
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                   vocab_size=text["vocab_size"]))
        clip_model = CLIPTextModel(CLIPTextConfig(**clip))
    return qwen.eval(), clip_model.eval()


def latent_frames(clip: dict) -> int:
    return (clip["num_frames"] - 1) // 4 + 1


def visual_tokens(clip: dict) -> int:
    """Tokens after the VAE (4x time, 8x space) and the 1x2x2 patch."""
    return latent_frames(clip) * (clip["height"] // 16) * (clip["width"] // 16)


def transformer_inputs(dims: dict, clip: dict, text_tokens: int, device: str, dtype: torch.dtype,
                       batch: int = 1) -> dict:
    """Random stand-ins for what the pipeline passes the transformer at one step."""
    frames, h, w = latent_frames(clip), clip["height"] // 8, clip["width"] // 8
    g = torch.Generator("cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    pos = [torch.arange(n, device=device) for n in (frames, h // 2, w // 2)]
    # The pipeline's RoPE scale: (1, 2, 2) for sizes between 480 and 854 pixels, else (1, 3.16, 3.16).
    scale = (1, 2, 2) if all(480 <= s <= 854 for s in (clip["height"], clip["width"])) else (1, 3.16, 3.16)
    return dict(
        hidden_states=rand(batch, frames, h, w, dims["in_visual_dim"]),
        encoder_hidden_states=rand(batch, text_tokens, dims["in_text_dim"]),
        pooled_projections=rand(batch, dims["in_text_dim2"]),
        timestep=torch.full((batch,), 999.0, device=device, dtype=dtype),
        visual_rope_pos=pos, text_rope_pos=torch.arange(text_tokens, device=device),
        scale_factor=scale, return_dict=False,
    )


def forward_flops(dims: dict, visual_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one DiT forward (linears and attention; norms, RoPE and modulation are negligible)."""
    d, ff, n, t = dims["model_dim"], dims["ff_dim"], visual_tokens, text_tokens
    text_block = t * (8 * d * d + 4 * d * ff) + 4 * t * t * d
    # Visual block: self-attention qkv+out, cross-attention q+out (k, v on the text), feed-forward, both attentions.
    visual_block = n * (12 * d * d + 4 * d * ff) + t * 4 * d * d + 4 * n * n * d + 4 * n * t * d
    return dims["num_text_blocks"] * text_block + dims["num_visual_blocks"] * visual_block


def matmul_peak_tflops(device: str, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """Sustained TFLOP/s of a large square matmul on random data: the denominator of the floor."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def timed(fn, device: str, warmup: int, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of the `repeats` calls after `warmup`)."""
    times = []
    for _ in range(warmup + repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[warmup:])


def error_text(exc: BaseException) -> str:
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message[:300]}"
