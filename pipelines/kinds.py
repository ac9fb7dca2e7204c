"""The model-family registry: one entry per kind, stating all the system and the renderers ask of it (no torch).

`model.path` alone decides the kind: it is read from the checkpoint's `model_index.json` (`_class_name`), as
diffusers' `AutoPipeline` maps a class name to its pipeline. Like torchtitan's `TrainSpec`, an entry names its
rules and its renderer by module path ("module:name"), imported on first use, so the driver reads limits and
counts tokens without importing a renderer (torch, diffusers). Code asks an entry's properties and rules; it
never switches on a kind's name or names a diffusers class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from pipelines.cost import guided
from pipelines.request import DEFAULT_NEGATIVE_PROMPT, K6_DEFAULT_NEGATIVE_PROMPT

# What a row's `image` is to a kind.
NO_IMAGE, IMAGE_REQUIRED, IMAGE_OPTIONAL = "none", "required", "optional"
# What one render gives.
VIDEO, VIDEO_AUDIO, IMAGE = "video", "video+audio", "image"
# The Kandinsky 5 pipelines' default `max_sequence_length` (T2V, I2V, T2I): prompt tokens kept after the template.
MAX_PROMPT_TOKENS = 512
# I2I's default `max_sequence_length` (also the text RoPE's 1024 positions): the prompt's and the image's tokens.
I2I_MAX_SEQUENCE_LENGTH = 1024
# Kandinsky 6's default `max_sequence_length`: it pads every prompt to it.
K6_MAX_SEQUENCE_LENGTH = 1024
# (width, height): Kandinsky5T2IPipeline.resolutions, in its order (I2I takes the same).
T2I_SIZES = ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))
# I2V renormalises its first 4 latent frames against later ones (`normalize_first_frame`): at least 17 frames.
I2V_MIN_FRAMES = 17


@dataclass(frozen=True)
class Kind:
    """One member of the family: its diffusers pipeline class, what a row gives it and what a render gives back."""

    name: str
    pipeline: str
    renderer: str
    """The renderer class ("module:Class"), imported only where a replica loads the model."""
    spec: str
    """The function ("module:name", `(local_dir, kind) -> dict`) giving `ModelSpec`'s limits from the configs."""
    options: str
    """The function ("module:name", `(options=, kind=)` -> list of "option=value: reason") of option rules."""
    tokens: str | None = None
    """The function ("module:name", `(tokenizer_dir, prompts) -> counts`) counting a text's Qwen tokens."""
    image: str = NO_IMAGE
    output: str = VIDEO
    preset: str | None = None
    """The tiny offline preset of this kind (`model.path`), built in code like `tiny`."""
    builder: str | None = None
    """The preset's pipeline builder ("module:function(seed)")."""
    upscales: bool = False
    """Renders from another job's clip, not from a prompt (super-resolution: its input is a job's output)."""
    text: bool = True
    """Whether it takes a prompt at all (super-resolution does not)."""
    max_sequence_length: int = MAX_PROMPT_TOKENS
    """The pipeline's default `max_sequence_length`: the Qwen tokens a text may take."""
    template_tokens: int = 128
    """Tokens the pipeline crops off the front of its templated text (`prompt_template_encode_start_idx`)."""
    default_negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT
    """What the pipeline uses when guidance is on and `negative_prompt` is None."""
    empty_negative_is_default: bool = False
    """Whether an empty `negative_prompt` means the default too (Kandinsky 6), not an empty text."""
    min_frames: int = 1
    sizes: tuple = ()
    """(width, height) pairs it renders when it takes only some (text-to-image); empty: any multiple."""
    counts_image_tokens: bool = False
    """A text's token budget is shared with its row's image (I2I): a text alone has no count."""
    batches_rows: bool = True
    """Whether batched rows are independent (I2V renormalises latent frames with statistics over the batch)."""
    sparse_attention: bool = True
    """Whether the pipeline passes NABLA's sparse parameters (T2I and I2I never do: always full attention)."""
    published_magcache: bool = False
    """Whether the published MagCache calibrations are for this kind's checkpoints."""
    expands_prompts: bool = False
    """Whether the pipeline can rewrite prompts itself (`expand_prompts`)."""
    gang: str | None = "pipelines.parallel:GangRenderer"
    """The renderer of one rank of a gang ("module:Class"); None: single-GPU replicas only."""
    no_gangs: str | None = None
    """Why it runs on single-GPU replicas only, or None."""
    no_sequence_parallel: str | None = None
    """Why it has no sequence-parallel plan, or None."""
    generation: int = 5
    """Kandinsky 5 or 6."""
    title: str = ""
    """The kind in words, for messages."""
    no_latents: str | None = None
    """Why `output.latents` cannot apply to it (its render has no single latent to save), or None."""
    latents_post: str | None = None
    """The pipeline's method it applies to the latents after the denoising loop, before decoding (I2V's
    `normalize_first_frame`), or None: what `output.latents` saves is then the loop's last latents."""

    @property
    def frames(self) -> bool:
        """Whether a render has a frame count (video kinds) rather than being one image."""
        return self.output != IMAGE

    @property
    def sound(self) -> bool:
        """Whether a render has sound."""
        return self.output == VIDEO_AUDIO

    def negative_prompt(self, negative: str | None, guidance_scale: float) -> str | None:
        """The negative prompt the pipeline really uses: none without text or guidance, its own default if unset."""
        if not self.text or not guided(guidance_scale):
            return None
        if negative is None or (self.empty_negative_is_default and not negative):
            return self.default_negative_prompt
        return negative

    def spec_fields(self, local_dir: str | Path) -> dict:
        """`ModelSpec`'s limits of a checkpoint of this kind, read from its configs (no weights)."""
        return load(self.spec)(local_dir, self)

    def option_problems(self, options) -> list[str]:
        """Why render options cannot apply to this kind ("option=value: reason" each); empty if they can."""
        return load(self.options)(options=options, kind=self)

    def count_tokens(self, tokenizer_dir: str, prompts: list[str]) -> list[int]:
        """Qwen tokens each prompt takes of `max_sequence_length`, through the tokenizer's Rust core (no torch)."""
        return load(self.tokens)(tokenizer_dir, prompts)


