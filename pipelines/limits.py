"""What each Kandinsky 5 kind can render: limits read from a checkpoint's configs, row rules and option rules.

Torch-free, so the driver validates rows and options with it before any replica starts; `Renderer` enforces the
same rules (pipelines.render). Facts about diffusers 0.42.1's pipelines, each checked by tests/test_family.py:
- T2V and I2V share the prompt template (128 tokens of system prompt), the default negative prompt and the
  RoPE limits (128 positions per latent axis); sizes are multiples of 16 (`check_inputs`).
- I2V needs at least 17 frames: after denoising it renormalises the first 4 latent frames against the ones after
  them (`normalize_first_frame`); with 2-4 latent frames there are none and the video is NaN, with 1 it fails.
  Its image may have any size and aspect: `VideoProcessor.preprocess` stretches it to (width, height) with
  PIL's Lanczos filter (no crop, aspect not kept). Batched rows are not independent (see `Renderer.render_batch`).
- T2I renders only the sizes in `Kandinsky5T2IPipeline.resolutions`, any other is silently replaced by the one
  of nearest aspect ratio; its template has 40 tokens of system prompt, its default negative prompt is "", and it
  never passes NABLA's sparse parameters (always full attention).
- I2I takes T2I's sizes (its default, the image's own size snapped to them, is never used: rows give a size), no
  sparse parameters and "" as default negative prompt; its image is stretched to (width, height) like I2V's.
  Its prompt template holds the image: Qwen reads `<|im_start|>user` + prompt + the image's tokens, and the
  prompt's budget (`max_sequence_length`, 1024 by default) counts the image's tokens (`k5_i2i_count_tokens`).
  It crops 54 tokens, its 48-token system part and 6 more: `user` and the prompt's first tokens (after a short
  prompt also `<|vision_start|>` and image tokens) are not among the positions the transformer gets (later
  positions attended to them). A text over the budget is not truncated: the pipeline cuts its template's tail
  instead (a mangled text, or a ValueError from the processor).
"""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path

from pipelines.cost import guided
from pipelines.request import DEFAULT_NEGATIVE_PROMPT

FAMILY = ("t2v", "i2v", "t2i", "i2i")
# T2V, I2V and T2I's default `max_sequence_length`: prompt tokens kept after the template.
MAX_PROMPT_TOKENS = 512
# I2I's default `max_sequence_length` (also the text RoPE's 1024 positions): the prompt's and the image's tokens.
I2I_MAX_SEQUENCE_LENGTH = 1024
MAX_SEQUENCE_LENGTHS = {"t2v": MAX_PROMPT_TOKENS, "i2v": MAX_PROMPT_TOKENS, "t2i": MAX_PROMPT_TOKENS,
                        "i2i": I2I_MAX_SEQUENCE_LENGTH}
# Kandinsky5RoPE3D holds 128 positions per axis: latent frames and patched rows and columns.
ROPE_POSITIONS = 128
# (width, height): Kandinsky5T2IPipeline.resolutions, in its order.
T2I_SIZES = ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))
I2V_MIN_FRAMES = 17
# Tokens each pipeline crops off the front of its templated text (`prompt_template_encode_start_idx`): the system
# part of the template for T2V, I2V and T2I; 6 more than I2I's (`I2I_HEAD_TOKENS`).
TEMPLATE_TOKENS = {"t2v": 128, "i2v": 128, "t2i": 40, "i2i": 54}
# What the pipeline uses when guidance is on and `negative_prompt` is None.
DEFAULT_NEGATIVE_PROMPTS = {"t2v": DEFAULT_NEGATIVE_PROMPT, "i2v": DEFAULT_NEGATIVE_PROMPT, "t2i": "", "i2i": ""}
# I2I's template is `<|im_start|>system\n...:<|im_end|><|im_start|>` (48 tokens, special tokens split it), then
# `user` + the prompt as one text (Qwen's BPE may merge the two: "username"), then `<|vision_start|>`, the image's
# `<|image_pad|>` tokens, `<|vision_end|><|im_end|>`.
I2I_HEAD_TOKENS, I2I_USER, I2I_TAIL_TOKENS = 48, "user", 3
I2I_IMAGE_TOKEN = "<|image_pad|>"
# Qwen2-VL's image processor defaults (transformers), where a checkpoint's config leaves them out.
QWEN_IMAGE_DEFAULTS = dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def _name(kind) -> str:
    name = getattr(kind, "name", kind)
    if name not in FAMILY:
        raise ValueError(f"kind={name!r}: not a Kandinsky 5 kind ({', '.join(FAMILY)})")
    return name


