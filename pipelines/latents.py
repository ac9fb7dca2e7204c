"""A row's final latents and the prompt embeddings it was denoised with, as one safetensors file.

What distillation and fine-tuning recipes read instead of re-encoding videos and prompts. The tensors:

    latents                      (T, H, W, C): latent frames, height, width, channels (the transformer's order),
                                 the pipeline's own `output_type="latent"` output for the row: after the loop's
                                 post-processing (I2V: `normalize_first_frame`), BEFORE the division by the
                                 VAE's `scaling_factor`. T2I and I2I: T = 1.
    prompt_embeds_qwen           (1, L, D): Qwen's last hidden states of the prompt's L tokens (I2I: with the image's)
    prompt_embeds_clip           (1, D2): CLIP's pooled text embedding
    prompt_cu_seqlens            (2,) int32: [0, L]
    negative_prompt_embeds_qwen, negative_prompt_embeds_clip, negative_prompt_cu_seqlens
                                 the same for the negative prompt: present only when the row is guided (CFG)

The embeddings are exactly the pipeline's keyword arguments for the row (a batch of one), so
`pipe(**embeddings, ...)` renders it again. Every tensor is in the dtype the pipeline ran in (bf16 on a GPU,
fp32 on a CPU). String metadata (`METADATA_KEYS`) restates this, with the VAE's scaling factor and compression.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

FORMAT = "kandinsky-batch/latents-v1"
LATENTS = "latents"
EMBEDDING_NAMES = ("prompt_embeds_qwen", "prompt_embeds_clip", "prompt_cu_seqlens",
                   "negative_prompt_embeds_qwen", "negative_prompt_embeds_clip", "negative_prompt_cu_seqlens")
METADATA_KEYS = ("format", "kind", "pipeline", "layout", "space", "scaling_factor", "temporal_compression",
                 "spatial_compression", "dtype", "guided", "seed", "height", "width", "num_frames")


@dataclass(frozen=True)
class Latents:
    """One row's tensors (CPU, contiguous) and their string metadata; `to_bytes` is the committed object."""

    tensors: dict
    metadata: dict

    def to_bytes(self) -> bytes:
        """The safetensors serialization (`safetensors.torch.save`): deterministic for equal tensors."""
        from safetensors.torch import save

        return save(self.tensors, metadata=self.metadata)


def read(data: bytes) -> Latents:
    """A committed latents object's tensors and metadata (through `safe_open`, which reads files only)."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="kb-latents-") as folder:
        path = os.path.join(folder, "row.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        with safe_open(path, framework="pt") as handle:
            return Latents({name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {})


class FinalLatents:
    """A `callback_on_step_end` keeping the denoising loop's last latents (the loop updates them in place)."""

    tensor_inputs = ["latents"]

    def __init__(self) -> None:
        self.latents: torch.Tensor | None = None

    def __call__(self, pipe, step: int, timestep, tensors: dict) -> dict:
        if step == pipe.num_timesteps - 1:
            self.latents = tensors["latents"].clone()
        return {}


def row_latents(pipe, kind, final: torch.Tensor, embeds: dict, request) -> Latents:
    """One row's `Latents` from the loop's last latents (B = 1) and the embeddings the pipeline was given."""
    channels = pipe.transformer.config.in_visual_dim
    latents = final[..., :channels]  # the visual-conditioning channels (I2V) are the transformer's input only
    if kind.latents_post is not None:
        latents = getattr(pipe, kind.latents_post)(latents)
    tensors = {LATENTS: latents[0]}
    tensors.update((name, embeds[name]) for name in EMBEDDING_NAMES if name in embeds)
    # Copies: a batch's rows are views of one tensor, and the cached embeddings outlive the row.
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    vae = pipe.vae.config
    metadata = {
        "format": FORMAT, "kind": kind.name, "pipeline": kind.pipeline,
        "layout": "latents (T, H, W, C): latent frames, height, width, channels; prompt embeddings as the "
                  "pipeline's keyword arguments (a batch of one)",
        "space": "before the VAE's scaling: decode latents.permute(3, 0, 1, 2)[None] / scaling_factor "
                 "(T2I, I2I: latents[0].permute(2, 0, 1)[None] / scaling_factor)",
        "scaling_factor": repr(float(vae.scaling_factor)),
        "temporal_compression": str(pipe.vae_scale_factor_temporal if kind.frames else 1),
        "spatial_compression": str(pipe.vae_scale_factor_spatial),
        "dtype": str(tensors[LATENTS].dtype).removeprefix("torch."),
        "guided": str("negative_prompt_embeds_qwen" in tensors).lower(),
        "seed": str(request.seed), "height": str(request.height), "width": str(request.width),
        "num_frames": str(request.num_frames if kind.frames else 1),
    }
    return Latents(tensors, metadata)
