"""Kandinsky 6 video super-resolution: what its checkpoints can render, torch-free (the driver's rules).

Facts about diffusers 0.42.1's `Kandinsky6SRPipeline`, each checked by tests/test_sr.py:
- It takes 1 + 4k frames; a size that is not a multiple of the VAE's 16 px is silently resized down, so such a
  source is refused here instead.
- The clip is cut into overlapping tiles at the input size, each refined at the trained tile size closest to the
  clip's aspect (`transformer.config.tile_sizes`), so a side must be at least that tile over the scale.
- 2.25 is a bilinear 1.125x pre-upscale (rounded to 16 px, Python's round) followed by the 2x path.
- The transformer always runs NABLA block-sparse attention through flex (its only attention: nothing to toggle).
- No prompt, no guidance: one transformer pass per step and tile.

The renderer is `pipelines.render_sr.SRRenderer`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.request import RenderOptions

SCALES = (2, 2.25, 4)
DEFAULT_SCALE = 2.25  # the pipeline's default (480p -> ~1080p)
ROPE_POSITIONS = 128  # Kandinsky6SRRoPE3D max_pos per axis: latent frames


def sr_spec_fields(local_dir: str | Path, kind=None) -> dict:
    """The `ModelSpec` limits of a Kandinsky 6 SR checkpoint, from its configs (no weights, no torch)."""
    local = Path(local_dir)
    transformer = json.loads((local / "transformer" / "config.json").read_text())
    vae = json.loads((local / "vae" / "config.json").read_text())
    spatial = 2 ** (len(vae.get("encoder_block_out_channels", (16, 128, 256, 512, 1024))) - 1)
    temporal = vae.get("temporal_compression_ratio", 4)
    tiles = tuple(tuple(size) for size in transformer.get("tile_sizes", ((512, 512), (512, 768), (768, 512))))
    return dict(
        attention_type="regular",  # NABLA is the SR transformer's only attention: no option changes it
        num_heads=transformer.get("model_dim", 1792) // sum(transformer.get("axes_dims", (16, 24, 24))),
        spatial_multiple=spatial, temporal_multiple=temporal, max_frames=temporal * (ROPE_POSITIONS - 1) + 1,
        max_size=8192, max_prompt_tokens=0, tile_sizes=tiles,
    )


def upscaled_size(height: int, width: int, scale: float, tile_sizes: tuple, snap: int = 16) -> tuple[int, int]:
    """The output (height, width) of a `height` x `width` clip, exactly as the pipeline computes it; ValueError
    ("field=value: rule") for a clip it would resize silently or cannot tile."""
    if scale not in SCALES:
        raise ValueError(f"resolution_scale={scale}: must be one of {', '.join(map(str, SCALES))}")
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % snap:
            raise ValueError(f"source {name}={value}: must be a multiple of {snap} (the pipeline would resize it)")
    tiling, pre = (2, 1.125) if scale == 2.25 else (int(scale), 1.0)
    if pre != 1.0:
        height, width = round(height * pre / snap) * snap, round(width * pre / snap) * snap
    base_h, base_w = min(tile_sizes, key=lambda hw: abs(hw[1] / hw[0] - width / height))
    tile_h, tile_w = base_h // tiling, base_w // tiling
    if height < tile_h or width < tile_w:
        raise ValueError(f"source height x width={height}x{width}: too small for resolution_scale={scale} "
                         f"(rule: at least {tile_h}x{tile_w}, the trained {base_h}x{base_w} tile over the scale)")
    return height * tiling, width * tiling


def sr_option_problems(options: RenderOptions, kind=None) -> list[str]:
    """Why render options cannot apply to the SR pipeline ("option=value: reason" each); empty if they can."""
    found = []
    for name in ("cache", "cache_args", "batched_guidance", "nabla_args", "attention_type", "attention_backend",
                 "offload_text_encoder"):
        if value := getattr(options, name):
            found.append(f"{name}={value!r}: not for Kandinsky 6 SR (no text encoder, no guidance; its transformer "
                         "always runs NABLA through flex)")
    if not options.sample_audio:
        found.append("sample_audio=False: Kandinsky 6 SR renders no sound (it passes the source's through)")
    if getattr(options, "expand_prompts", False):
        found.append("expand_prompts=True: Kandinsky 6 SR takes no prompt")
    return found
