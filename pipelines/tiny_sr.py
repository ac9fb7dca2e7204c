"""The `tiny-sr` preset: a random-weight Kandinsky 6 video super-resolution pipeline built offline, in code.

Every component is the real class the hub checkpoint uses (Kandinsky6SRTransformer3DModel, Kandinsky6SRVAE,
Kandinsky6SRLatentUpscalerBank, PiflowScheduler), only small. The VAE keeps the real five levels (16x spatial,
4x temporal compression) and the transformer the real NABLA block grid (8x8 latent patches per attention block), so
the tile rules are the real ones at a smaller scale: the trained tiles are 128 px here (512/768 px on the checkpoint),
which a 64x64 clip fills at 2x. Like `Kandinsky-6.0-VSR-distilled2steps-5s`, it ships PiflowScheduler (its
transformer predicts 10 outputs per latent channel) and renders in 2 steps. Its upscaled videos are noise: the
weights are random.
"""

from __future__ import annotations

LATENT_CHANNELS = 8
VAE = dict(latent_channels=LATENT_CHANNELS, encoder_block_out_channels=(8, 8, 8, 8, 8),
           decoder_block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
PIFLOW_GRID = 10
# 4 heads of 16, as `tiny`; tiles of 128 px are 8 latent patches a side: one NABLA block (the real ones: 4-6).
TRANSFORMER = dict(in_visual_dim=LATENT_CHANNELS, out_visual_dim=LATENT_CHANNELS * PIFLOW_GRID, time_dim=32,
                   model_dim=64, ff_dim=128, num_visual_blocks=2, axes_dims=(4, 6, 6),
                   tile_sizes=((128, 128), (128, 256), (256, 128)))
UPSCALER = dict(in_channels=LATENT_CHANNELS, stage_channels=(16, 16, 16), num_pre_blocks=1, num_mid_blocks=1,
                num_post_blocks=1, num_x2_adapter_blocks=1)
SCHEDULER_SHIFT = 5.0


def build_tiny_sr_pipeline(seed: int = 0):
    """Build the tiny random-weight Kandinsky6SRPipeline deterministically (`seed`: another draw of its weights)."""
    import torch
    from diffusers import (
        Kandinsky6SRLatentUpscalerBank,
        Kandinsky6SRPipeline,
        Kandinsky6SRTransformer3DModel,
        Kandinsky6SRVAE,
        PiflowScheduler,
    )

    from pipelines.tiny_k6 import _randomize_zero_init

    torch.manual_seed(seed)
    vae = Kandinsky6SRVAE(**VAE)
    torch.manual_seed(seed)
    transformer = Kandinsky6SRTransformer3DModel(**TRANSFORMER)
    _randomize_zero_init(transformer, 1 + seed)  # its pooled-text bias starts at zero: no trained model has that
    torch.manual_seed(seed)
    upscaler = Kandinsky6SRLatentUpscalerBank(**UPSCALER)
    return Kandinsky6SRPipeline(transformer=transformer.eval(), vae=vae.eval(),
                                scheduler=PiflowScheduler(shift=SCHEDULER_SHIFT, n_grid=PIFLOW_GRID),
                                latent_upscaler=upscaler.eval())
