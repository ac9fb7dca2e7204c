"""What to render: the request type shared by every renderer (no torch here, so it imports cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.cost import guided

# The pipeline's own fallback when `negative_prompt` is None and guidance is on; recorded in the
# manifest as the effective negative prompt (a test checks it equals what diffusers uses).
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
    "deformed, walking backwards"
)
# Kandinsky 6's fallback, for a `negative_prompt` None or empty when guidance is on.
K6_DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)


@dataclass(frozen=True)
class RenderRequest:
    """One video to render; argument names follow diffusers."""

    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    image: bytes | None = None
    """The conditioning image's encoded file bytes (image-to-video, Kandinsky 6's first frame), or None."""
    video: object = None
    """The source clip of an upscale (super-resolution): uint8 frames (F, H, W, 3), or a `kinds.Clip` with its
    sound; `height`, `width` and `num_frames` are then the output's."""

    def effective_negative_prompt(self) -> str | None:
        """The negative prompt the pipeline really uses: none without guidance, its default if unset."""
        if not guided(self.guidance_scale):
            return None
        return DEFAULT_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


CACHES = ("magcache", "firstblock", "taylorseer")
ATTENTION_TYPES = ("regular", "nabla")
NABLA_ARGS = ("P", "wT", "wH", "wW")


@dataclass(frozen=True)
class RenderOptions:
    """How a replica renders: speed options, all off by default. Each non-default one is recorded per row."""

    attention_backend: str | None = None
    """diffusers attention dispatch backend (`native`, `_native_cudnn`, `flash`, `sage`, `flex`, ...); None: default."""
    compile: bool = False
    """Regional `torch.compile` of the repeated transformer blocks (exact up to kernel numerics)."""
    batched_guidance: bool = False
    """Cond and uncond in one forward of batch 2 when their text lengths match (same math; within ±1 level)."""
    offload_text_encoder: bool = False
    """Keep the text encoders on the CPU between encodings (for Pro and 10 s clips when memory is tight)."""
    cache: str | None = None
    """Step caching through diffusers hooks: `magcache`, `firstblock` or `taylorseer`. APPROXIMATE: skips work."""
    cache_args: tuple = ()
    """(key, value) pairs for the diffusers cache config, e.g. (("threshold", 0.1),); see pipelines.caching."""
    attention_type: str | None = None
    """`regular` (full attention) or `nabla` (block-sparse, APPROXIMATE); None: the checkpoint's own."""
    nabla_args: tuple = ()
    """(key, value) pairs overriding NABLA's P (attention mass kept) and wT/wH/wW (STA window)."""
    sample_audio: bool = True
    """Kandinsky 6: denoise sound with the frames (True) or render video alone (other frames, no sound)."""
    resolution_scale: float | None = None
    """Kandinsky 6 SR: 2, 2.25 or 4 times the source's size; None: the pipeline's default (2.25)."""
    expand_prompts: bool = False
    """Kandinsky 6: rewrite each prompt with its Qwen2.5-VL text encoder first (the pipeline's `expand_prompts`,
    seeded from the row's seed); the render then encodes the expanded prompt."""

    @property
    def approximate(self) -> bool:
        """Whether frames approximate the model's full computation: step caching skips work, NABLA skips keys."""
        return self.cache is not None or self.attention_type == "nabla"

    def for_model(self, shipped_attention: str) -> "RenderOptions":
        """These options with what the checkpoint implies made explicit, so the manifest records it.

        A NABLA model (shipped or switched on) always runs flex attention, the one backend that takes
        its block mask; `regular` on a regular checkpoint is no change, so it is not recorded.
        """
        from dataclasses import replace

        kind = self.attention_type or shipped_attention
        if kind == "nabla":
            return replace(self, attention_type="nabla", attention_backend=self.attention_backend or "flex")
        return replace(self, attention_type=None if shipped_attention == "regular" else "regular")

    def recorded(self) -> dict:
        """The non-default options, as the manifest records them."""
        defaults = RenderOptions()
        return {k: (dict(v) if k in ("cache_args", "nabla_args") else v) for k, v in self.__dict__.items()
                if v != getattr(defaults, k)}
