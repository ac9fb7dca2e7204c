"""The NABLA oracle, shared by the model-layer, gang-job and NABLA tests (tests/test_parallel.py, test_gangs.py,
test_nabla.py): plain diffusers with NABLA switched on as its docs say, loaded once per session."""

from __future__ import annotations

import pytest


def enable_nabla_as_documented(pipe) -> None:
    """NABLA on a plain pipeline with diffusers' own processors (the oracle never runs ours)."""
    from pipelines.nabla import NABLA_DEFAULTS
    from pipelines.render_common import set_attention_backend

    pipe.transformer.register_to_config(attention_type="nabla",
                                        **{f"attention_{k}": v for k, v in NABLA_DEFAULTS.items()})
    pipe.transformer.attention_type = "nabla"
    # `pipe.transformer.set_attention_backend("flex")`, which also makes flex the process default for every model
    # loaded later (the other tests' oracles): the helper calls it and puts the default back.
    set_attention_backend(pipe.transformer, "flex")


@pytest.fixture(scope="session")
def nabla_pipe(model_cache):
    """Plain diffusers with NABLA switched on the way its docs say: config + flex backend."""
    from diffusers import Kandinsky5T2VPipeline

    from pipelines import resolve_model

    pipe = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    enable_nabla_as_documented(pipe)
    return pipe
