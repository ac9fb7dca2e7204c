"""Kandinsky 6: render requests to frames with synchronized sound, and what its checkpoints can render.

The seed contract: for a request with seed `s`, `K6Renderer.render` gives
`out = Kandinsky6TI2VAPipeline(...)(prompt, image, negative_prompt, height, width, num_frames, frame_rate=24,
num_inference_steps, guidance_scale, generator=torch.Generator("cpu").manual_seed(s), output_type="np")`
as `Clip(np.round(out.frames[0] * 255).astype(np.uint8), out.audio[:1], audio_sample_rate)` — bit for bit, on the
same device. One generator draws, in this order, the reference image's VAE posterior sample (when there is an image),
the video noise and the audio noise, exactly as in the plain call. With `options.expand_prompts` the plain call is the
same with `expand_prompts=True`: the renderer runs the pipeline's own `Kandinsky6TI2VAPipeline.expand_prompts` with that
generator first (so it knows the rewrite, returned as `Clip.prompt`), then the pipeline on the rewrite.

Facts about diffusers 0.42.1's `Kandinsky6TI2VAPipeline`, each checked by tests/test_k6.py:
- It does not clean prompts; it pads every prompt to `max_sequence_length` (1024) tokens and masks the padding, so
  backends that cannot take that mask are refused (`MASKLESS_BACKENDS`).
- `negative_prompt` None *or empty* means its default negative prompt when guidance is on.
- Audio and video are denoised together: `frame_rate` sets the audio length, and so changes the frames too.
- The sound lasts num_frames / frame_rate seconds rounded up to whole audio latents (`audio_samples`).
- A PIL image is resized to cover (width, height), aspect kept, and center-cropped.
- `expand_prompts` rewrites a prompt with the Qwen text encoder's `generate` (the processor's chat template, up to
  `max_sequence_length` new tokens, the image too when there is one), seeding the global torch RNG from the
  generator's seed and drawing nothing from the generator itself; the rewrite is then padded and cut to
  `max_sequence_length` tokens like any prompt.

Everything above the renderer is torch-free: the driver validates rows and options with it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pipelines.cost import guided
from pipelines.kinds import Clip
from pipelines.request import RenderOptions, RenderRequest

# The pipeline's Qwen prompt template, the template tokens it crops off the front (exactly the template's head with
# the real Qwen tokenizer), its default `max_sequence_length` and its fallback negative prompt.
K6_PROMPT_TEMPLATE = "\n".join([
    "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
    "Describe the location of the video, main characters or objects and their action.",
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, "
    "some kind of animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
    "<|im_start|>user\n{}<|im_end|>",
])
K6_CROP_START = 129
K6_MAX_SEQUENCE_LENGTH = 1024
K6_DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)
FRAME_RATE = 24.0
# RoPE tables: 128 positions per video axis (Kandinsky6RoPE3D), 2048 audio latent positions (Kandinsky6RoPE1D).
VIDEO_ROPE_POSITIONS = 128
AUDIO_ROPE_POSITIONS = 2048
# The prompt padding mask is (batch, keys), in the text blocks and the text cross-attention. The flash, sage and aiter
# backends raise on any mask; flex reads a 2-D mask as a mask over queries (a shape error in cross-attention). The SDPA
# ones (`native`, `_native_math`, ...) and the varlen ones take it.
MASKLESS_BACKENDS = frozenset({
    "flash", "flash_hub", "flash_4_hub", "_flash_3", "_flash_3_hub", "aiter_fa2_hub", "_native_flash", "flex",
    "sage", "sage_hub", "sage_blackwell_hub", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_triton",
})


def k6_count_tokens(tokenizer_dir: str, prompts: list[str]) -> list[int]:
    """Qwen tokens each prompt takes of the pipeline's `max_sequence_length` window, in one Rust tokenizer call.

    The pipeline tokenizes `template.format(prompt)` as given and keeps what follows the first K6_CROP_START tokens,
    truncating to max_sequence_length: so the count is the whole templated text's (the prompt, its seams and the
    closing `<|im_end|>`) minus the crop, and a prompt is kept whole exactly when it is at most max_sequence_length.
    """
    # Imported here: pipelines.models imports this module.
    from pipelines.models import _fast_tokenizer

    encoded = _fast_tokenizer(tokenizer_dir).encode_batch([K6_PROMPT_TEMPLATE.format(p) for p in prompts])
    return [len(e.ids) - K6_CROP_START for e in encoded]


def audio_samples(num_frames: int, sample_rate: int, latent_hop: int = 1024, frame_rate: float = FRAME_RATE) -> int:
    """Waveform length of a render: audio latents cover `num_frames / frame_rate` seconds, rounded up to whole
    latents of `latent_hop` samples (so at most one latent, 23 ms at 44.1 kHz, longer than the video)."""
    return math.ceil(num_frames / frame_rate * sample_rate / latent_hop) * latent_hop


def k6_spec_fields(local_dir: str | Path, frame_rate: float = FRAME_RATE) -> dict:
    """The `ModelSpec` limits of a Kandinsky 6 checkpoint, from its configs (no weights, no torch)."""
    local = Path(local_dir)
    transformer = json.loads((local / "transformer" / "config.json").read_text())
    vae = json.loads((local / "vae" / "config.json").read_text())
    audio_path = local / "audio_vae" / "config.json"
    audio_vae = json.loads(audio_path.read_text()) if audio_path.exists() else {}
    patch_t, patch_h, patch_w = transformer.get("patch_size", (1, 2, 2))
    spatial = vae.get("spatial_compression_ratio", 8) * max(patch_h, patch_w)
    temporal = vae.get("temporal_compression_ratio", 4)
    sample_rate = audio_vae.get("sample_rate", 44_100)  # the pipeline's own fallback
    latent_hop = 2 * audio_vae.get("hop_length", 512)  # MMAudioVAE's encoder halves the mel frames once
    video_frames = temporal * (VIDEO_ROPE_POSITIONS * patch_t - 1) + 1
    audio_frames = math.floor(AUDIO_ROPE_POSITIONS * latent_hop / sample_rate * frame_rate)  # 1141 at 24 fps
    return dict(
        attention_type=transformer.get("attention_type", "regular"),
        num_heads=transformer["model_dim"] // sum(transformer["axes_dims"]),
        spatial_multiple=spatial, temporal_multiple=temporal, max_frames=min(video_frames, audio_frames),
        max_size=spatial * VIDEO_ROPE_POSITIONS, max_prompt_tokens=K6_MAX_SEQUENCE_LENGTH,
        audio_sample_rate=sample_rate,
    )


def k6_distilled(local_dir: str | Path) -> bool:
    """Whether the checkpoint is a distilled one (it ships PiflowScheduler, to be run with guidance_scale=1.0)."""
    config = json.loads((Path(local_dir) / "scheduler" / "scheduler_config.json").read_text())
    return config["_class_name"] == "PiflowScheduler"


def k6_row_rules(local_dir: str | Path) -> dict:
    """What a row needs beyond the spec's limits (as `pipelines.limits.k5_row_rules` for Kandinsky 5)."""
    return {
        "min_frames": 1, "sizes": None, "image": "optional",
        "image_resize": "resize to cover (width, height), aspect kept, center crop",
        "default_negative_prompt": K6_DEFAULT_NEGATIVE_PROMPT, "template_tokens": K6_CROP_START,
        "frame_rate": FRAME_RATE, "guidance_scale": 1.0 if k6_distilled(local_dir) else None,
    }


