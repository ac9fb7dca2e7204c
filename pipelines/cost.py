"""Two torch-free rules every layer shares: whether a render is guided, and what it costs relative to another.

The scheduler's longest-first order (`Task.cost`), the GPU-hours estimate and the simulated renderer's sleep
all rest on `cost`; the negative prompt a row records and the passes it runs on `guided`.
"""

from __future__ import annotations


def guided(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs (an uncond pass each step): the diffusers pipelines' rule, scale > 1."""
    return guidance_scale > 1.0


def visual_tokens(num_frames: int, height: int, width: int) -> int:
    """Visual tokens the transformer sees: latent frames (4x temporal VAE) x (height/16) x (width/16)."""
    return ((num_frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def cost(num_frames: int, height: int, width: int, num_inference_steps: int, guidance_scale: float) -> float:
    """Relative GPU cost of a render: visual tokens x steps x transformer passes per step (2 when guided)."""
    return visual_tokens(num_frames, height, width) * num_inference_steps * (2 if guided(guidance_scale) else 1)
