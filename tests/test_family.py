"""The Kandinsky 5 family in the model layer: the tiny I2V, T2I and I2I presets are real diffusers checkpoints of
their kinds, `Renderer` keeps the seed contract for each kind, and the limits match what the pipelines do."""

import inspect
import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import Kandinsky5I2IPipeline, Kandinsky5I2VPipeline, Kandinsky5T2IPipeline
from diffusers.pipelines.kandinsky5.pipeline_kandinsky import prompt_clean
from PIL import Image
from transformers import AutoProcessor

from pipelines import RenderOptions, RenderRequest, Renderer, load_spec, resolve_model, to_uint8
from pipelines.limits import (
    I2I_HEAD_TOKENS, I2I_MAX_SEQUENCE_LENGTH, I2V_MIN_FRAMES, T2I_SIZES, TEMPLATE_TOKENS, image_size,
    k5_i2i_count_tokens, k5_i2i_image_tokens, k5_row_rules, k5_spec_fields,
)
from pipelines.render_common import decode_image
from pipelines.tiny_k5 import build_tiny_k5

CLASSES = {"i2v": Kandinsky5I2VPipeline, "t2i": Kandinsky5T2IPipeline, "i2i": Kandinsky5I2IPipeline}
W, H = T2I_SIZES[1]  # 640x1408: the T2I size with the fewest pixels


@pytest.fixture(scope="module")
def saved(model_cache) -> dict:
    """The presets as every job gets them (`resolve_model`: built by the kind's builder, saved, cached per node)."""
    return {kind: resolve_model(f"tiny-{kind}") for kind in CLASSES}


