"""The `tiny-i2v`, `tiny-t2i` and `tiny-i2i` presets: random-weight Kandinsky 5 image-to-video, text-to-image and
image-to-image pipelines.

Built offline, in code, like `tiny` (pipelines.tiny), from the component classes the hub checkpoints use:
- I2V (`kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers`): the T2V components, with a transformer built
  with `visual_cond=True`: the pipeline feeds it the noisy latents, a zero conditioning block and a mask that
  marks the first (image) latent frame, 2 x 16 + 1 = 33 channels.
- T2I (`kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers`): the same text encoders and transformer class
  (`visual_cond=False`) over FLUX.1's image VAE, an `AutoencoderKL` with 16 latent channels, 8x downsampling and
  no quant convs (FLUX's scaling 0.3611 and shift 0.1159; the pipeline itself only divides by the scaling).
- I2I (`kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers`): T2I's components with the transformer built with
  `visual_cond=True`: the pipeline feeds it the noisy latents, the VAE latents of the (stretched) input image and
  a mask of ones, 2 x 16 + 1 = 33 channels. Its Qwen sees the image too: `tiny`'s Qwen2.5-VL has a vision tower.
The text encoders and tokenizers (and I2V's VAE) are `tiny`'s own, same weights: prompts tokenize and count as
on the real checkpoints. Saved in diffusers format and loaded back through the kind's own `from_pretrained`;
`pipelines.models` caches them per node as the presets `tiny-i2v`, `tiny-t2i` and `tiny-i2i` (`ensure_tiny`).
"""

from __future__ import annotations

import copy
import functools

from pipelines.kinds import KINDS as REGISTRY
from pipelines.limits import k5_spec_fields  # noqa: F401  (the limits of a checkpoint of these kinds)
from pipelines.tiny import TRANSFORMER, _randomize_zero_init, build_tiny_pipeline

# The kinds whose tiny presets this module builds (the registry's `Kind.builder`), and their builders' names.
BUILDERS = {k.name: k.builder.partition(":")[2] for k in REGISTRY.values() if (k.builder or "").startswith(f"{__name__}:")}
KINDS = tuple(BUILDERS)


@functools.lru_cache(maxsize=1)
def _t2v_components() -> dict:
    """`tiny`'s components (its tokenizers take most of a build: built once per process, copied per pipeline)."""
    return build_tiny_pipeline(0).components


def _shared(*names: str) -> dict:
    """`tiny`'s components: fresh copies of its modules, so pipelines built in one process share no weights; its
    tokenizers as they are (never changed by a pipeline; a copy of the Qwen processor costs as much as its build)."""
    import torch

    parts = _t2v_components()
    return {name: copy.deepcopy(parts[name]) if isinstance(parts[name], torch.nn.Module) else parts[name]
            for name in names}


def _transformer(seed: int, visual_cond: bool):
    from diffusers import Kandinsky5Transformer3DModel
    import torch

    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(**{**TRANSFORMER, "visual_cond": visual_cond})
    _randomize_zero_init(transformer, 1 + seed)
    return transformer.eval()


def build_tiny_i2v_pipeline(seed: int = 0):
    """The tiny random-weight Kandinsky5I2VPipeline, deterministic; `seed` draws another transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5I2VPipeline

    parts = _shared("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return Kandinsky5I2VPipeline(transformer=_transformer(seed, visual_cond=True),
                                 scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), **parts)


def _flux_vae():
    """FLUX.1's image VAE in small: 16 latent channels, 8x downsampling, no quant convs (T2I's and I2I's).

    T2I and I2I render only their pipelines' sizes (640x1408 at the least), so this VAE always sees a megapixel:
    4 channels a block and no mid-block attention (over 80x176 latents, a 14,080-square score matrix a call),
    which left alone were most of a tiny image render's CPU."""
    from diffusers import AutoencoderKL
    import torch

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        norm_num_groups=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, force_upcast=True, sample_size=1024, mid_block_add_attention=False,
    ).eval()


def build_tiny_t2i_pipeline(seed: int = 0):
    """The tiny random-weight Kandinsky5T2IPipeline, deterministic; `seed` draws another transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2IPipeline

    parts = _shared("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return Kandinsky5T2IPipeline(transformer=_transformer(seed, visual_cond=False), vae=_flux_vae(),
                                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)


def build_tiny_i2i_pipeline(seed: int = 0):
    """The tiny random-weight Kandinsky5I2IPipeline, deterministic; `seed` draws another transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5I2IPipeline

    parts = _shared("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return Kandinsky5I2IPipeline(transformer=_transformer(seed, visual_cond=True), vae=_flux_vae(),
                                 scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)


def build_tiny_k5(kind: str, seed: int = 0):
    """The tiny pipeline of `kind` (`i2v`, `t2i` or `i2i`)."""
    if kind not in BUILDERS:
        raise ValueError(f"kind={kind!r}: the Kandinsky 5 tiny presets are {', '.join(KINDS)}")
    return globals()[BUILDERS[kind]](seed)