def load(target: str):
    """The object a registry entry names as "module:name", its module imported now."""
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


_K5 = dict(spec="pipelines.limits:k5_spec_fields", options="pipelines.limits:option_problems",
           tokens="pipelines.tokens:k5_count_tokens", renderer="pipelines.render:Renderer")
_K5_IMAGE = dict(_K5, output=IMAGE, template_tokens=40, default_negative_prompt="", sizes=T2I_SIZES,
                 sparse_attention=False)
KINDS = {k.pipeline: k for k in (
    Kind("t2v", "Kandinsky5T2VPipeline", **_K5, preset="tiny", builder="pipelines.tiny:build_tiny_pipeline",
         published_magcache=True, title="Kandinsky 5 text-to-video"),
    Kind("i2v", "Kandinsky5I2VPipeline", **_K5, image=IMAGE_REQUIRED, preset="tiny-i2v",
         builder="pipelines.tiny_k5:build_tiny_i2v_pipeline", min_frames=I2V_MIN_FRAMES, batches_rows=False,
         latents_post="normalize_first_frame", title="Kandinsky 5 image-to-video"),
    Kind("t2i", "Kandinsky5T2IPipeline", **_K5_IMAGE, preset="tiny-t2i",
         builder="pipelines.tiny_k5:build_tiny_t2i_pipeline", title="Kandinsky 5 text-to-image"),
    # I2I's template holds the image: a text's count needs it (`pipelines.limits.k5_i2i_count_tokens`).
    Kind("i2i", "Kandinsky5I2IPipeline", **dict(_K5_IMAGE, tokens=None, template_tokens=54), image=IMAGE_REQUIRED,
         preset="tiny-i2i", builder="pipelines.tiny_k5:build_tiny_i2i_pipeline",
         max_sequence_length=I2I_MAX_SEQUENCE_LENGTH, counts_image_tokens=True, title="Kandinsky 5 image-to-image"),
    Kind("ti2va", "Kandinsky6TI2VAPipeline", spec="pipelines.limits_k6:k6_spec",
         options="pipelines.limits_k6:k6_option_problems", tokens="pipelines.limits_k6:k6_count_tokens",
         renderer="pipelines.render_k6:K6Renderer", gang="pipelines.parallel:K6GangRenderer",
         image=IMAGE_OPTIONAL, output=VIDEO_AUDIO, preset="tiny-k6", builder="pipelines.tiny_k6:build_tiny_k6_pipeline",
         max_sequence_length=K6_MAX_SEQUENCE_LENGTH, template_tokens=129,
         default_negative_prompt=K6_DEFAULT_NEGATIVE_PROMPT, empty_negative_is_default=True, expands_prompts=True,
         # diffusers ships no context-parallel plan for Kandinsky6Transformer3DModel, and Kandinsky 5's would not
         # do: every block fuses the video and audio streams, audio queries attending over the whole video.
         no_sequence_parallel="Kandinsky 6 has no sequence-parallel plan (its blocks fuse video and audio, and "
                              "audio attends over the whole video sequence, which a split/gather plan would leave "
                              "sharded)", generation=6, title="Kandinsky 6",
         no_latents="Kandinsky 6 denoises video and sound latents together and its renderer does not return them "
                    "yet (use a Kandinsky 5 model, or output.latents: false)"),
    Kind("sr", "Kandinsky6SRPipeline", spec="pipelines.limits_sr:sr_spec_fields",
         options="pipelines.limits_sr:sr_option_problems", renderer="pipelines.render_sr:SRRenderer", gang=None,
         preset="tiny-sr", builder="pipelines.tiny_sr:build_tiny_sr_pipeline", upscales=True, text=False,
         max_sequence_length=0, template_tokens=0, default_negative_prompt=None,
         no_gangs="Kandinsky 6 SR has no guidance and renders its tiles one by one", generation=6,
         title="Kandinsky 6 SR",
         no_latents="Kandinsky 6 SR upscales tile by tile from a source clip, without a prompt: it has no one latent "
                    "of the clip nor prompt embeddings to save (output.latents: false)"),
)}
BY_NAME = {k.name: k for k in KINDS.values()}
# `simulated[:...]`: a stand-in that sleeps for each row's modelled GPU cost, for orchestration benchmarks only.
# No checkpoint: `model.path` names it and its `spec` takes that path; the spec it gives is a T2V Lite one (kind
# "t2v"), so rows follow T2V's rules.
SIMULATED = "simulated"
SIMULATED_KIND = Kind(SIMULATED, "", spec="pipelines.simulated:simulated_spec",
                      options="pipelines.limits:option_problems", renderer="pipelines.simulated:SimulatedRenderer",
                      gang=None, title="the simulated stand-in",
                      no_latents="the simulated stand-in denoises nothing (output.latents: false)")


class UnsupportedModel(ValueError):
    """A checkpoint whose pipeline class is not one of the kinds this product renders."""


def kind_of(model_dir: str | Path) -> Kind:
    """The kind of a local diffusers directory, from its `model_index.json`."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    name = index.get("_class_name")
    if name not in KINDS:
        raise UnsupportedModel(f"model_index.json _class_name={name!r}: not a supported pipeline "
                               f"(supported: {', '.join(KINDS)})")
    return KINDS[name]


@dataclass(frozen=True)
class Clip:
    """A render with more than frames: uint8 frames (F, H, W, 3), a float32 waveform (channels, samples) in [-1, 1]
    when it has sound, and the expanded prompt when the model rewrote the row's."""

    frames: object
    audio: object = None
    sample_rate: int | None = None
    prompt: str | None = None
    """The prompt the pipeline really encoded when it expanded the row's; None otherwise."""
    latents: object = None
    """The row's final latents and prompt embeddings (`pipelines.latents.Latents`) when the job asks for them."""
