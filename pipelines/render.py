"""Render requests to uint8 frames with the real diffusers Kandinsky 5 pipelines: T2V, I2V, T2I and I2I.

The checkpoint's `model_index.json` picks the pipeline class (pipelines.kinds). The seed contract: for a request
with seed `s`, the frames equal
`np.round(Pipeline(...)(..., generator=torch.Generator("cpu").manual_seed(s), output_type="np").frames[0] * 255)
.astype(np.uint8)` — bit for bit, on the same device. I2V and I2I also get `image=decode_image(request.image)`;
T2I and I2I take no `num_frames` and give one image, `.image[0]`, returned as one frame (1, H, W, 3).

Prompts are encoded with the pipeline's own `encode_prompt` and passed back in as embeddings, so each
distinct prompt and negative prompt is encoded once per replica (the same tensors the pipeline would
compute itself). I2I encodes the image with the text (Qwen reads both): its texts are cached per image.

With `keep_latents` set, a render returns `Clip(frames, latents=...)`: each row's final latents, kept from the
pipeline's own loop by a step-end callback, and its embeddings (`pipelines.latents`); the frames are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from pipelines.caching import cache_config
from pipelines.cost import guided
from pipelines.guidance import GuidedSteps, negative_inputs
from pipelines.kinds import NO_IMAGE, Clip, Kind, UnsupportedModel, kind_of
from pipelines.latents import FinalLatents, row_latents
from pipelines.limits import FAMILY, image_size, k5_i2i_token_problem, request_problem
from pipelines.nabla import set_attention_type
from pipelines.render_common import (decode_image, default_device, frames_uint8, hidden_states_only,
                                     offload_text_encoders, set_attention_backend)
from pipelines.request import RenderOptions, RenderRequest
from pipelines.resolve import resolve_model

def model_kind(model_path: str, local: str, storage_options: dict | None = None) -> Kind:
    """The kind of a resolved model: from its local `model_index.json`, or a hub id's (configs only)."""
    if os.path.isfile(os.path.join(local, "model_index.json")):
        return kind_of(local)
    return kind_of(resolve_model(model_path, storage_options, spec_only=True))