@pytest.fixture(scope="module")
def plain(saved) -> dict:
    """Plain diffusers, each preset loaded with its own class (the oracle)."""
    pipes = {kind: CLASSES[kind].from_pretrained(path) for kind, path in saved.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def renderers(saved) -> dict:
    return {kind: Renderer(path) for kind, path in saved.items()}


def _png(size: tuple[int, int], seed: int = 0) -> bytes:
    """An encoded RGBA image (width, height) of noise: RGBA, so that decoding must convert it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _flat_png(size: tuple[int, int]) -> bytes:
    """A small file of a large one-colour image (width, height): for limits that need only the size."""
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(buf, "PNG")
    return buf.getvalue()


def _oracle(pipe, request: RenderRequest, **override) -> np.ndarray:
    """The seed contract: what the plain pipeline renders for a request, as uint8 (T2I, I2I: one frame)."""
    kwargs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, height=request.height,
                  width=request.width, num_inference_steps=request.num_inference_steps,
                  guidance_scale=request.guidance_scale, generator=torch.Generator("cpu").manual_seed(request.seed),
                  output_type="np")
    if isinstance(pipe, Kandinsky5T2IPipeline):
        return to_uint8(pipe(**kwargs, **override).image[:1])
    if isinstance(pipe, Kandinsky5I2IPipeline):
        return to_uint8(pipe(**{**kwargs, "image": decode_image(request.image), **override}).image[:1])
    kwargs.update(image=decode_image(request.image), num_frames=request.num_frames)
    return to_uint8(pipe(**{**kwargs, **override}).frames[0])


@pytest.mark.parametrize("kind", ["i2v", "t2i", "i2i"])
def test_preset_round_trips_with_the_real_component_classes(kind, saved, plain):
    index = json.loads(open(f"{saved[kind]}/model_index.json").read())
    assert index["_class_name"] == CLASSES[kind].__name__
    assert index["transformer"] == ["diffusers", "Kandinsky5Transformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLHunyuanVideo" if kind == "i2v" else "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "Qwen2VLProcessor"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    loaded, built = plain[kind], build_tiny_k5(kind)  # `plain`: the preset loaded with its kind's class
    # I2V's transformer takes latents + zero conditioning + first-frame mask (33 channels), as the hub's does;
    # I2I's takes latents + the image's latents + a mask of ones (33 too).
    assert loaded.transformer.config.visual_cond is (kind in ("i2v", "i2i"))
    if kind in ("t2i", "i2i"):
        assert (loaded.vae.config.latent_channels, loaded.vae.config.use_quant_conv) == (16, False)
    if kind == "i2i":  # its Qwen reads the image: a vision tower that fits the processor's patches
        assert loaded.text_encoder.config.vision_config.patch_size == loaded.tokenizer.image_processor.patch_size
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):  # a second build gives the same weights
        want = getattr(built, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


@pytest.mark.parametrize("seed, guidance, negative", [(0, 5.0, None), (2**63 - 1, 3.5, "blurry")])
def test_i2v_equals_plain_diffusers(seed, guidance, negative, renderers, plain):
    request = RenderRequest("a red ball rolling", negative, 32, 32, I2V_MIN_FRAMES, 2, guidance, seed,
                            image=_png((32, 32), seed % 7))
    frames = renderers["i2v"].render(request)
    assert frames.dtype == np.uint8 and frames.shape == (I2V_MIN_FRAMES, 32, 32, 3)
    assert np.array_equal(frames, _oracle(plain["i2v"], request))


def test_i2v_stretches_an_image_of_another_aspect_ratio_to_the_render_size(renderers, plain):
    """A 56x40 image for a 48x32 render: the pipeline resizes it to 48x32 with Lanczos, no crop, aspect not kept."""
    request = RenderRequest("a red ball", None, 32, 48, 21, 2, 5.0, 3, image=_png((56, 40), 1))
    frames = renderers["i2v"].render(request)
    assert frames.shape == (21, 32, 48, 3)
    assert np.array_equal(frames, _oracle(plain["i2v"], request))
    stretched = decode_image(request.image).resize((48, 32), Image.LANCZOS)
    assert np.array_equal(frames, _oracle(plain["i2v"], request, image=stretched))


def test_i2v_rows_and_options(renderers, plain):
    renderer, pipe = renderers["i2v"], plain["i2v"]
    image = _png((32, 32), 2)
    with pytest.raises(ValueError, match=r"^image=None: missing"):
        renderer.render(RenderRequest("a ball", None, 32, 32, 17, 2, 5.0, 0))
    # Fewer than 17 frames: the pipeline's first-frame renormalisation has no later latent frames and gives NaN.
    short = RenderRequest("a ball", None, 32, 32, 13, 2, 5.0, 0, image=image)
    with pytest.raises(ValueError, match=r"^num_frames=13: too few"):
        renderer.render(short)
    with pytest.warns(UserWarning, match="degrees of freedom"):  # the std of an empty reference
        video = pipe(image=decode_image(image), prompt="a ball", height=32, width=32, num_frames=13,
                     num_inference_steps=2, output_type="np").frames
    assert np.isnan(video).any()
    # A batch renders row by row (the pipeline's renormalisation takes statistics over the whole batch): exact.
    batch = [RenderRequest("a ball", None, 32, 32, 17, 2, 5.0, seed, image=_png((32, 32), seed)) for seed in (4, 5)]
    for got, request in zip(renderer.render_batch(batch), batch):
        assert np.array_equal(got, _oracle(pipe, request))
    with pytest.raises(ValueError, match="cache_args.mag_ratios='lite-sft-5s': the published MagCache"):
        Renderer(renderer.model_path, options=RenderOptions(cache="magcache", cache_args=(("mag_ratios", "lite-sft-5s"),)))


def test_i2v_batched_guidance_stays_within_one_level(saved, plain):
    renderer = Renderer(saved["i2v"], options=RenderOptions(batched_guidance=True))
    renderer.apply_options()
    tokens = renderer.pipe.tokenizer.tokenizer
    prompt = "a red ball rolling"
    negative = next(n for n in (" ".join(["blurry"] * k) for k in range(1, 20))
                    if len(tokens(n)["input_ids"]) == len(tokens(prompt)["input_ids"]))
    request = RenderRequest(prompt, negative, 32, 32, 17, 3, 5.0, 8, image=_png((32, 32), 3))
    frames = renderer.render(request)
    assert renderer.steps.batched_steps == request.num_inference_steps
    assert np.abs(frames.astype(int) - _oracle(plain["i2v"], request).astype(int)).max() <= 1


@pytest.mark.parametrize("seed, guidance, negative", [(0, 3.5, None), (7, 3.5, "blurry"), (12345, 1.0, None)])
def test_t2i_equals_plain_diffusers(seed, guidance, negative, renderers, plain):
    """negative_prompt=None with guidance: the Renderer encodes T2I's own default (""), as the pipeline does."""
    request = RenderRequest("a cat in a red hat", negative, H, W, 1, 2, guidance, seed)
    frames = renderers["t2i"].render(request)
    assert frames.dtype == np.uint8 and frames.shape == (1, H, W, 3)
    assert np.array_equal(frames, _oracle(plain["t2i"], request))


def test_t2i_rows_options_and_batches(renderers, plain):
    renderer = renderers["t2i"]
    with pytest.raises(ValueError, match=r"^width x height=32x32: not a T2I size"):
        renderer.render(RenderRequest("a cat", None, 32, 32, 1, 2, 3.5, 0))
    with pytest.raises(ValueError, match=r"^num_frames=5: this model renders one image"):
        renderer.render(RenderRequest("a cat", None, H, W, 5, 2, 3.5, 0))
    with pytest.raises(ValueError, match=r"^image=<\d+ bytes>: the t2i model takes no image"):
        renderer.render(RenderRequest("a cat", None, H, W, 1, 2, 3.5, 0, image=_png((8, 8))))
    with pytest.raises(ValueError, match="attention_type='nabla': does not apply to t2i"):
        Renderer(renderer.model_path, options=RenderOptions(attention_type="nabla"))
    batch = [RenderRequest("a cat", None, H, W, 1, 1, 3.5, seed) for seed in (1, 2)]
    for got, request in zip(renderer.render_batch(batch), batch):
        assert got.shape == (1, H, W, 3)
        assert np.abs(got.astype(int) - _oracle(plain["t2i"], request).astype(int)).max() <= 1


def test_spec_fields_and_row_rules(saved, plain):
    assert k5_spec_fields(saved["i2v"], "i2v") == dict(
        attention_type="regular", num_heads=4, spatial_multiple=16, temporal_multiple=4, max_frames=509,
        max_size=2048, max_prompt_tokens=512)
    assert k5_spec_fields(saved["t2i"], "t2i") == dict(
        attention_type="regular", num_heads=4, spatial_multiple=16, temporal_multiple=1, max_frames=1,
        max_size=1408, max_prompt_tokens=512)
    assert list(T2I_SIZES) == plain["t2i"].resolutions
    assert k5_row_rules("i2v")["min_frames"] == 17 and k5_row_rules("t2i")["sizes"] == T2I_SIZES
    for kind in ("i2v", "t2i"):
        pipe = plain[kind]
        head = pipe.prompt_template.split("{}")[0]
        assert TEMPLATE_TOKENS[kind] == pipe.prompt_template_encode_start_idx
        assert len(pipe.tokenizer(text=[head], return_tensors=None)["input_ids"][0]) == TEMPLATE_TOKENS[kind]


def test_i2i_spec_fields_and_row_rules(saved, plain):
    pipe = plain["i2i"]
    assert k5_spec_fields(saved["i2i"], "i2i") == dict(
        attention_type="regular", num_heads=4, spatial_multiple=16, temporal_multiple=1, max_frames=1,
        max_size=1408, max_prompt_tokens=1024)
    assert list(T2I_SIZES) == pipe.resolutions
    rules = k5_row_rules("i2i")
    assert (rules["min_frames"], rules["sizes"], rules["image"], rules["default_negative_prompt"]) == (
        1, T2I_SIZES, "required", "")
    assert rules["tokens_need_image"] and not k5_row_rules("t2i")["tokens_need_image"]
    spec = load_spec(saved["i2i"])
    assert (spec.kind, spec.sizes, spec.max_frames, spec.max_prompt_tokens) == ("i2i", T2I_SIZES, 1, 1024)
    with pytest.raises(ValueError, match=r"^kind='i2i': a text's token count depends on its row's image"):
        spec.count_tokens(["a cat"])
    # The pipeline's defaults the Renderer relies on (its default negative "" is test_i2i_equals_plain_diffusers').
    defaults = {k: v.default for k, v in inspect.signature(pipe.__call__).parameters.items()}
    assert (defaults["max_sequence_length"], defaults["guidance_scale"]) == (I2I_MAX_SEQUENCE_LENGTH, 3.5)
    assert pipe.transformer.text_rope_embeddings.max_pos == I2I_MAX_SEQUENCE_LENGTH
    # The template's head up to `user` is 49 tokens, so the pipeline's crop at 54 drops `user` and the first 5
    # tokens after it (the prompt's first, or <|vision_start|> and image tokens after a short prompt).
    head = pipe.prompt_template.split("{}")[0]
    assert head.endswith("<|im_start|>user") and pipe.prompt_template_encode_start_idx == TEMPLATE_TOKENS["i2i"]
    assert len(pipe.tokenizer(text=[head], return_tensors=None)["input_ids"][0]) == I2I_HEAD_TOKENS + 1


@pytest.mark.parametrize("kind", ["i2v", "t2i"])
def test_count_tokens_is_the_pipelines_count(kind, saved, plain, caplog):
    """The driver's torch-free count (prompt tokens + 1) is the pipeline's for both templates, at the limit too."""
    spec, pipe = load_spec(saved[kind]), plain[kind]
    prompts = ["a cat", "  two  spaces\tand a tab ", "Кот в шляпе", "emoji 🐈‍⬛ and &amp; html", "x" * 300]

    def pipeline_count(prompt: str) -> int:
        text = [pipe.prompt_template.format(prompt_clean(prompt))]
        return len(pipe.tokenizer(text=text, return_tensors=None)["input_ids"][0]) - TEMPLATE_TOKENS[kind]

    assert spec.count_tokens(prompts) == [pipeline_count(p) for p in prompts]
    grown = ["zebra " * n for n in range(200, 300)]
    counts = spec.count_tokens(grown)
    last = max(i for i, n in enumerate(counts) if n <= spec.max_prompt_tokens)  # the longest prompt kept whole
    logging.getLogger("diffusers").propagate = True
    for prompt, truncated in ((grown[last], False), (grown[last + 1], True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipe.encode_prompt(prompt, max_sequence_length=512, device="cpu")
        assert any("truncated" in r.getMessage() for r in caplog.records) is truncated


@pytest.mark.parametrize("seed, guidance, negative, size", [(0, 3.5, None, (40, 56)),
                                                             (2**63 - 1, 5.0, "blurry", (96, 64))])
def test_i2i_equals_plain_diffusers(seed, guidance, negative, size, renderers, plain):
    """negative_prompt=None with guidance: the Renderer encodes I2I's own default (""), with the image. The 96x64
    image is landscape, the 640x1408 render portrait."""
    request = RenderRequest("make it a watercolour", negative, H, W, 1, 2, guidance, seed, image=_png(size, seed % 7))
    frames = renderers["i2i"].render(request)
    assert frames.dtype == np.uint8 and frames.shape == (1, H, W, 3)
    assert np.array_equal(frames, _oracle(plain["i2i"], request))


def test_i2i_stretches_an_image_of_another_aspect_ratio_to_the_render_size(plain):
    """The VAE gets a 96x64 (landscape) image stretched to a 640x1408 (portrait) render with Lanczos, no crop
    (Qwen gets the image itself at half size, 48x32)."""
    decoded, processor = decode_image(_png((96, 64), 1)), plain["i2i"].image_processor
    stretched = decoded.resize((W, H), Image.LANCZOS)
    assert torch.equal(processor.preprocess(decoded, height=H, width=W),
                       processor.preprocess(stretched, height=H, width=W))


def test_i2i_rows_options_and_batches(renderers, plain):
    renderer, pipe = renderers["i2i"], plain["i2i"]
    image = _png((32, 32), 2)
    with pytest.raises(ValueError, match=r"^image=None: missing \(rule: the i2i model renders from a conditioning"):
        renderer.render(RenderRequest("a cat", None, H, W, 1, 2, 3.5, 0))
    with pytest.raises(ValueError, match=r"^num_frames=5: this model renders one image"):
        renderer.render(RenderRequest("a cat", None, H, W, 5, 2, 3.5, 0, image=image))
    with pytest.raises(ValueError, match=r"^width x height=32x32: not a I2I size"):
        renderer.render(RenderRequest("a cat", None, 32, 32, 1, 2, 3.5, 0, image=image))
    with pytest.raises(ValueError, match=r"^prompt='a <\|image_pad\|> cat': holds <\|image_pad\|>"):
        renderer.render(RenderRequest("a <|image_pad|> cat", None, H, W, 1, 2, 3.5, 0, image=image))
    with pytest.raises(ValueError, match="attention_type='nabla': does not apply to i2i"):
        Renderer(renderer.model_path, options=RenderOptions(attention_type="nabla"))
    with pytest.raises(ValueError, match="cache_args.mag_ratios='lite-sft-5s': the published MagCache"):
        Renderer(renderer.model_path,
                 options=RenderOptions(cache="magcache", cache_args=(("mag_ratios", "lite-sft-5s"),)))
    # Rows whose images give Qwen sequences of one length share a forward (within one level of single calls);
    # images of other sizes give other lengths, so those rows render one at a time (exact).
    same = [RenderRequest("a cat", None, H, W, 1, 1, 3.5, seed, image=_png((32, 32), seed)) for seed in (1, 2)]
    oracles = [_oracle(pipe, request) for request in same]
    for got, want in zip(renderer.render_batch(same), oracles):
        assert got.shape == (1, H, W, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    mixed = [same[0], RenderRequest("a cat", None, H, W, 1, 1, 3.5, 4, image=_png((120, 64), 4))]
    first, second = renderer.render_batch(mixed)
    assert np.array_equal(first, oracles[0]) and np.array_equal(second, _oracle(pipe, mixed[1]))


I2I_PROMPTS = ["a cat", "name a cat", "s and dogs", "  two  spaces\tand a tab ", "Кот в шляпе",
               "emoji 🐈‍⬛ and &amp; html", "x" * 300, ""]


def test_i2i_count_tokens_is_the_length_the_pipeline_keeps(plain, saved):
    """`k5_i2i_count_tokens` is the Qwen sequence the pipeline hands the transformer (its own cu_seqlens), with
    `user` merged into the prompt where Qwen's BPE merges it ("username") and the image's tokens by its size."""
    pipe, tokenizer = plain["i2i"], f"{saved['i2i']}/tokenizer"
    for size in ((32, 32), (120, 64), (57, 301)):
        image = Image.new("RGB", size)
        counts = k5_i2i_count_tokens(tokenizer, I2I_PROMPTS, [size] * len(I2I_PROMPTS))
        kept = [int(pipe.encode_prompt(p, image=image, device="cpu")[2][-1]) for p in I2I_PROMPTS]
        assert counts == kept, size


@pytest.mark.parametrize("hub_style", [False, True])
def test_i2i_image_tokens_are_the_processors(hub_style, saved, tmp_path):
    """Image tokens by size, through the pipeline's own processor: the tiny's config, and a hub-style flat
    `preprocessor_config.json` (Qwen2.5-VL's max_pixels 12845056: large images are not capped at 1280 tokens)."""
    tokenizer = f"{saved['i2i']}/tokenizer"
    if hub_style:
        folder = shutil.copytree(tokenizer, tmp_path / "tokenizer")
        nested = json.loads((folder / "processor_config.json").read_text())
        flat = {**nested.pop("image_processor"), "min_pixels": 3136, "max_pixels": 12845056}
        del flat["size"], nested["video_processor"]
        (folder / "processor_config.json").write_text(json.dumps(nested))
        (folder / "preprocessor_config.json").write_text(json.dumps(flat))
        tokenizer = str(folder)
    processor = AutoProcessor.from_pretrained(tokenizer)
    for size in ((2, 2), (32, 32), (57, 57), (640, 1408), (1024, 1024), (3000, 2000), (17, 3001), (5000, 40)):
        half = Image.new("RGB", (size[0] // 2, size[1] // 2))
        ids = processor(text=["<|image_pad|>"], images=[half], return_tensors=None)["input_ids"][0]
        assert k5_i2i_image_tokens(tokenizer, size) == len(ids), size
    assert k5_i2i_image_tokens(tokenizer, (3000, 2000)) == (1944 if hub_style else 1247)
    with pytest.raises(ValueError, match="absolute aspect ratio"):
        processor(text=["<|image_pad|>"], images=[Image.new("RGB", (4500, 20))], return_tensors=None)
    with pytest.raises(ValueError, match=r"^image=9000x40: too narrow"):
        k5_i2i_image_tokens(tokenizer, (9000, 40))


def test_i2i_prompt_at_the_limit_is_kept_whole_and_one_more_token_is_refused(renderers, plain, saved, caplog):
    pipe, renderer, tokenizer = plain["i2i"], renderers["i2i"], f"{saved['i2i']}/tokenizer"
    data = _png((120, 64), 5)
    size = image_size(data)
    grown = ["zebra" + " a" * n for n in range(1000, 1030)]  # one token more each
    counts = k5_i2i_count_tokens(tokenizer, grown, [size] * len(grown))
    last = max(i for i, n in enumerate(counts) if n <= I2I_MAX_SEQUENCE_LENGTH)
    assert (counts[last], counts[last + 1]) == (I2I_MAX_SEQUENCE_LENGTH, I2I_MAX_SEQUENCE_LENGTH + 1)
    logging.getLogger("diffusers").propagate = True
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = pipe.encode_prompt(grown[last], image=decode_image(data), device="cpu")[2][-1]
    assert int(kept) == I2I_MAX_SEQUENCE_LENGTH and not any("truncated" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING):  # one more: the pipeline cuts its template's tail, not the prompt
        try:
            pipe.encode_prompt(grown[last + 1], image=decode_image(data), device="cpu")
        except ValueError as exc:  # or the processor finds the image's tokens cut
            assert "image" in str(exc)
    assert any("truncated" in r.getMessage() for r in caplog.records)
    renderer.check(RenderRequest(grown[last], None, H, W, 1, 2, 1.0, 0, image=data))
    image_tokens = k5_i2i_image_tokens(tokenizer, size)
    with pytest.raises(ValueError, match=rf"^prompt='zebra a .*': 1025 tokens with its 120x64 image \(rule: the i2i "
                                         rf"text encoder keeps at most 1024, the image's {image_tokens} included"):
        renderer.check(RenderRequest(grown[last + 1], None, H, W, 1, 2, 1.0, 0, image=data))
    # The image alone can exceed the window (the tiny's Qwen config: 1247 tokens at 3000x2000), and a given
    # negative prompt is counted with the image too.
    with pytest.raises(ValueError, match=r"^prompt='a cat': 1247 tokens with its 3000x2000 image"):
        renderer.check(RenderRequest("a cat", None, H, W, 1, 2, 3.5, 0, image=_flat_png((3000, 2000))))
    with pytest.raises(ValueError, match=r"^negative_prompt='zebra a .*': 1025 tokens"):
        renderer.check(RenderRequest("a cat", grown[last + 1], H, W, 1, 2, 3.5, 0, image=data))


def test_image_size_is_the_decoded_images():
    """The size the driver can read without decoding pixels is the pipeline's (EXIF orientation applied)."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)  # 64 wide, 40 high
    for orientation, want in ((1, (64, 40)), (3, (64, 40)), (6, (40, 64)), (8, (40, 64))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for fmt in ("JPEG", "PNG", "WEBP"):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, fmt, exif=exif.tobytes())
            assert image_size(buf.getvalue()) == decode_image(buf.getvalue()).size == want, (orientation, fmt)
