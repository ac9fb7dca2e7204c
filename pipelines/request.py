"""What to render: the request type shared by every renderer (no torch here, so it imports cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

# The pipeline's own fallback when `negative_prompt` is None and guidance is on; recorded in the
# manifest as the effective negative prompt (a test checks it equals what diffusers uses).
DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
    "deformed, walking backwards"
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

    def effective_negative_prompt(self) -> str | None:
        """The negative prompt the pipeline really uses: none without guidance, its default if unset."""
        if self.guidance_scale <= 1.0:
            return None
        return DEFAULT_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt
