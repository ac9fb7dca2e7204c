"""Model adapters over diffusers: turn render requests into frames. Knows nothing of Ray or storage."""

from pipelines.models import TINY, ModelSpec, cache_root, load_spec, resolve_model
from pipelines.render import DEFAULT_NEGATIVE_PROMPT, RenderRequest, Renderer, default_device, to_uint8
from pipelines.tiny import build_tiny_pipeline, ensure_tiny, save_tiny

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT", "ModelSpec", "RenderRequest", "Renderer", "TINY", "build_tiny_pipeline",
    "cache_root", "default_device", "ensure_tiny", "load_spec", "resolve_model", "save_tiny", "to_uint8",
]
