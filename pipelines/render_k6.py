"""Kandinsky 6: render requests to frames with synchronized sound (what replicas run).

The seed contract: for a request with seed `s`, `K6Renderer.render` gives
`out = Kandinsky6TI2VAPipeline(...)(prompt, image, negative_prompt, height, width, num_frames, frame_rate=24,
num_inference_steps, guidance_scale, generator=torch.Generator("cpu").manual_seed(s), output_type="np")`
as `Clip(np.round(out.frames[0] * 255).astype(np.uint8), out.audio[:1], audio_sample_rate)` — bit for bit, on the
same device. One generator draws, in this order, the reference image's VAE posterior sample (when there is an image),
the video noise and the audio noise, exactly as in the plain call. With `options.expand_prompts` the plain call is the
same with `expand_prompts=True`: the renderer runs the pipeline's own `Kandinsky6TI2VAPipeline.expand_prompts` with that
generator first (so it knows the rewrite, returned as `Clip.prompt`), then the pipeline on the rewrite.

The rules it enforces, and the facts about the pipeline they follow from, are `pipelines.limits_k6`'s.
"""

from __future__ import annotations

import time

from pipelines.kinds import K6_MAX_SEQUENCE_LENGTH, Clip
from pipelines.limits_k6 import FRAME_RATE, k6_option_problems, k6_request_problem
from pipelines.render_common import (decode_image, default_device, frames_uint8, hidden_states_only,
                                     offload_text_encoders, set_attention_backend)
from pipelines.request import RenderOptions, RenderRequest
from pipelines.resolve import resolve_model


class K6Renderer:
    """A Kandinsky 6 TI2VA pipeline loaded once on one device, rendering requests to frames with sound.

    Options that cannot apply (`k6_option_problems`) raise ValueError before any weights load.
    """

    def __init__(self, model_path: str, *, device: str | None = None, storage_options: dict | None = None,
                 options: RenderOptions = RenderOptions(), frame_rate: float = FRAME_RATE, dtype=None):
        import diffusers
        import torch
        import transformers
        from diffusers import Kandinsky6TI2VAPipeline

        self._refuse(options, model_path)
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        started = time.perf_counter()
        self.model_path, self.options, self.frame_rate = model_path, options, frame_rate
        self.device = device or default_device()
        # bf16 is what the checkpoints are trained and published in; CPUs run fp32.
        self.dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        local = resolve_model(model_path, storage_options)
        self.pipe = Kandinsky6TI2VAPipeline.from_pretrained(local, dtype=self.dtype, use_safetensors=True)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        hidden_states_only(self.pipe.text_encoder)
        if options.offload_text_encoder:
            self._offload_text_encoders()
        self.distilled = type(self.pipe.scheduler).__name__ == "PiflowScheduler"
        self.sample_rate = int(self.pipe.audio_sample_rate)
        self.writer = True  # no gangs for Kandinsky 6: every replica returns its clips
        self.load_seconds = time.perf_counter() - started

    @staticmethod
    def _refuse(options: RenderOptions, model_path: str) -> None:
        if problems := k6_option_problems(options):
            raise ValueError(f"options for the ti2va model {model_path!r}: " + "; ".join(problems))

    def apply_options(self) -> None:
        """Attention backend and regional compilation, applied from outside the model."""
        transformer, options = self.pipe.transformer, self.options
        self._refuse(options, self.model_path)
        if options.attention_backend:
            set_attention_backend(transformer, options.attention_backend)
        if options.compile:
            transformer.compile_repeated_blocks(fullgraph=True)  # its text and fused video/audio blocks

    def _offload_text_encoders(self) -> None:
        """Text encoders in pinned CPU memory, streamed in layer by layer while they encode (as `Renderer`)."""
        offload_text_encoders(self.pipe, self.device)

    def check(self, request: RenderRequest) -> None:
        """ValueError ("field=value: rule") for a request this model cannot render exactly as asked."""
        if problem := k6_request_problem(request, self.distilled):
            raise ValueError(problem)

    def render(self, request: RenderRequest):
        """Frames (num_frames, height, width, 3) uint8 and the waveform (1, samples) float32, per the seed contract;
        with `options.expand_prompts` the Clip carries the expanded prompt too (and no waveform in video-only mode)."""
        import torch

        self.check(request)
        image = getattr(request, "image", None)
        image = None if image is None else decode_image(image)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        expanded = self.expand(request.prompt, image, generator) if self.options.expand_prompts else None
        out = self.pipe(
            prompt=request.prompt if expanded is None else expanded, image=image,
            negative_prompt=request.negative_prompt, height=request.height, width=request.width,
            num_frames=request.num_frames, frame_rate=self.frame_rate,
            num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
            generator=generator, output_type="pt", sample_audio=self.options.sample_audio,
            max_sequence_length=K6_MAX_SEQUENCE_LENGTH,
        )
        frames = frames_uint8(out.frames[0])
        if out.audio is None:  # the video-only mode (options.sample_audio off): frames alone
            return frames if expanded is None else Clip(frames, prompt=expanded)
        audio = out.audio[:1].float().cpu().numpy()  # the pipeline's (batch, samples): one row as (1 channel, samples)
        return Clip(frames=frames, audio=audio, sample_rate=self.sample_rate, prompt=expanded)

    def expand(self, prompt: str, image, generator) -> str:
        """The pipeline's own prompt expansion, exactly as `pipe(..., expand_prompts=True)` runs it (same device,
        length and generator); it reseeds the global torch RNG and leaves `generator` as it was."""
        return type(self.pipe).expand_prompts(
            prompt, self.pipe.tokenizer, self.pipe.text_encoder, self.pipe._execution_device, image=image,
            max_sequence_length=K6_MAX_SEQUENCE_LENGTH, generator=generator,
        )

    def render_batch(self, requests: list[RenderRequest]) -> list[Clip]:
        """One `render` per request, so every clip is the one its row gives alone."""
        return [self.render(r) for r in requests]
