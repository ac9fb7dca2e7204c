"""Fault injection for tests, installed in every Ray worker by the session Ray's `worker_process_setup_hook`.

A prompt containing EXPLODE makes the real renderer raise inside the actor, as a pipeline bug or a CUDA OOM
for that size would; every other prompt renders normally.
"""

MARKER = "EXPLODE"


def install() -> None:
    from pipelines import render

    original = render.Renderer.render

    def render_or_explode(self, request):
        if MARKER in request.prompt:
            raise RuntimeError(f"injected failure for prompt {request.prompt!r}")
        return original(self, request)

    render.Renderer.render = render_or_explode