class Renderer:
    """A Kandinsky 5 pipeline (T2V, I2V, T2I or I2I) loaded once on one device, rendering requests to frames.

    Options that cannot apply to the model's kind (`pipelines.limits.option_problems`) raise ValueError here.
    """

    def __init__(self, model_path: str, *, device: str | None = None, storage_options: dict | None = None,
                 options: RenderOptions = RenderOptions(), skip: tuple[str, ...] = (), text_cache: int = 1024,
                 dtype: torch.dtype | None = None):
        import diffusers
        import transformers

        # Per-component loading bars from every replica would drown the job's own progress bar.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        started = time.perf_counter()
        self.model_path, self.options = model_path, options
        self.device = device or default_device()
        # bf16 is what the checkpoints are trained and published in; CPUs run fp32.
        self.dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        local = resolve_model(model_path, storage_options)
        self.kind = model_kind(model_path, local, storage_options)
        if self.kind.name not in FAMILY:  # another renderer's kind (`Kind.renderer`)
            raise UnsupportedModel(f"{model_path!r} is a {self.kind.name} model ({self.kind.pipeline}): this renderer "
                                   f"runs the Kandinsky 5 kinds {', '.join(FAMILY)}")
        # The pipeline's own default, so embeddings are what a plain call computes (I2I's is 1024, the rest 512).
        self.max_sequence_length = self.kind.max_sequence_length
        if self.kind.counts_image_tokens:  # its token budget counts the image's tokens: checked per request
            spec_dir = local if os.path.isdir(local) else resolve_model(model_path, storage_options, spec_only=True)
            self._tokenizer_dir = os.path.join(spec_dir, "tokenizer")
        if problems := self.kind.option_problems(options):
            raise ValueError(f"options for the {self.kind.name} model {model_path!r}: " + "; ".join(problems))
        if self.kind.image != NO_IMAGE:  # every rank of a gang encodes the conditioning image in `prepare_latents`
            skip = tuple(name for name in skip if name != "vae")
        self.pipe = getattr(diffusers, self.kind.pipeline).from_pretrained(
            local, dtype=self.dtype, use_safetensors=True, **{name: None for name in skip})
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        hidden_states_only(getattr(self.pipe, "text_encoder", None))
        # Always: a checkpoint that ships NABLA gets its attention processor even with no option set.
        set_attention_type(self.pipe.transformer, options.attention_type, dict(options.nabla_args))
        self._cache_steps: int | None = None
        if options.offload_text_encoder:
            self._offload_text_encoders()
        self._texts: OrderedDict[str | tuple[str, bytes], tuple] = OrderedDict()
        self._text_cache = text_cache
        self.steps: GuidedSteps | None = None
        self.writer = True  # whether `render` returns frames (in a gang only rank 0 does)
        self.keep_latents = False  # whether renders also return each row's latents and embeddings (`output.latents`)
        self.load_seconds = time.perf_counter() - started

    def apply_options(self, exchange_group=None, branch: int = 0) -> None:
        """Attention backend, step cache, compilation and the guidance wrapper, applied from outside the model."""
        transformer, options = self.pipe.transformer, self.options
        if options.attention_backend:
            set_attention_backend(transformer, options.attention_backend)
        if options.cache and options.cache != "magcache":  # MagCache waits for the first request's step count
            transformer.enable_cache(cache_config(options.cache, dict(options.cache_args), steps=0))
        if options.compile:
            transformer.compile_repeated_blocks(fullgraph=True)
        if options.cache or options.batched_guidance or exchange_group is not None:
            self.steps = GuidedSteps(transformer, batched=options.batched_guidance, exchange_group=exchange_group,
                                     branch=branch, cache_contexts=options.cache is not None)

    def _magcache_for(self, steps: int) -> None:
        """MagCache's ratios are per step: (re)build its hooks when a request's step count differs."""
        if self.options.cache != "magcache" or steps == self._cache_steps:
            return
        transformer = self.pipe.transformer
        if self._cache_steps is not None:
            transformer.disable_cache()
        transformer.enable_cache(cache_config("magcache", dict(self.options.cache_args), steps))
        self._cache_steps = steps

    def _offload_text_encoders(self) -> None:
        offload_text_encoders(self.pipe, self.device)

    @torch.no_grad()
    def encode(self, text: str, image: bytes | None = None) -> tuple:
        """The pipeline's own (qwen embeds, clip pooled, cu_seqlens) for a text, computed once per replica.

        I2I's Qwen reads the text with the row's image (encoded bytes): cached per text and image.
        """
        key = text if image is None else (text, hashlib.sha256(image).digest())
        if key in self._texts:
            self._texts.move_to_end(key)
            return self._texts[key]
        with_image = {} if image is None else {"image": decode_image(image)}
        encoded = self.pipe.encode_prompt(text, **with_image, max_sequence_length=self.max_sequence_length,
                                          device=self.device, dtype=self.pipe.transformer.dtype)
        self._texts[key] = encoded
        if len(self._texts) > self._text_cache:
            self._texts.popitem(last=False)
        return encoded

    def embeddings(self, request: RenderRequest) -> dict:
        """Pipeline kwargs for the request's prompt and (effective) negative prompt embeddings."""
        image = request.image if self.kind.counts_image_tokens else None
        qwen, clip, cu = self.encode(request.prompt, image)
        embeds = {"prompt_embeds_qwen": qwen, "prompt_embeds_clip": clip, "prompt_cu_seqlens": cu}
        negative = self.kind.negative_prompt(request.negative_prompt, request.guidance_scale)
        if negative is not None:
            qwen, clip, cu = self.encode(negative, image)
            embeds.update(negative_prompt_embeds_qwen=qwen, negative_prompt_embeds_clip=clip,
                          negative_prompt_cu_seqlens=cu)
        return embeds

    def denoise(self, requests: list[RenderRequest], embeds: dict):
        """One pipeline call from embeddings; each row seeded by its own CPU generator (the seed contract).

        Returns the frames, and the loop's last latents (B, T, H, W, C') when `keep_latents` (else None)."""
        first = requests[0]
        self._magcache_for(first.num_inference_steps)
        if self.steps is not None:
            self.steps.arm(negative_inputs(embeds, self.device) if guided(first.guidance_scale) else None)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        kind_args = {}
        if self.kind.frames:
            kind_args["num_frames"] = first.num_frames
        if self.kind.image != NO_IMAGE:
            images = [decode_image(r.image) for r in requests]
            kind_args["image"] = images[0] if len(images) == 1 else images
        final = FinalLatents() if self.keep_latents and self.writer else None
        keep = {} if final is None else {"callback_on_step_end": final,
                                         "callback_on_step_end_tensor_inputs": final.tensor_inputs}
        out = self.pipe(
            **embeds, **kind_args, height=first.height, width=first.width,
            num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
            generator=generators[0] if len(generators) == 1 else generators,
            output_type="pt" if self.writer else "latent", **keep,
        )
        # Video kinds: (B, F, C, H, W); T2I and I2I: (B, C, H, W), one image per row, kept as (B, 1, C, H, W).
        return (out.frames if self.kind.frames else out.image.unsqueeze(1)), None if final is None else final.latents

    def _rendered(self, frames, request: RenderRequest, final, embeds: dict):
        """The frames as `render` returns them: alone, or with the row's latents (`keep_latents`)."""
        frames = frames_uint8(frames)
        if final is None:
            return frames
        return Clip(frames, latents=row_latents(self.pipe, self.kind, final[None], embeds, request))

    def check(self, request: RenderRequest) -> None:
        """ValueError ("field=value: rule") for a request this model cannot render exactly as asked."""
        problem = request_problem(self.kind, request)
        if problem is None and self.kind.counts_image_tokens:  # texts and image share the Qwen window
            negative = self.kind.negative_prompt(request.negative_prompt, request.guidance_scale)
            problem = k5_i2i_token_problem(self._tokenizer_dir, {"prompt": request.prompt, "negative_prompt": negative},
                                           image_size(request.image), self.max_sequence_length)
        if problem:
            raise ValueError(problem)

    def render(self, request: RenderRequest) -> np.ndarray | Clip | None:
        """Frames (num_frames, height, width, 3) uint8 for one request, per the seed contract (T2I, I2I: one frame);
        with `keep_latents`, a `Clip` of those frames and the row's latents."""
        self.check(request)
        embeds = self.embeddings(request)
        out, final = self.denoise([request], embeds)
        return self._rendered(out[0], request, None if final is None else final[0], embeds) if self.writer else None

    def render_batch(self, requests: list[RenderRequest]) -> list[np.ndarray | Clip] | None:
        """Frames for several requests of one shape and text length in a single batched pipeline call.

        Latents come from each row's own generator, as in single calls; the batched forward differs
        from single calls by float rounding only (within ±1 uint8 level). I2V rows render one at a time:
        its pipeline renormalises the first latent frames with statistics over the whole batch, so a row
        batched with others would not be the row rendered alone. I2I rows batch when their Qwen sequences
        (text and image tokens) are equally long, and render one at a time otherwise.
        """
        if len(requests) == 1 or not self.kind.batches_rows:
            out = [self.render(request) for request in requests]
            return out if self.writer else None
        for request in requests:
            self.check(request)
        parts = [self.embeddings(r) for r in requests]
        if self.kind.counts_image_tokens and len({tuple(v.shape[1] for k, v in p.items() if k.endswith("qwen"))
                                            for p in parts}) > 1:
            out = [self.render(request) for request in requests]
            return out if self.writer else None
        embeds = {}
        for key in parts[0]:
            if key.endswith("cu_seqlens"):
                lengths = torch.cat([p[key].diff() for p in parts])
                embeds[key] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            else:
                embeds[key] = torch.cat([p[key] for p in parts])
        out, final = self.denoise(requests, embeds)
        if not self.writer:
            return None
        return [self._rendered(frames, request, None if final is None else final[i], part)
                for i, (frames, request, part) in enumerate(zip(out, requests, parts))]
