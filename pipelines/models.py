"""What a model can render: its limits (`ModelSpec`), read from its configs and tokenizer without weights or torch.

The kind's registry entry (`pipelines.kinds`) says how its limits are read and its prompts counted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.kinds import BY_NAME, SIMULATED, SIMULATED_KIND, kind_of, load
from pipelines.resolve import ModelNotFound, resolve_model
from pipelines.tiny import TEMPLATE_TOKENS


@dataclass(frozen=True)
class ModelSpec:
    """The limits of one checkpoint, read from its configs: what a row may ask of it."""

    path: str
    attention_type: str
    num_heads: int
    spatial_multiple: int
    temporal_multiple: int
    max_frames: int
    max_size: int
    max_prompt_tokens: int
    kind: str = "t2v"
    """The family member (`pipelines.kinds`): t2v, i2v, t2i, i2i, ti2va, sr."""
    audio_sample_rate: int | None = None
    """Samples per second of the kind's sound (Kandinsky 6), None without sound."""
    min_frames: int = 1
    """Fewest frames a row may ask for (image-to-video renormalises its first latent frames against later ones)."""
    sizes: tuple = ()
    """(width, height) pairs the kind renders, when it takes only some (text-to-image); empty: any multiple."""
    guidance: float | None = None
    """The only guidance scale the checkpoint takes (a distilled Kandinsky 6: 1.0), or None."""
    tile_sizes: tuple = ()
    """(height, width) tiles the model was trained on (super-resolution): they decide its output size."""
    tokenizer_dir: str | None = field(default=None, repr=False, compare=False)
    """The checkpoint's `tokenizer/` folder (Qwen2.5-VL's processor files), copied locally."""

    def with_attention(self, kind: str) -> "ModelSpec":
        """The limits when the model runs `regular` or `nabla` attention (NABLA groups 8x8 patches: 128 px)."""
        if kind == self.attention_type:
            return self
        patch = self.spatial_multiple // 8 if self.attention_type == "nabla" else self.spatial_multiple
        return replace(self, attention_type=kind, spatial_multiple=patch * 8 if kind == "nabla" else patch)

    def negative_prompt(self, negative: str | None, guidance_scale: float) -> str | None:
        """The negative prompt this kind's pipeline really uses: none without guidance, its own default if unset."""
        return BY_NAME[self.kind].negative_prompt(negative, guidance_scale)

    def processor(self):
        """The pipeline's own text processor (transformers' AutoProcessor over `tokenizer/`)."""
        return _processor(self.tokenizer_dir)

    def prompt_tokens(self, prompt: str) -> int:
        """Qwen tokens the prompt takes of the pipeline's `max_sequence_length` window, after it cleans the prompt
        and wraps it in its template: the prompt's own plus the template's closing `<|im_end|>`.

        diffusers 0.42.1 tokenizes at most 128 (template head) + max_sequence_length tokens and warns that it
        truncated exactly when this count exceeds max_sequence_length (tests/test_pipelines.py checks the boundary
        with the real Qwen tokenizer). This is the pipeline's way, one prompt at a time; `count_tokens` is the
        driver's.
        """
        from diffusers.pipelines.kandinsky5.pipeline_kandinsky import prompt_clean

        text = [_prompt_template().format(prompt_clean(prompt))]
        return len(self.processor()(text=text, return_tensors=None)["input_ids"][0]) - TEMPLATE_TOKENS

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """`prompt_tokens` of many prompts in one call of the Rust tokenizer, without torch in the process.

        The kind's own count (`Kind.count_tokens`); a kind without text counts nothing (a prompt carried from the
        source row costs nothing). Loading transformers or diffusers here would import torch (~700 MB in the driver).
        """
        kind = BY_NAME[self.kind]
        if not kind.text:
            return [0] * len(prompts)
        if kind.counts_image_tokens:  # the image shares the prompt's window: a text alone has no count
            raise ValueError(f"kind={self.kind!r}: a text's token count depends on its row's image; count with "
                             "pipelines.limits.k5_i2i_count_tokens(tokenizer_dir, prompts, image_sizes)")
        return kind.count_tokens(self.tokenizer_dir, prompts)


@functools.lru_cache(maxsize=4)
def _processor(folder: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


@functools.lru_cache(maxsize=1)
def _prompt_template() -> str:
    """The pipeline's Qwen prompt template (built once: it lives on a pipeline instance)."""
    from diffusers import Kandinsky5T2VPipeline

    return Kandinsky5T2VPipeline(None, None, None, None, None, None, None).prompt_template


def load_spec(path: str, storage_options: dict | None = None) -> ModelSpec:
    """Read a model's limits from its configs and tokenizer, without loading any weights."""
    if path.startswith(SIMULATED):
        try:
            return load(SIMULATED_KIND.spec)(path)
        except ValueError as exc:  # a malformed `simulated:...`: refused like any model path
            raise ModelNotFound(str(exc)) from None
    local = Path(resolve_model(path, storage_options, spec_only=True))
    kind = kind_of(local)
    tokenizer = {"tokenizer_dir": str(local / "tokenizer")} if kind.text else {}
    return ModelSpec(path=path, kind=kind.name, min_frames=kind.min_frames, sizes=kind.sizes, **tokenizer,
                     **kind.spec_fields(local))
