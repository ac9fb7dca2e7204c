"""The bytes of one row's `output.latents` object for a real Kandinsky 5 Lite 5 s 768x512 render.

Shapes come from the code, not from a model download: the VAE's latent channels and compressions are
`AutoencoderKLHunyuanVideo`'s defaults (the Lite checkpoints' VAE), the Qwen and CLIP widths are
`Kandinsky5Transformer3DModel`'s `in_text_dim` / `in_text_dim2` defaults, the clip is configs/lite-sft-5s.yaml's,
and the default negative prompt's length is counted with the real Qwen tokenizer (the tiny preset ships it).
Each row is `pipelines.latents.Latents(...).to_bytes()` of zero tensors of those shapes: the exact object size.

Run: .venv/bin/python benchmarks/latents_size.py
"""

from __future__ import annotations

import inspect
import os
import sys

import torch
import yaml

from _common import REPO, machine, table, write_json

sys.path.insert(0, str(REPO))

from pipelines import DEFAULT_NEGATIVE_PROMPT, resolve_model  # noqa: E402
from pipelines.latents import Latents  # noqa: E402
from pipelines.tokens import k5_count_tokens  # noqa: E402

PROMPT_TOKENS = (64, 256, 512)  # 512: the pipeline's max_sequence_length, the longest a prompt can be


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def main() -> None:
    from diffusers import AutoencoderKLHunyuanVideo, Kandinsky5Transformer3DModel

    vae, transformer = _defaults(AutoencoderKLHunyuanVideo), _defaults(Kandinsky5Transformer3DModel)
    render = yaml.safe_load((REPO / "configs" / "lite-sft-5s.yaml").read_text())["render"]
    frames, height, width = render["num_frames"], render["height"], render["width"]
    shape = ((frames - 1) // vae["temporal_compression_ratio"] + 1, height // vae["spatial_compression_ratio"],
             width // vae["spatial_compression_ratio"], vae["latent_channels"])
    qwen, clip = transformer["in_text_dim"], transformer["in_text_dim2"]
    negative = k5_count_tokens(os.path.join(resolve_model("tiny"), "tokenizer"), [DEFAULT_NEGATIVE_PROMPT])[0]
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        latents = Latents({"latents": torch.zeros(shape, dtype=dtype)}, {}).to_bytes()
        for tokens in PROMPT_TOKENS:
            for guided in (False, True):
                tensors = {"latents": torch.zeros(shape, dtype=dtype)}
                sides = [("", tokens)] + ([("negative_", negative)] if guided else [])
                for side, length in sides:
                    tensors[f"{side}prompt_embeds_qwen"] = torch.zeros((1, length, qwen), dtype=dtype)
                    tensors[f"{side}prompt_embeds_clip"] = torch.zeros((1, clip), dtype=dtype)
                    tensors[f"{side}prompt_cu_seqlens"] = torch.tensor([0, length], dtype=torch.int32)
                total = len(Latents(tensors, {}).to_bytes())
                rows.append([str(dtype).removeprefix("torch."), tokens, "yes" if guided else "no",
                             round(len(latents) / 1e6, 2), round((total - len(latents)) / 1e6, 2),
                             round(total / 1e6, 2)])
    print(f"Kandinsky 5 Lite, {frames} frames {width}x{height}: latents {shape} (T, H, W, C); Qwen width {qwen}, "
          f"CLIP {clip}; the default negative prompt is {negative} Qwen tokens")
    headers = ["dtype", "prompt tokens", "CFG", "latents MB", "embeddings MB", "object MB"]
    print(table(headers, rows))
    write_json("latents_size", {"machine": machine(), "latents_shape": shape, "qwen_dim": qwen, "clip_dim": clip,
                                "negative_tokens": negative, "headers": headers, "rows": rows})


if __name__ == "__main__":
    main()
