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
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.request import DEFAULT_NEGATIVE_PROMPT

FAMILY = ("t2v", "i2v", "t2i")
# The pipelines' default `max_sequence_length`: prompt tokens kept after the template (all three kinds).
MAX_PROMPT_TOKENS = 512
# Kandinsky5RoPE3D holds 128 positions per axis: latent frames and patched rows and columns.
ROPE_POSITIONS = 128
# (width, height): Kandinsky5T2IPipeline.resolutions, in its order.
T2I_SIZES = ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))
I2V_MIN_FRAMES = 17
# Tokens of the system part of each kind's prompt template (`prompt_template_encode_start_idx`).
TEMPLATE_TOKENS = {"t2v": 128, "i2v": 128, "t2i": 40}
# What the pipeline uses when guidance is on and `negative_prompt` is None.
DEFAULT_NEGATIVE_PROMPTS = {"t2v": DEFAULT_NEGATIVE_PROMPT, "i2v": DEFAULT_NEGATIVE_PROMPT, "t2i": ""}


def _name(kind) -> str:
    name = getattr(kind, "name", kind)
    if name not in FAMILY:
        raise ValueError(f"kind={name!r}: not a Kandinsky 5 kind ({', '.join(FAMILY)})")
    return name


def k5_spec_fields(local_dir: str | Path, kind) -> dict:
    """The `ModelSpec` limits of a Kandinsky 5 checkpoint of `kind` (a `Kind` or its name), from its configs.

    For T2V the same numbers as `pipelines.models.load_spec`. T2I: one frame, and its sizes are `T2I_SIZES`
    (`k5_row_rules`); its VAE config has no compression ratio (the pipeline fixes it at 8).
    """
    name, local = _name(kind), Path(local_dir)
    transformer = json.loads((local / "transformer" / "config.json").read_text())
    num_heads = transformer["model_dim"] // sum(transformer["axes_dims"])
    patch = transformer["patch_size"][1]
    if name == "t2i":
        return dict(attention_type="regular", num_heads=num_heads, spatial_multiple=8 * patch, temporal_multiple=1,
                    max_frames=1, max_size=max(max(size) for size in T2I_SIZES), max_prompt_tokens=MAX_PROMPT_TOKENS)
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
        "sizes": T2I_SIZES if name == "t2i" else None,
        "image": "required" if name == "i2v" else "none",
        "image_resize": "stretch to (width, height), Lanczos, no crop" if name == "i2v" else None,
        "default_negative_prompt": DEFAULT_NEGATIVE_PROMPTS[name],
        "template_tokens": TEMPLATE_TOKENS[name],
    }


def default_negative_prompt(kind, negative_prompt: str | None, guidance_scale: float) -> str | None:
    """The negative prompt the pipeline of `kind` really uses: none without guidance, its own default if unset."""
    if guidance_scale <= 1.0:
        return None
    return DEFAULT_NEGATIVE_PROMPTS[_name(kind)] if negative_prompt is None else negative_prompt


def request_problem(kind, request) -> str | None:
    """Why a `RenderRequest` cannot be rendered exactly as asked by a model of `kind` ("field=value: rule"), or None."""
    name = _name(kind)
    image = getattr(request, "image", None)
    if name == "i2v":
        if image is None:
            return "image=None: missing (rule: the i2v model renders from a conditioning image)"
        if request.num_frames < I2V_MIN_FRAMES:
            return (f"num_frames={request.num_frames}: too few (rule: i2v needs at least {I2V_MIN_FRAMES}; "
                    "Kandinsky5I2VPipeline renormalises the first 4 latent frames against later ones)")
    elif image is not None:
        return f"image=<{len(image)} bytes>: the {name} model takes no image"
    if name == "t2i":
        if request.num_frames != 1:
            return f"num_frames={request.num_frames}: this model renders one image (rule: num_frames=1)"
        if (request.width, request.height) not in T2I_SIZES:
            sizes = ", ".join(f"{w}x{h}" for w, h in T2I_SIZES)
            return (f"width x height={request.width}x{request.height}: not a T2I size (rule: one of {sizes}; "
                    "Kandinsky5T2IPipeline would silently render another)")
    return None


def option_problems(kind, options) -> list[str]:
    """Why render options cannot apply to a model of `kind` ("option=value: reason" each); empty if they can."""
    name, found = _name(kind), []
    if name == "t2i" and options.attention_type == "nabla":
        found.append("attention_type='nabla': does not apply to t2i (Kandinsky5T2IPipeline passes no sparse "
                     "parameters, so it always runs full attention)")
    if name != "t2v" and options.cache == "magcache":
        ratios = dict(options.cache_args).get("mag_ratios")
        if not isinstance(ratios, (list, tuple)):
            found.append(f"cache_args.mag_ratios={ratios!r}: the published MagCache calibrations are for T2V "
                         f"checkpoints; a {name} model needs its own ratios, given as a list")
    return found
