"""Kandinsky 6 video super-resolution: a clip (and its sound) to the same clip 2, 2.25 or 4 times larger.

The seed contract: for a source clip of uint8 frames `f` (F, H, W, 3) and seed `s`, `SRRenderer.render` gives
`out = Kandinsky6SRPipeline(...)(video=f.astype(np.float32) / 255, resolution_scale, num_inference_steps,
generator=torch.Generator("cpu").manual_seed(s), output_type="np")` as `np.round(out.frames[0] * 255)` in uint8,
bit for bit on the same device; the source's sound, if any, is passed through untouched (the pipeline has none).

The rules it enforces, and the facts about the pipeline they follow from, are `pipelines.limits_sr`'s.
"""

from __future__ import annotations

import time

from pipelines.kinds import Clip
from pipelines.limits_sr import DEFAULT_SCALE, sr_option_problems, upscaled_size
from pipelines.render_common import default_device
from pipelines.request import RenderOptions, RenderRequest
from pipelines.resolve import resolve_model


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