def k5_spec_fields(local_dir: str | Path, kind) -> dict:
    """The `ModelSpec` limits of a Kandinsky 5 checkpoint of `kind` (a `Kind` or its name), from its configs.

    For T2V the same numbers as `pipelines.models.load_spec`. T2I and I2I: one frame, and their sizes are
    `T2I_SIZES` (`k5_row_rules`); their VAE config has no compression ratio (the pipelines fix it at 8). I2I's
    `max_prompt_tokens` bounds the prompt's tokens together with its image's (`k5_i2i_count_tokens`).
    """
    name, local = _name(kind), Path(local_dir)
    transformer = json.loads((local / "transformer" / "config.json").read_text())
    num_heads = transformer["model_dim"] // sum(transformer["axes_dims"])
    patch = transformer["patch_size"][1]
    if name in ("t2i", "i2i"):
        return dict(attention_type="regular", num_heads=num_heads, spatial_multiple=8 * patch, temporal_multiple=1,
                    max_frames=1, max_size=max(max(size) for size in T2I_SIZES),
                    max_prompt_tokens=MAX_SEQUENCE_LENGTHS[name])
    vae = json.loads((local / "vae" / "config.json").read_text())
    spatial = vae.get("spatial_compression_ratio", 8) * patch
    temporal = vae.get("temporal_compression_ratio", 4)
    attention = transformer.get("attention_type", "regular")
    return dict(attention_type=attention, num_heads=num_heads,
                spatial_multiple=128 if attention == "nabla" else spatial, temporal_multiple=temporal,
                max_frames=temporal * (ROPE_POSITIONS - 1) + 1, max_size=spatial * ROPE_POSITIONS,
                max_prompt_tokens=MAX_PROMPT_TOKENS)


def k5_row_rules(kind) -> dict:
    """What a row of `kind` needs beyond the spec's limits: frame floor, allowed sizes, its image, its defaults."""
    name = _name(kind)
    return {
        "min_frames": I2V_MIN_FRAMES if name == "i2v" else 1,
        "sizes": T2I_SIZES if name in ("t2i", "i2i") else None,
        "image": "required" if name in ("i2v", "i2i") else "none",
        "image_resize": "stretch to (width, height), Lanczos, no crop" if name in ("i2v", "i2i") else None,
        "default_negative_prompt": DEFAULT_NEGATIVE_PROMPTS[name],
        "template_tokens": TEMPLATE_TOKENS[name],
        # I2I: a text's count depends on its image's size (`k5_i2i_count_tokens`), not on the text alone.
        "tokens_need_image": name == "i2i",
    }


def default_negative_prompt(kind, negative_prompt: str | None, guidance_scale: float) -> str | None:
    """The negative prompt the pipeline of `kind` really uses: none without guidance, its own default if unset."""
    if not guided(guidance_scale):
        return None
    return DEFAULT_NEGATIVE_PROMPTS[_name(kind)] if negative_prompt is None else negative_prompt


def request_problem(kind, request) -> str | None:
    """Why a `RenderRequest` cannot be rendered exactly as asked by a model of `kind` ("field=value: rule"), or None.

    I2I's token budget needs the image's size: `Renderer.check` adds it (`k5_i2i_token_problem`).
    """
    name = _name(kind)
    image = getattr(request, "image", None)
    if name in ("i2v", "i2i"):
        if image is None:
            return f"image=None: missing (rule: the {name} model renders from a conditioning image)"
        if name == "i2v" and request.num_frames < I2V_MIN_FRAMES:
            return (f"num_frames={request.num_frames}: too few (rule: i2v needs at least {I2V_MIN_FRAMES}; "
                    "Kandinsky5I2VPipeline renormalises the first 4 latent frames against later ones)")
    elif image is not None:
        return f"image=<{len(image)} bytes>: the {name} model takes no image"
    if name in ("t2i", "i2i"):
        if request.num_frames != 1:
            return f"num_frames={request.num_frames}: this model renders one image (rule: num_frames=1)"
        if (request.width, request.height) not in T2I_SIZES:
            sizes = ", ".join(f"{w}x{h}" for w, h in T2I_SIZES)
            pipeline = "Kandinsky5T2IPipeline" if name == "t2i" else "Kandinsky5I2IPipeline"
            return (f"width x height={request.width}x{request.height}: not a {name.upper()} size (rule: one of "
                    f"{sizes}; {pipeline} would silently render another)")
    if name == "i2i":
        negative = default_negative_prompt(name, request.negative_prompt, request.guidance_scale)
        for field, text in (("prompt", request.prompt), ("negative_prompt", negative)):
            if text is not None and I2I_IMAGE_TOKEN in text:
                return (f"{field}={text[:40]!r}: holds {I2I_IMAGE_TOKEN} (rule: not in an i2i text; the pipeline's "
                        "Qwen processor takes it for the image's place and fails)")
    return None


def option_problems(kind, options) -> list[str]:
    """Why render options cannot apply to a model of `kind` ("option=value: reason" each); empty if they can."""
    name, found = _name(kind), []
    if name in ("t2i", "i2i") and options.attention_type == "nabla":
        pipeline = "Kandinsky5T2IPipeline" if name == "t2i" else "Kandinsky5I2IPipeline"
        found.append(f"attention_type='nabla': does not apply to {name} ({pipeline} passes no sparse "
                     "parameters, so it always runs full attention)")
    if name != "t2v" and options.cache == "magcache":
        ratios = dict(options.cache_args).get("mag_ratios")
        if not isinstance(ratios, (list, tuple)):
            found.append(f"cache_args.mag_ratios={ratios!r}: the published MagCache calibrations are for T2V "
                         f"checkpoints; a {name} model needs its own ratios, given as a list")
    return found


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes as the pipelines get them (`pipelines.render.decode_image`: EXIF
    orientation applied), read from the header and EXIF without decoding the pixels (PNG: its EXIF may follow)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
            width, height = height, width
    return width, height


