"""Pick the renderer for a `model.path`: the real diffusers pipeline, or the simulated stand-in."""

from __future__ import annotations

from pipelines.models import SIMULATED


def open_renderer(model_path: str, *, storage_options: dict | None = None, device: str | None = None,
                  options=None):
    """A loaded renderer with `.render(request) -> frames`, `.device`, `.options` and `.load_seconds`."""
    if model_path.startswith(SIMULATED):
        from pipelines.simulated import SimulatedRenderer

        return SimulatedRenderer(model_path, options=options)
    from pipelines.kinds import kind_of
    from pipelines.models import resolve_model
    from pipelines.request import RenderOptions

    kind = kind_of(resolve_model(model_path, storage_options, spec_only=True)).name
    if kind == "ti2va":
        from pipelines.render_k6 import K6Renderer as Renderer
    elif kind == "sr":
        from pipelines.render_sr import SRRenderer as Renderer
    else:
        from pipelines.render import Renderer  # the Kandinsky 5 family
    renderer = Renderer(model_path, device=device, storage_options=storage_options, options=options or RenderOptions())
    renderer.apply_options()
    return renderer
