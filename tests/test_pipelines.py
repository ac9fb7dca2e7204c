"""The model layer: the tiny preset is a real diffusers checkpoint, and Renderer keeps the seed contract."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import DEFAULT_NEGATIVE_PROMPT, RenderRequest, Renderer, load_spec, resolve_model, save_tiny
from tests.helpers import oracle


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A build of `tiny` of this process's own, saved apart from the node cache's."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def renderer(model_cache) -> Renderer:
    return Renderer("tiny")


def test_tiny_saves_in_diffusers_format_with_the_real_component_classes(built):
    index = json.loads((built / "model_index.json").read_text())
    assert index["_class_name"] == "Kandinsky5T2VPipeline"
    assert index["transformer"] == ["diffusers", "Kandinsky5Transformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLHunyuanVideo"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "Qwen2VLProcessor"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert list((built / "transformer").glob("*.safetensors")), "weights must be safetensors"
    assert not list(built.rglob("*.bin"))


def test_tiny_build_is_deterministic(built, model_cache):
    """Two builds give identical weights, so every node's cached `tiny` is the same model."""
    cached = resolve_model("tiny")
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        [a] = (built / component).glob("*.safetensors")
        [b] = (Path(cached) / component).glob("*.safetensors")
        assert a.read_bytes() == b.read_bytes(), component


@pytest.mark.parametrize("request_", [
    RenderRequest("a cat dancing", None, 32, 32, 5, 2, 5.0, 0),
    RenderRequest("a dog running on the beach", "blurry", 48, 32, 9, 3, 3.5, 2**63 - 1),
    RenderRequest("no guidance", None, 32, 48, 1, 2, 1.0, 12345),
])
def test_renderer_equals_plain_diffusers(request_, renderer, tiny_pipe):
    frames = renderer.render(request_)
    assert frames.dtype == np.uint8
    assert frames.shape == (request_.num_frames, request_.height, request_.width, 3)
    row = {**request_.__dict__}
    assert np.array_equal(frames, oracle(tiny_pipe, row))


def test_default_negative_prompt_is_what_diffusers_uses(tiny_pipe):
    base = dict(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    unset = tiny_pipe(**base, negative_prompt=None, generator=torch.Generator("cpu").manual_seed(1), output_type="np")
    named = tiny_pipe(**base, negative_prompt=DEFAULT_NEGATIVE_PROMPT, generator=torch.Generator("cpu").manual_seed(1),
                      output_type="np")
    assert np.array_equal(unset.frames, named.frames)
    assert RenderRequest("a", None, 32, 32, 5, 2, 5.0, 0).effective_negative_prompt() == DEFAULT_NEGATIVE_PROMPT
    assert RenderRequest("a", "x", 32, 32, 5, 2, 1.0, 0).effective_negative_prompt() is None


def test_spec_reads_limits_without_weights(model_cache):
    spec = load_spec("tiny")
    assert spec.num_heads == 4
    assert spec.spatial_multiple == 16
    assert spec.temporal_multiple == 4
    assert spec.max_prompt_tokens == 512


def _truncation_warned(pipe, prompt: str, caplog) -> bool:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt(prompt, max_sequence_length=512, device="cpu")
    return any("truncated" in r.getMessage() for r in caplog.records)


def test_prompt_token_count_matches_the_pipelines_truncation_rule(tiny_pipe, caplog):
    """A prompt at the limit is kept whole by diffusers; one token more is truncated."""
    spec = load_spec("tiny")
    words = "zebra " * 2000
    # Grow the prompt one word at a time around the limit and find the exact boundary.
    lo, hi = 1, 2000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spec.prompt_tokens(words[: 6 * mid]) <= spec.max_prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    fits, over = words[: 6 * lo], words[: 6 * (lo + 1)]
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.propagate = True
    assert spec.prompt_tokens(fits) <= spec.max_prompt_tokens < spec.prompt_tokens(over)
    assert not _truncation_warned(tiny_pipe, fits, caplog)
    assert _truncation_warned(tiny_pipe, over, caplog)


def test_tiny_loads_with_plain_diffusers(tiny_pipe):
    """`tiny_pipe` is the preset loaded with `Kandinsky5T2VPipeline.from_pretrained` (tests/conftest.py)."""
    pipe = tiny_pipe
    assert type(pipe).__name__ == "Kandinsky5T2VPipeline"
    assert pipe.transformer.config.model_dim == 64


def test_uint8_on_the_frames_device_equals_the_contracts_numpy_rounding():
    """`frames_uint8` (on the GPU in production) gives the bytes `to_uint8` gives on the pipeline's `np` output,
    half-level values included (round half to even in both)."""
    from pipelines.render_common import frames_uint8, to_uint8

    generator = torch.Generator().manual_seed(0)
    video = torch.rand(5, 3, 8, 6, generator=generator)  # (F, C, H, W), as output_type="pt" gives per row
    video[0, 0, 0, :] = torch.tensor([0.5, 1.5, 2.5, 253.5, 254.5, 255.0]) / 255
    for dtype in (torch.float32, torch.bfloat16):
        v = video.to(dtype)
        expected = to_uint8(v.permute(0, 2, 3, 1).float().numpy())  # what diffusers' `np` output goes through
        assert np.array_equal(frames_uint8(v), expected), dtype


def test_a_checkpoint_at_an_object_store_uri_is_copied_once_whole(output_target, model_cache):
    """`model.path` as a URI (file:// or s3://): copied to the node cache once, file for file; a spec-only copy holds
    the configs and tokenizer only."""
    import fsspec

    from pipelines.weights import directory_digest

    uri, options = output_target
    source = resolve_model("tiny")
    fs, root = fsspec.core.url_to_fs(uri, **(options or {}))
    fs.put(f"{source}/", f"{root}/", recursive=True)
    local = resolve_model(uri, options)
    assert directory_digest(local) == directory_digest(source)
    assert resolve_model(uri, options) == local  # once: the cached copy
    spec = Path(resolve_model(uri, options, spec_only=True))
    assert (spec / "model_index.json").exists() and (spec / "tokenizer").is_dir()
    assert not list(spec.rglob("*.safetensors"))  # no weights for validation
