"""Step caches through diffusers' hooks. All are APPROXIMATE: they reuse earlier work instead of computing.

- `magcache` (MagCache): skips the visual blocks on steps where the residual's magnitude is predicted
  to change little, from ratios calibrated per checkpoint. The Kandinsky 5 authors publish ratios for
  the Lite/Pro sft and nocfg checkpoints (`pipelines.mag_ratios`); they are picked from the model name,
  or named / given as a list in `cache_args.mag_ratios`. Defaults follow the reference code
  (threshold 0.12, at most 2 skips in a row, first 20 % of steps always computed).
- `firstblock` (FirstBlockCache): runs the first visual block and skips the rest when its residual
  barely changed since the last full step. diffusers' hook asks blocks for an argument named
  `hidden_states`; Kandinsky 5 blocks call it `visual_embed`, so the block's registry entry is adapted.
- `taylorseer` (TaylorSeer): predicts block outputs from a Taylor expansion of earlier steps.
This module is torch-free until a config is built, so the driver can validate names cheaply.
"""

from __future__ import annotations

import functools
import re

from pipelines.mag_ratios import PUBLISHED

MAGCACHE_DEFAULTS = {"threshold": 0.12, "max_skip_steps": 2, "retention_ratio": 0.2}


def published_ratios(name: str) -> list[float]:
    """A published calibration in diffusers' form: one ratio per step of a 50-step run, step 1 = 1.0.

    diffusers keeps one ratio list for both guidance branches (each in its own cache context); the
    published cond and uncond ratios differ by at most 1.3 % (Pro) and 0.2 % (Lite), so their mean is used.
    """
    _, _, interleaved = PUBLISHED[name]
    cond, uncond = interleaved[0::2], interleaved[1::2]
    per_step = cond if not any(uncond) else [(c + u) / 2 for c, u in zip(cond, uncond)]
    return [1.0, *per_step]


def ratios_for_model(path: str) -> str | None:
    """The published calibration for a checkpoint, from its name (`...T2V-Lite-sft-5s...`), if there is one."""
    match = re.search(r"t2v-(lite|pro)-(sft|nocfg)-(5s|10s)", path.lower())
    name = "-".join(match.groups()) if match else None
    return name if name in PUBLISHED else None


def ratio_problem(value) -> str | None:
    """Why `cache_args.mag_ratios` is unusable (None if it is fine)."""
    if isinstance(value, str):
        return None if value in PUBLISHED else f"unknown calibration (published: {', '.join(PUBLISHED)})"
    if isinstance(value, (list, tuple)) and len(value) >= 2 and all(
            isinstance(v, (int, float)) and v > 0 for v in value):
        return None
    return "must name a published calibration or be a list of at least 2 positive ratios"


@functools.lru_cache(maxsize=1)
def _register_kandinsky_blocks() -> None:
    """Let FirstBlockCache find a Kandinsky 5 visual block's input: it asks for `hidden_states` by name.

    The block's own registry entry already names the argument (`visual_embed`, which MagCache uses);
    this entry answers FirstBlockCache's hard-coded name with it too. Registered once per process.
    """
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5TransformerDecoderBlock

    class AliasedMetadata(TransformerBlockMetadata):
        def _get_parameter_from_args_kwargs(self, identifier: str, args=(), kwargs=None):
            if identifier == "hidden_states":
                identifier = self.hidden_states_argument_name
            return super()._get_parameter_from_args_kwargs(identifier, args, kwargs)

    current = TransformerBlockRegistry.get(Kandinsky5TransformerDecoderBlock)
    TransformerBlockRegistry.register(
        model_class=Kandinsky5TransformerDecoderBlock,
        metadata=AliasedMetadata(return_hidden_states_index=current.return_hidden_states_index,
                                 return_encoder_hidden_states_index=current.return_encoder_hidden_states_index,
                                 hidden_states_argument_name=current.hidden_states_argument_name))


# Set per row by the renderer, never by the user.
_SET_BY_RENDERER = {"num_inference_steps"}


def cache_args_problem(name: str, args: dict) -> tuple[str, str] | None:
    """(key, why) for the first `cache_args` entry diffusers' config for this cache would refuse, else None.

    Checked before any replica starts: a typo (`threshhold`) would otherwise fail every row on the replicas.
    """
    import dataclasses

    import diffusers

    cls = {"magcache": diffusers.MagCacheConfig, "firstblock": diffusers.FirstBlockCacheConfig,
           "taylorseer": diffusers.TaylorSeerCacheConfig}[name]
    known = sorted({field.name for field in dataclasses.fields(cls)} - _SET_BY_RENDERER)
    for key in args:
        if key not in known:
            return key, f"not an argument of diffusers.{cls.__name__} (known: {', '.join(known)})"
    try:
        cache_config(name, args, steps=50)
    except (TypeError, ValueError) as exc:
        return "", f"diffusers.{cls.__name__} refuses these arguments: {exc}"
    return None


def cache_config(name: str, args: dict, steps: int):
    """The diffusers cache config for pipeline calls of `steps` steps (MagCache interpolates its ratios to them)."""
    import diffusers

    if name == "magcache":
        ratios = args.get("mag_ratios")
        if isinstance(ratios, str):
            args = {**MAGCACHE_DEFAULTS, **args, "mag_ratios": published_ratios(ratios)}
        return diffusers.MagCacheConfig(**{**args, "num_inference_steps": steps})
    if name == "firstblock":
        _register_kandinsky_blocks()
        return diffusers.FirstBlockCacheConfig(**args)
    return diffusers.TaylorSeerCacheConfig(**args)
