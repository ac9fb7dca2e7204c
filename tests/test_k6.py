"""Kandinsky 6 in the model layer: the tiny-k6 preset is a real diffusers checkpoint, and K6Renderer keeps the seed
contract for frames and sound."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Kandinsky6TI2VAPipeline
from PIL import Image

from pipelines.limits_k6 import (
    K6_CROP_START, K6_DEFAULT_NEGATIVE_PROMPT, K6_MAX_SEQUENCE_LENGTH, K6_PROMPT_TEMPLATE, audio_samples,
    k6_count_tokens, k6_negative_prompt, k6_row_rules, k6_spec_fields,
)
from pipelines.render_k6 import K6Renderer
from pipelines.request import DEFAULT_NEGATIVE_PROMPT, RenderOptions, RenderRequest
from pipelines.resolve import resolve_model
from pipelines.tiny_k6 import QWEN_VL_CHAT_TEMPLATE, build_tiny_k6_pipeline


@pytest.fixture(scope="module")
def k6_dir(model_cache) -> Path:
    """The preset as every job gets it (`resolve_model`: built by its builder, saved, cached per node)."""
    return Path(resolve_model("tiny-k6"))


@pytest.fixture(scope="module")
def k6_pipe(k6_dir):
    """The plain diffusers pipeline, loaded as any checkpoint is: the oracle."""
    pipe = Kandinsky6TI2VAPipeline.from_pretrained(k6_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def renderer(k6_dir):
    return K6Renderer(str(k6_dir), device="cpu")


def _png(seed: int, height: int = 40, width: int = 56) -> bytes:
    """A random RGB image of another size than the video, encoded as PNG (the pipeline resizes and crops it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _plain(pipe, request: RenderRequest, **kwargs):
    """What plain diffusers gives for the request: uint8 frames and the waveform as (1, samples) (None without sound).

    `kwargs` go to the call as they are (`expand_prompts=True`, `sample_audio=False`, another `prompt`).
    """
    image = None if request.image is None else Image.open(io.BytesIO(request.image)).convert("RGB")
    args = dict(prompt=request.prompt, image=image, negative_prompt=request.negative_prompt, height=request.height,
                width=request.width, num_frames=request.num_frames, num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale, generator=torch.Generator("cpu").manual_seed(request.seed),
                output_type="np")
    out = pipe(**{**args, **kwargs})
    return np.round(out.frames[0] * 255).astype(np.uint8), None if out.audio is None else out.audio[:1]


def test_tiny_k6_round_trips_through_diffusers_format(k6_dir, k6_pipe):
    index = json.loads((k6_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Kandinsky6TI2VAPipeline"
    assert index["transformer"] == ["diffusers", "Kandinsky6Transformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLHunyuanVideo"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "Qwen2_5_VLProcessor"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["audio_vae"] == ["diffusers", "MMAudioVAE"]
    assert index["vocoder"] == ["diffusers", "MMAudioVocoder"]
    assert not list(k6_dir.rglob("*.bin")), "weights must be safetensors"
    assert k6_pipe.tokenizer.chat_template == QWEN_VL_CHAT_TEMPLATE  # saved with the processor: prompts can expand
    built = build_tiny_k6_pipeline(0)  # deterministic: a second build has the saved weights
    for name in ("transformer", "audio_vae", "vocoder", "vae", "text_encoder"):
        saved, again = getattr(k6_pipe, name).state_dict(), getattr(built, name).state_dict()
        assert saved.keys() == again.keys(), name
        assert all(torch.equal(saved[k], again[k]) for k in saved), name


@pytest.mark.parametrize("seed", [0, 2**63 - 1])
@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_renderer_equals_plain_diffusers(seed, image, guidance_scale, renderer, k6_pipe):
    request = RenderRequest("a cat dancing in the rain", None, 32, 32, 5, 2, guidance_scale, seed,
                            image=_png(seed) if image else None)
    clip = renderer.render(request)
    frames, audio = _plain(k6_pipe, request)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (5, 32, 32, 3)
    assert clip.audio.dtype == np.float32 and clip.audio.shape == audio.shape == (1, 9216)
    assert clip.sample_rate == 44_100
    assert np.array_equal(clip.frames, frames)
    assert np.array_equal(clip.audio, audio)


def test_seeds_and_images_change_frames_and_sound(renderer):
    base = RenderRequest("a dog running on the beach", "blurry", 32, 48, 5, 2, 1.0, 0)
    clips = [renderer.render(base), renderer.render(RenderRequest(**{**base.__dict__, "seed": 1})),
             renderer.render(RenderRequest(**{**base.__dict__, "image": _png(3)}))]
    assert clips[0].frames.shape == (5, 32, 48, 3)
    for other in clips[1:]:
        assert not np.array_equal(clips[0].frames, other.frames)
        assert not np.array_equal(clips[0].audio, other.audio)  # the image reaches the sound: cross-modal blocks


def test_default_negative_prompt_is_what_diffusers_uses(renderer):
    assert K6_DEFAULT_NEGATIVE_PROMPT == Kandinsky6TI2VAPipeline._DEFAULT_NEGATIVE_PROMPT == DEFAULT_NEGATIVE_PROMPT
    base = RenderRequest("a cat", None, 32, 32, 5, 2, 5.0, 1)
    unset = renderer.render(base)
    for negative in (K6_DEFAULT_NEGATIVE_PROMPT, ""):  # the pipeline takes `negative_prompt or default`
        named = renderer.render(RenderRequest(**{**base.__dict__, "negative_prompt": negative}))
        assert np.array_equal(unset.frames, named.frames) and np.array_equal(unset.audio, named.audio), negative
        assert k6_negative_prompt(negative, 5.0) == K6_DEFAULT_NEGATIVE_PROMPT
    assert k6_negative_prompt(None, 5.0) == K6_DEFAULT_NEGATIVE_PROMPT and k6_negative_prompt("x", 1.0) is None


def test_image_orientation_follows_exif(renderer, k6_pipe):
    """A phone JPEG stored sideways with an EXIF orientation conditions the first frame upright, as diffusers'
    `load_image` (the decoder every kind shares, pipelines.render_common.decode_image) reads it."""
    from PIL import ImageOps

    pixels = np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif)
    request = RenderRequest("a cat", None, 32, 48, 5, 2, 1.0, 5, image=buffer.getvalue())
    clip = renderer.render(request)
    stored = Image.open(io.BytesIO(request.image))
    upright, sideways = (k6_pipe(prompt="a cat", image=image.convert("RGB"), height=32, width=48, num_frames=5,
                                 num_inference_steps=2, guidance_scale=1.0,
                                 generator=torch.Generator("cpu").manual_seed(5), output_type="np")
                         for image in (ImageOps.exif_transpose(stored), stored))
    assert np.array_equal(clip.frames, np.round(upright.frames[0] * 255).astype(np.uint8))
    assert np.array_equal(clip.audio, upright.audio[:1])
    assert not np.array_equal(clip.audio, sideways.audio[:1])  # the orientation matters to the render


def test_audio_covers_the_video_in_whole_latents(renderer):
    """The waveform lasts num_frames / 24 s rounded up to whole 1024-sample audio latents."""
    for num_frames in (1, 9):
        clip = renderer.render(RenderRequest("waves", None, 32, 32, num_frames, 1, 1.0, 0))
        samples = clip.audio.shape[1]
        assert samples == audio_samples(num_frames, 44_100) == -(-num_frames * 44_100 // (24 * 1024)) * 1024
        assert num_frames / 24 * 44_100 <= samples < num_frames / 24 * 44_100 + 1024
    assert audio_samples(121, 44_100) == 223_232  # a 5 s clip of the real checkpoints: 5.062 s of sound


def test_frame_rate_sets_the_sound_and_so_the_frames(k6_pipe):
    """Video and audio are denoised together: a longer soundtrack for the same frames changes the frames too."""
    outs = {rate: k6_pipe(prompt="waves", height=32, width=32, num_frames=5, frame_rate=rate, num_inference_steps=2,
                          guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
            for rate in (24.0, 12.0)}
    assert outs[12.0].audio.shape[1] == audio_samples(5, 44_100, frame_rate=12.0) == 2 * outs[24.0].audio.shape[1]
    assert not np.array_equal(np.round(outs[12.0].frames * 255), np.round(outs[24.0].frames * 255))


def test_image_is_resized_to_cover_and_center_cropped(k6_pipe):
    """A 32x64 image for a 32x32 video keeps its aspect and loses its left and right quarters (K5 I2V stretches)."""
    pixels = np.random.default_rng(8).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    edited = pixels.copy()
    edited[:, :16], edited[:, 48:] = 0, 255
    outs = [k6_pipe(prompt="a cat", image=Image.fromarray(p), height=32, width=32, num_frames=5, num_inference_steps=2,
                    guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
            for p in (pixels, edited)]
    assert np.array_equal(outs[0].frames, outs[1].frames) and np.array_equal(outs[0].audio, outs[1].audio)


# -- prompt expansion: the pipeline's own `expand_prompts`, 1024 greedy tokens of the tiny encoder (~3.5 s each) ----

CAT = RenderRequest("a cat dancing in the rain", None, 32, 32, 5, 2, 5.0, 11)


@pytest.fixture(scope="module")
def cat_expanded(k6_pipe) -> str:
    """CAT's prompt expanded by a direct call of the pipeline's staticmethod, as its docstring shows."""
    generator = torch.Generator("cpu").manual_seed(CAT.seed)
    state = generator.get_state()
    expanded = Kandinsky6TI2VAPipeline.expand_prompts(CAT.prompt, k6_pipe.tokenizer, k6_pipe.text_encoder,
                                                      torch.device("cpu"), generator=generator)
    assert torch.equal(generator.get_state(), state)  # it reads the seed and draws nothing: the noise is unchanged
    return expanded


def test_expanded_prompts_render_as_plain_diffusers_expands_them(renderer, k6_pipe, k6_dir, cat_expanded,
                                                                 monkeypatch):
    monkeypatch.setattr(renderer, "options", RenderOptions(expand_prompts=True))
    clip = renderer.render(CAT)
    assert clip.prompt == cat_expanded != CAT.prompt
    frames, audio = _plain(k6_pipe, CAT, expand_prompts=True)
    assert np.array_equal(clip.frames, frames) and np.array_equal(clip.audio, audio)
    assert clip.sample_rate == 44_100 and clip.audio.shape == (1, 9216)
    # The tiny encoder's rewrite outgrows the prompt window: the pipeline cuts it as any prompt, and so do we.
    assert k6_count_tokens(str(k6_dir / "tokenizer"), [cat_expanded])[0] > K6_MAX_SEQUENCE_LENGTH


def test_expansion_sees_the_image_and_works_without_sound(renderer, k6_pipe, cat_expanded, monkeypatch):
    """With an image the pipeline asks for a rewrite grounded on it (the I2VA instruction, the image in the chat);
    in video-only mode the render is a Clip of frames and the rewrite, without a waveform."""
    request = RenderRequest(**{**CAT.__dict__, "image": _png(CAT.seed), "guidance_scale": 1.0})
    monkeypatch.setattr(renderer, "options", RenderOptions(expand_prompts=True, sample_audio=False))
    clip = renderer.render(request)
    assert clip.audio is None and clip.sample_rate is None
    assert clip.prompt not in (request.prompt, cat_expanded)
    # What it expanded to is the returned prompt: rendering that prompt plainly gives the same frames (the test above
    # checks a whole expanded call against plain diffusers; one 1024-token expansion is enough here).
    frames, audio = _plain(k6_pipe, request, prompt=clip.prompt, sample_audio=False)
    assert audio is None and np.array_equal(clip.frames, frames)


def test_the_expansion_gets_the_rows_seed_and_image_and_the_pipelines_length(renderer, monkeypatch):
    """The tiny encoder decodes greedily, so the seed cannot show in its rewrites: what the renderer hands the
    pipeline's `expand_prompts` is checked instead (a checkpoint whose generation config samples draws from the
    global torch RNG, which diffusers seeds from `generator`)."""
    import inspect

    calls = []

    def expand(prompt, tokenizer, text_encoder, device, image=None, max_sequence_length=1024, generator=None):
        calls.append(dict(prompt=prompt, tokenizer=tokenizer, text_encoder=text_encoder, device=device, image=image,
                          max_sequence_length=max_sequence_length, seed=generator.initial_seed()))
        return f"{prompt}, rewritten"

    monkeypatch.setattr(Kandinsky6TI2VAPipeline, "expand_prompts", staticmethod(expand))
    monkeypatch.setattr(renderer, "options", RenderOptions(expand_prompts=True))
    clip = renderer.render(RenderRequest("a cat", None, 32, 32, 5, 1, 1.0, 2**63 - 1, image=_png(1)))
    [call] = calls
    assert clip.prompt == "a cat, rewritten" and call["prompt"] == "a cat" and call["seed"] == 2**63 - 1
    assert call["tokenizer"] is renderer.pipe.tokenizer and call["text_encoder"] is renderer.pipe.text_encoder
    assert call["device"] == renderer.pipe._execution_device and call["image"].size == (56, 40)
    default = inspect.signature(Kandinsky6TI2VAPipeline.__call__).parameters["max_sequence_length"].default
    assert call["max_sequence_length"] == default == K6_MAX_SEQUENCE_LENGTH


def test_spec_fields_and_row_rules_read_from_configs(k6_dir):
    assert k6_spec_fields(k6_dir) == dict(
        attention_type="regular", num_heads=4, spatial_multiple=16, temporal_multiple=4, max_frames=509,
        max_size=2048, max_prompt_tokens=1024, audio_sample_rate=44_100,
    )
    rules = k6_row_rules(k6_dir)
    assert rules["image"] == "optional" and rules["guidance_scale"] is None  # sft: any guidance
    assert rules["default_negative_prompt"] == K6_DEFAULT_NEGATIVE_PROMPT and rules["template_tokens"] == 129


def test_template_constants_are_diffusers_own():
    from diffusers.pipelines.kandinsky6 import pipeline_kandinsky6_ti2va as k6

    assert K6_PROMPT_TEMPLATE == k6._PROMPT_TEMPLATE and K6_CROP_START == k6._QWEN_CROP_START
    assert K6_MAX_SEQUENCE_LENGTH == 1024


def _kept(pipe, prompt: str) -> tuple[int, bool]:
    """Tokens of the prompt window the pipeline keeps (its own tokenizer call), and whether the prompt was cut."""
    ids = pipe.tokenizer(text=[K6_PROMPT_TEMPLATE.format(prompt)], images=None, videos=None,
                         max_length=K6_MAX_SEQUENCE_LENGTH + K6_CROP_START, truncation=True,
                         return_tensors="pt", padding="max_length")
    kept = int(ids["attention_mask"].sum()) - K6_CROP_START
    last = ids["input_ids"][0, K6_CROP_START + kept - 1]
    return kept, int(last) != pipe.tokenizer.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_token_count_is_the_pipelines_own(k6_dir, k6_pipe):
    """Exact where the Kandinsky 5 count (cleaned prompt + 1) is not: K6 tokenizes the prompt as given."""
    from pipelines.models import ModelSpec

    tricky = ["a cat", " a cat", "\na cat", "a  cat\n\n", "&amp; fish &lt;3", "émigré — naïve", "", "x" * 3000]
    counts = k6_count_tokens(str(k6_dir / "tokenizer"), tricky)
    for prompt, count in zip(tricky, counts):
        assert _kept(k6_pipe, prompt) == (min(count, 1024), count > 1024), prompt
    k5 = ModelSpec(path="k5", attention_type="regular", num_heads=4, spatial_multiple=16, temporal_multiple=4,
                   max_frames=509, max_size=2048, max_prompt_tokens=512, tokenizer_dir=str(k6_dir / "tokenizer"))
    assert k5.count_tokens(["a cat"]) == counts[:1]
    assert k5.count_tokens(["\na cat", "a  cat\n\n", "&amp; fish &lt;3"]) != counts[2:5]
    words = "zebra " * 2000
    lo, hi = 1, 2000  # the longest prefix of whole words the pipeline keeps whole
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if k6_count_tokens(str(k6_dir / "tokenizer"), [words[: 6 * mid]])[0] <= 1024 else (lo, mid - 1)
    fits, over = words[: 6 * lo], words[: 6 * (lo + 1)]
    assert _kept(k6_pipe, fits) == (k6_count_tokens(str(k6_dir / "tokenizer"), [fits])[0], False)
    assert _kept(k6_pipe, over) == (1024, True)


def test_spec_and_count_need_no_torch(k6_dir):
    code = ("import sys; from pipelines.limits_k6 import k6_count_tokens, k6_spec_fields; "
            f"k6_spec_fields({str(k6_dir)!r}); k6_count_tokens({str(k6_dir / 'tokenizer')!r}, ['a cat']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("option", [dict(cache="firstblock"), dict(batched_guidance=True),
                                    dict(attention_type="nabla"), dict(attention_backend="flash"),
                                    dict(attention_backend="flex"),
                                    dict(expand_prompts=True, offload_text_encoder=True)])
def test_options_it_cannot_honour_are_refused_by_name(option, renderer, monkeypatch):
    name, value = next(iter(option.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):  # before any weights load
        K6Renderer("/nonexistent", device="cpu", options=RenderOptions(**option))
    monkeypatch.setattr(renderer, "options", RenderOptions(**option))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        renderer.apply_options()


def test_native_attention_backend_keeps_the_contract(k6_dir, k6_pipe):
    renderer = K6Renderer(str(k6_dir), device="cpu", options=RenderOptions(attention_backend="native",
                                                                            attention_type="regular"))
    renderer.apply_options()
    request = RenderRequest("a cat", "dull", 32, 32, 5, 2, 4.0, 7, image=_png(7))
    clip = renderer.render(request)
    frames, audio = _plain(k6_pipe, request)
    assert np.array_equal(clip.frames, frames) and np.array_equal(clip.audio, audio)


@pytest.fixture(scope="module")
def transformer(k6_dir):
    from diffusers import Kandinsky6Transformer3DModel

    return Kandinsky6Transformer3DModel.from_pretrained(k6_dir / "transformer")


def _forward(transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising call on fixed random inputs, two of six prompt tokens padded: (video, audio) velocities."""
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 2, 4, 4, 2 * config.in_visual_dim + 1, generator=generator),
            audio_hidden_states=torch.randn(1, 5, config.in_audio_dim, generator=generator),
            encoder_hidden_states=torch.randn(1, 6, config.in_text_dim, generator=generator),
            pooled_projections=torch.randn(1, config.in_text_dim2, generator=generator),
            timestep=torch.tensor([500.0]), encoder_attention_mask=torch.tensor([[True] * 4 + [False] * 2]),
            return_dict=False,
        )


@pytest.mark.parametrize("name, skip, changes", [
    ("video_text_transformer_blocks.0", lambda args, out: args[0], "both"),  # the video text reaches the sound
    ("audio_text_transformer_blocks.0", lambda args, out: args[0], "both"),
    ("visual_transformer_blocks.0", lambda args, out: args[:2], "both"),
    ("visual_transformer_blocks.1", lambda args, out: args[:2], "both"),
    ("visual_transformer_blocks.1.va_cross_attention", lambda args, out: out * 0, "video"),
    ("visual_transformer_blocks.1.av_cross_attention", lambda args, out: out * 0, "audio"),
])
def test_every_block_shapes_the_output(name, skip, changes, transformer):
    """Skipping a block changes what the tiny model predicts; the last block's cross-modal attentions each change
    only the modality that queries (an earlier one reaches both through the blocks after it)."""
    video, audio = _forward(transformer)
    handle = transformer.get_submodule(name).register_forward_hook(lambda module, args, out: skip(args, out))
    try:
        skipped_video, skipped_audio = _forward(transformer)
    finally:
        handle.remove()
    assert (not torch.equal(video, skipped_video)) == (changes in ("video", "both"))
    assert (not torch.equal(audio, skipped_audio)) == (changes in ("audio", "both"))


def test_flex_attention_cannot_take_the_prompt_mask(transformer):
    """Why `flex` is refused: diffusers 0.42.1 reads the (batch, keys) mask as a query mask."""
    from pipelines.render_common import set_attention_backend

    set_attention_backend(transformer, "flex")  # this model only: diffusers' own call also sets the process default
    try:
        with pytest.raises(RuntimeError, match="expanded size"):
            _forward(transformer)
    finally:
        set_attention_backend(transformer, "native")


def test_distilled_variant_renders_with_piflow(tmp_path_factory):
    """The distilled checkpoints' layout: PiflowScheduler and a transformer head of n_grid outputs per channel."""
    directory = tmp_path_factory.mktemp("tiny-k6-distilled")
    build_tiny_k6_pipeline(0, distilled=True).save_pretrained(directory, safe_serialization=True)
    assert json.loads((directory / "model_index.json").read_text())["scheduler"] == ["diffusers", "PiflowScheduler"]
    pipe = Kandinsky6TI2VAPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    request = RenderRequest("a cat", None, 32, 32, 5, 2, 1.0, 3, image=_png(3))
    renderer = K6Renderer(str(directory), device="cpu")
    clip = renderer.render(request)
    frames, audio = _plain(pipe, request)
    assert np.array_equal(clip.frames, frames) and np.array_equal(clip.audio, audio)
    assert k6_row_rules(directory)["guidance_scale"] == 1.0
    with pytest.raises(ValueError, match="guidance_scale=5.0"):
        renderer.render(RenderRequest(**{**request.__dict__, "guidance_scale": 5.0}))
