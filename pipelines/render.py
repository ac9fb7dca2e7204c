"""Render requests to uint8 frames with the real diffusers Kandinsky5T2VPipeline.

The seed contract: for a request with seed `s`, the frames equal
`np.round(Kandinsky5T2VPipeline(...)(..., generator=torch.Generator("cpu").manual_seed(s),
output_type="np").frames[0] * 255).astype(np.uint8)` — bit for bit, on the same device.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from pipelines.models import resolve_model
from pipelines.request import RenderRequest

def _pipeline_template() -> str:
    from diffusers import Kandinsky5T2VPipeline

    return Kandinsky5T2VPipeline(None, None, None, None, None, None, None).prompt_template


PROMPT_TEMPLATE = _pipeline_template()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline float frames in [0, 1] to uint8, exactly as the seed contract states."""
    return np.round(frames * 255).astype(np.uint8)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Renderer:
    """A Kandinsky 5 T2V pipeline loaded once on one device, rendering requests to frames."""

    def __init__(self, model_path: str, *, device: str | None = None, storage_options: dict | None = None):
        import diffusers
        import transformers
        from diffusers import Kandinsky5T2VPipeline

        # Per-component loading bars from every replica would drown the job's own progress bar.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        self.device = device or default_device()
        # bf16 is what the checkpoints are trained and published in; CPUs run fp32.
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        started = time.perf_counter()
        local = resolve_model(model_path, storage_options)
        self.pipe = Kandinsky5T2VPipeline.from_pretrained(local, dtype=self.dtype, use_safetensors=True)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - started
        self.model_path = model_path

    def render(self, request: RenderRequest) -> np.ndarray:
        """Frames (num_frames, height, width, 3) uint8 for one request, per the seed contract."""
        args = asdict(request)
        seed = args.pop("seed")
        out = self.pipe(
            **args,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).frames
        return to_uint8(np.asarray(out[0]))
