"""Pick the renderer for a `model.path`: its kind's registry entry names it (`Kind.renderer`), imported only here."""

from __future__ import annotations

from pipelines.kinds import SIMULATED, SIMULATED_KIND, kind_of, load
from pipelines.request import RenderOptions
from pipelines.resolve import resolve_model


def open_renderer(model_path: str, *, storage_options: dict | None = None, device: str | None = None,
                  options=None):
    """A loaded renderer with `.render(request) -> frames`, `.device`, `.options` and `.load_seconds`."""
    if model_path.startswith(SIMULATED):
        return load(SIMULATED_KIND.renderer)(model_path, options=options)
    kind = kind_of(resolve_model(model_path, storage_options, spec_only=True))
    renderer = load(kind.renderer)(model_path, device=device, storage_options=storage_options,
                                   options=options or RenderOptions())
    renderer.apply_options()
    return renderer