def k6_negative_prompt(negative_prompt: str | None, guidance_scale: float) -> str | None:
    """The negative prompt the pipeline really uses: none without guidance, its default if None or empty."""
    if not guided(guidance_scale):
        return None
    return negative_prompt or K6_DEFAULT_NEGATIVE_PROMPT


def k6_request_problem(request, distilled: bool) -> str | None:
    """Why a `RenderRequest` cannot be rendered exactly as asked beyond the spec's limits ("field=value: rule")."""
    if distilled and request.guidance_scale != 1.0:
        return (f"guidance_scale={request.guidance_scale}: a distilled Kandinsky 6 checkpoint (PiflowScheduler) "
                "runs without guidance (rule: guidance_scale=1.0)")
    return None


def k6_option_problems(options: RenderOptions) -> list[str]:
    """Why render options cannot apply to Kandinsky 6 ("option=value: reason" each); empty if they can."""
    found = []
    for name in ("cache", "cache_args", "batched_guidance", "nabla_args"):
        if value := getattr(options, name):
            found.append(f"{name}={value!r}: not supported for Kandinsky 6 (pipelines.render_k6 runs the plain "
                         "pipeline call)")
    if options.attention_type not in (None, "regular"):
        found.append(f"attention_type={options.attention_type!r}: Kandinsky 6 has full attention only")
    if options.attention_backend in MASKLESS_BACKENDS:
        found.append(f"attention_backend={options.attention_backend!r}: Kandinsky 6 masks its padded prompt tokens "
                     "and this backend cannot apply that mask (use native or a varlen one)")
    if options.expand_prompts and options.offload_text_encoder:
        found.append("expand_prompts=True: with offload_text_encoder=True every generated token (up to "
                     f"{K6_MAX_SEQUENCE_LENGTH} a row) would stream the whole text encoder to the GPU again "
                     "(use one or the other)")
    return found


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

        from pipelines.models import resolve_model
        from pipelines.render import _hidden_states_only, default_device

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
        _hidden_states_only(self.pipe.text_encoder)
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
            transformer.set_attention_backend(options.attention_backend)
        if options.compile:
            transformer.compile_repeated_blocks(fullgraph=True)  # its text and fused video/audio blocks

    def _offload_text_encoders(self) -> None:
        """Text encoders in pinned CPU memory, streamed in layer by layer while they encode (as `Renderer`)."""
        from pipelines.render import offload_text_encoders

        offload_text_encoders(self.pipe, self.device)

    def check(self, request: RenderRequest) -> None:
        """ValueError ("field=value: rule") for a request this model cannot render exactly as asked."""
        if problem := k6_request_problem(request, self.distilled):
            raise ValueError(problem)

    def render(self, request: RenderRequest):
        """Frames (num_frames, height, width, 3) uint8 and the waveform (1, samples) float32, per the seed contract;
        with `options.expand_prompts` the Clip carries the expanded prompt too (and no waveform in video-only mode)."""
        import torch

        from pipelines.render import decode_image, frames_uint8

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
