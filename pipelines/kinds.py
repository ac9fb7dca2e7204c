"""The Kandinsky family as model kinds: what each diffusers pipeline takes and gives (no torch here).

`model.path` alone decides the kind: it is read from the checkpoint's `model_index.json` (`_class_name`).
The system layer asks a model's kind what a row needs (an image or not) and what a render gives (frames,
frames with sound, one image); it never names a diffusers class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# What a row's `image` is to a kind.
NO_IMAGE, IMAGE_REQUIRED, IMAGE_OPTIONAL = "none", "required", "optional"
# What one render gives.
VIDEO, VIDEO_AUDIO, IMAGE = "video", "video+audio", "image"


@dataclass(frozen=True)
class Kind:
    """One member of the family: its diffusers pipeline class, its image input and its output."""

    name: str
    pipeline: str
    image: str = NO_IMAGE
    output: str = VIDEO
    preset: str | None = None
    """The tiny offline preset of this kind (`model.path`), built in code like `tiny`."""
    upscales: bool = False
    """Renders from another job's clip, not from a prompt (super-resolution: its input is a job's output)."""

    @property
    def frames(self) -> bool:
        """Whether a render has a frame count (video kinds) rather than being one image."""
        return self.output != IMAGE


KINDS = {k.pipeline: k for k in (
    Kind("t2v", "Kandinsky5T2VPipeline", preset="tiny"),
    Kind("i2v", "Kandinsky5I2VPipeline", image=IMAGE_REQUIRED, preset="tiny-i2v"),
    Kind("t2i", "Kandinsky5T2IPipeline", output=IMAGE, preset="tiny-t2i"),
    Kind("i2i", "Kandinsky5I2IPipeline", image=IMAGE_REQUIRED, output=IMAGE, preset="tiny-i2i"),
    Kind("ti2va", "Kandinsky6TI2VAPipeline", image=IMAGE_OPTIONAL, output=VIDEO_AUDIO, preset="tiny-k6"),
    Kind("sr", "Kandinsky6SRPipeline", preset="tiny-sr", upscales=True),
)}
BY_NAME = {k.name: k for k in KINDS.values()}


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
