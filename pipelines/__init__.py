"""Model adapters over diffusers: turn render requests into frames. Knows nothing of Ray or storage.

Names are loaded on first use, so that importing the package (e.g. for `RenderRequest`) stays cheap
and does not pull torch and diffusers into every process.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_NEGATIVE_PROMPT": "pipelines.request", "RenderRequest": "pipelines.request",
    "RenderOptions": "pipelines.request", "CACHES": "pipelines.request",
    "ModelSpec": "pipelines.models", "SIMULATED": "pipelines.kinds", "TINY": "pipelines.resolve",
    "cache_root": "pipelines.resolve", "load_spec": "pipelines.models", "resolve_model": "pipelines.resolve",
    "Renderer": "pipelines.render", "default_device": "pipelines.render_common", "to_uint8": "pipelines.render_common",
    "build_tiny_pipeline": "pipelines.tiny", "ensure_tiny": "pipelines.tiny", "save_tiny": "pipelines.tiny",
    "open_renderer": "pipelines.factory", "ParallelSpec": "pipelines.shape", "SHARD_TOLERANCE": "pipelines.shape",
    "CPU_NUMERICS_ENV": "pipelines.numerics", "cpu_numerics_env": "pipelines.numerics",
    "weights_fingerprint": "pipelines.weights",
    "QUIET_ENV": "pipelines.console", "quiet_progress": "pipelines.console",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
