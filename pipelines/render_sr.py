"""Kandinsky 6 video super-resolution: a clip (and its sound) to the same clip 2, 2.25 or 4 times larger.

The seed contract: for a source clip of uint8 frames `f` (F, H, W, 3) and seed `s`, `SRRenderer.render` gives
`out = Kandinsky6SRPipeline(...)(video=f.astype(np.float32) / 255, resolution_scale, num_inference_steps,
generator=torch.Generator("cpu").manual_seed(s), output_type="np")` as `np.round(out.frames[0] * 255)` in uint8,
bit for bit on the same device; the source's sound, if any, is passed through untouched (the pipeline has none).

Facts about diffusers 0.42.1's `Kandinsky6SRPipeline`, each checked by tests/test_sr.py:
- It takes 1 + 4k frames; a size that is not a multiple of the VAE's 16 px is silently resized down, so such a
  source is refused here instead.
- The clip is cut into overlapping tiles at the input size, each refined at the trained tile size closest to the
  clip's aspect (`transformer.config.tile_sizes`), so a side must be at least that tile over the scale.
- 2.25 is a bilinear 1.125x pre-upscale (rounded to 16 px, Python's round) followed by the 2x path.
- The transformer always runs NABLA block-sparse attention through flex (its only attention: nothing to toggle).
- No prompt, no guidance: one transformer pass per step and tile.

Everything above the renderer is torch-free: the driver validates rows with it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.kinds import Clip
from pipelines.request import RenderOptions, RenderRequest

SCALES = (2, 2.25, 4)
DEFAULT_SCALE = 2.25  # the pipeline's default (480p -> ~1080p)
ROPE_POSITIONS = 128  # Kandinsky6SRRoPE3D max_pos per axis: latent frames


def sr_spec_fields(local_dir: str | Path) -> dict:
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


def sr_option_problems(options: RenderOptions) -> list[str]:
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


def _quiet_eager_flex() -> None:
    """Silence the advice to compile flex attention, once per process, on a CPU: there eager flex is the only way (a
    small clip's tiles fit), while on a GPU the advice stands and the SR configs set `model.compile`."""
    import logging
    import warnings

    logging.getLogger("diffusers.models.transformers.transformer_kandinsky6_sr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)


class SRRenderer:
    """A Kandinsky 6 SR pipeline loaded once on one device, upscaling source clips (`RenderRequest.video`)."""

    def __init__(self, model_path: str, *, device: str | None = None, storage_options: dict | None = None,
                 options: RenderOptions = RenderOptions(), dtype=None):
        import diffusers
        import torch
        from diffusers import Kandinsky6SRPipeline

        from pipelines.models import resolve_model
        from pipelines.render import default_device

        if problems := sr_option_problems(options):
            raise ValueError(f"options for the sr model {model_path!r}: " + "; ".join(problems))
        diffusers.utils.logging.disable_progress_bar()
        started = time.perf_counter()
        self.model_path, self.options = model_path, options
        self.scale = options.resolution_scale or DEFAULT_SCALE
        self.device = device or default_device()
        self.dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        self.pipe = Kandinsky6SRPipeline.from_pretrained(resolve_model(model_path, storage_options), dtype=self.dtype,
                                                         use_safetensors=True)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.tile_sizes = self.pipe.transformer_tile_sizes
        if not self.device.startswith("cuda") and not options.compile:
            _quiet_eager_flex()
        self.writer = True  # no gangs: every replica returns its clips
        self.load_seconds = time.perf_counter() - started

    def apply_options(self) -> None:
        """Regional compilation (what the pipeline's docs advise on GPU: eager flex materialises the whole mask)."""
        if self.options.compile:
            self.pipe.transformer.compile_repeated_blocks(fullgraph=True)

    def check(self, request: RenderRequest) -> None:
        """ValueError ("field=value: rule") for a request this model cannot render exactly as asked."""
        frames = getattr(request.video, "frames", request.video)
        if frames is None:
            raise ValueError("video=None: an sr request upscales a source clip (rule: RenderRequest.video)")
        count, height, width = frames.shape[:3]
        if (count - 1) % self.pipe.vae_scale_factor_temporal:
            raise ValueError(f"source num_frames={count}: must be {self.pipe.vae_scale_factor_temporal}k+1")
        expected = upscaled_size(height, width, self.scale, self.tile_sizes, self.pipe.vae_scale_factor_spatial)
        if (request.height, request.width) != expected or request.num_frames != count:
            raise ValueError(f"height x width x num_frames={request.height}x{request.width}x{request.num_frames}: "
                             f"the {height}x{width}x{count} source upscales to {expected[0]}x{expected[1]}x{count} "
                             f"at resolution_scale={self.scale}")

    def render(self, request: RenderRequest):
        """The upscaled frames (F, H*s, W*s, 3) uint8, per the seed contract; a Clip when the source has sound."""
        import numpy as np
        import torch

        self.check(request)
        source = request.video
        frames = getattr(source, "frames", source)
        out = self.pipe(video=frames.astype(np.float32) / 255, resolution_scale=self.scale,
                        num_inference_steps=request.num_inference_steps,
                        generator=torch.Generator("cpu").manual_seed(request.seed), output_type="np")
        upscaled = np.round(out.frames[0] * 255).astype(np.uint8)
        if getattr(source, "audio", None) is None:
            return upscaled
        return Clip(frames=upscaled, audio=source.audio, sample_rate=source.sample_rate)

    def render_batch(self, requests: list[RenderRequest]) -> list:
        """One `render` per request, so every clip is the one its row gives alone."""
        return [self.render(r) for r in requests]