@functools.lru_cache(maxsize=4)
def _qwen_image_config(tokenizer_dir: str) -> dict:
    """Qwen2-VL image processor's patch, merge and pixel bounds, read as transformers reads them: the `image_processor`
    of `processor_config.json`, else `preprocessor_config.json`; `min_pixels`/`max_pixels` over `size`."""
    folder, config = Path(tokenizer_dir), None
    if (folder / "processor_config.json").exists():
        config = json.loads((folder / "processor_config.json").read_text()).get("image_processor")
    if config is None and (folder / "preprocessor_config.json").exists():
        config = json.loads((folder / "preprocessor_config.json").read_text())
    config, found = config or {}, dict(QWEN_IMAGE_DEFAULTS)
    size = config.get("size") or {}
    found.update({k: v for k, v in (("min_pixels", size.get("shortest_edge")), ("max_pixels", size.get("longest_edge")))
                  if v is not None})
    found.update({k: config[k] for k in QWEN_IMAGE_DEFAULTS if config.get(k) is not None})
    return found


def k5_i2i_image_tokens(tokenizer_dir: str | Path, size: tuple[int, int]) -> int:
    """Qwen tokens of an I2I image of `size` (width, height, as decoded: `image_size`).

    The pipeline shows Qwen the image at half its size, (width // 2, height // 2); Qwen2-VL's processor resizes
    that to multiples of patch x merge (28) px within its pixel bounds (transformers' `smart_resize`, copied
    here) and gives one token per 28 x 28 px. ValueError ("image=WxH: rule") where the processor would fail.
    """
    config = _qwen_image_config(str(tokenizer_dir))
    width, height = size[0] // 2, size[1] // 2
    if min(width, height) < 1:
        raise ValueError(f"image={size[0]}x{size[1]}: too small (rule: at least 2 pixels a side; the i2i pipeline "
                         "shows Qwen the image at half size)")
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"image={size[0]}x{size[1]}: too narrow (rule: Qwen2-VL takes aspect ratios up to 200 at "
                         f"half size, here {width}x{height})")
    factor = config["patch_size"] * config["merge_size"]
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > config["max_pixels"]:
        beta = math.sqrt(height * width / config["max_pixels"])
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < config["min_pixels"]:
        beta = math.sqrt(config["min_pixels"] / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    patch = config["patch_size"]
    return (h_bar // patch) * (w_bar // patch) // config["merge_size"] ** 2


def k5_i2i_count_tokens(tokenizer_dir: str | Path, prompts: list[str], image_sizes: list[tuple[int, int]]) -> list[int]:
    """Qwen tokens each prompt takes of Kandinsky5I2IPipeline's `max_sequence_length` with its image (one
    (width, height) per prompt, as decoded): the length of the Qwen sequence it hands the transformer.

    The pipeline tokenizes the templated text with the image and keeps what follows its first 54 tokens:
    48 of head, `user` + the cleaned prompt, `<|vision_start|>`, the image's tokens, `<|vision_end|><|im_end|>`.
    It keeps all of it exactly when the count is at most max_sequence_length; past that it cuts the template's
    tail instead of the prompt (a mangled text, or a ValueError), so longer rows must be rejected.
    tests/test_family.py checks the count against the pipeline's own `cu_seqlens`, and the boundary. Torch-free.
    """
    # Imported here: pipelines.models imports this module.
    from pipelines.models import _fast_tokenizer, clean_prompt

    encoded = _fast_tokenizer(str(tokenizer_dir)).encode_batch([I2I_USER + clean_prompt(p) for p in prompts],
                                                               add_special_tokens=False)
    return [I2I_HEAD_TOKENS + len(e.ids) + I2I_TAIL_TOKENS + k5_i2i_image_tokens(tokenizer_dir, size)
            - TEMPLATE_TOKENS["i2i"] for e, size in zip(encoded, image_sizes, strict=True)]


def k5_i2i_token_problem(tokenizer_dir: str | Path, texts: dict, size: tuple[int, int],
                         limit: int = I2I_MAX_SEQUENCE_LENGTH) -> str | None:
    """Why an I2I row's texts ({field: text or None}) do not fit `limit` with its image ("field=value: rule")."""
    try:
        fields = [(field, text) for field, text in texts.items() if text is not None]
        counts = k5_i2i_count_tokens(tokenizer_dir, [t for _, t in fields], [size] * len(fields))
    except ValueError as exc:
        return str(exc)
    for (field, text), count in zip(fields, counts):
        if count > limit:
            return (f"{field}={text[:40]!r}: {count} tokens with its {size[0]}x{size[1]} image "
                    f"(rule: the i2i text encoder keeps at most {limit}, the image's "
                    f"{k5_i2i_image_tokens(tokenizer_dir, size)} included; longer texts would be mangled)")
    return None
