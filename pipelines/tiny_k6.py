"""The `tiny-k6` preset: a random-weight Kandinsky 6 text/image-to-video-and-audio pipeline built offline, in code.

Every component is the real class the hub checkpoints use (Kandinsky6Transformer3DModel, AutoencoderKLHunyuanVideo,
Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor, CLIPTextModel + CLIPTokenizer,
FlowMatchEulerDiscreteScheduler, MMAudioVAE, MMAudioVocoder), only small. The text encoders, their tokenizers and
the video VAE are the Kandinsky 5 `tiny` preset's own (pipelines.tiny), so prompts count as many Qwen tokens as on
the real checkpoints. The transformer has the released architecture flags (cross-modal RoPE and gates, fixed
modulation, two visual token types for the first-frame image) and the audio VAE the real 44.1 kHz framing (1024
samples per audio latent), so audio lengths are the real ones. Its videos and sounds are noise: the weights are random.
The Qwen processor carries Qwen2.5-VL's chat template, so the pipeline's `expand_prompts` runs too: the tiny encoder
decodes greedily (transformers' default generation config; no EOS in sight, so every rewrite is the full 1024 tokens,
about 3.5 s on one CPU thread) and its rewrites are noise as well.

The sft checkpoints ship FlowMatchEulerDiscreteScheduler (shift 5.0), as here; the distilled ones ship
PiflowScheduler (n_grid 10, shift 5.0), whose transformer predicts n_grid outputs per latent channel
(out_visual_dim = 16 * n_grid, out_audio_dim = 40 * n_grid) and must run with guidance_scale=1.0:
`build_tiny_k6_pipeline(distilled=True)` builds that variant.
"""

from __future__ import annotations


# Transformer dims: 4 video heads of 16 (like `tiny`, so sequence-parallel degrees 2 and 4 divide them) and an audio
# branch of half the width with the same head size, as Lite (28 + 14 heads of 64) and Pro (32 + 16 heads of 128) have:
# cross-modal RoPE (`ca_rope`) rotates video queries with audio positions, so both head sizes must agree.
TRANSFORMER = dict(
    in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=32, time_dim=32, patch_size=(1, 2, 2),
    model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
    in_audio_dim=8, out_audio_dim=8, model_dim_a=32, time_dim_a=32, ff_dim_a=64, axes_dims_a=(4, 6, 6),
    audio_freqs_scaling=0.144, scale_factor=(1.0, 2.0, 2.0), text_token_padding=True, ca_rope=True,
    cross_gates=True, fix_modulation=True, visual_token_type_num_embeddings=2,
)
# The real 44.1 kHz framing (hop 512, one latent per 1024 samples) over a narrow autoencoder.
AUDIO_VAE = dict(
    mel_bins=16, latent_channels=TRANSFORMER["in_audio_dim"], hidden_channels=8, channel_multipliers=(1, 2),
    layers_per_block=1, sample_rate=44_100, n_fft=2048, hop_length=512, scaling_factor=0.417,
)
# The vocoder's upsampling must multiply to the audio VAE's hop length (8 * 8 * 8 = 512).
VOCODER = dict(
    num_mels=AUDIO_VAE["mel_bins"], upsample_initial_channel=32, upsample_rates=(8, 8, 8),
    upsample_kernel_sizes=(16, 16, 16), resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
)
SCHEDULER_SHIFT = 5.0
PIFLOW_GRID = 10
# Qwen2-VL's and Qwen2.5-VL's published chat template (`chat_template.json` of Qwen/Qwen2-VL-7B-Instruct and
# Qwen/Qwen2.5-VL-7B-Instruct), which `Kandinsky6TI2VAPipeline.expand_prompts` applies; the text is the one
# huggingface/transformers' tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py gives its processor.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def build_tiny_k6_pipeline(seed: int = 0, distilled: bool = False):
    """Build the tiny random-weight Kandinsky6TI2VAPipeline deterministically (seeded per component).

    `seed` picks another draw of the transformer, audio VAE and vocoder (the text encoders and video VAE stay
    `tiny`'s). `distilled` gives the PiflowScheduler variant (a widened transformer head; guidance_scale=1.0).
    """
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Kandinsky6TI2VAPipeline,
        Kandinsky6Transformer3DModel,
        MMAudioVAE,
        MMAudioVocoder,
        PiflowScheduler,
    )
    from transformers import Qwen2_5_VLProcessor

    from pipelines.tiny_k5 import _shared

    # Kandinsky 5's tiny text encoders, tokenizers and video VAE (built once per process, as for the K5 kinds).
    k5 = _shared("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    qwen = k5["tokenizer"]
    processor = Qwen2_5_VLProcessor(image_processor=qwen.image_processor, tokenizer=qwen.tokenizer,
                                    video_processor=qwen.video_processor, chat_template=QWEN_VL_CHAT_TEMPLATE)
    config = dict(TRANSFORMER)
    if distilled:
        config.update(out_visual_dim=config["in_visual_dim"] * PIFLOW_GRID,
                      out_audio_dim=config["in_audio_dim"] * PIFLOW_GRID)
    torch.manual_seed(seed)
    transformer = Kandinsky6Transformer3DModel(**config)
    _randomize_zero_init(transformer, 1 + seed)
    torch.manual_seed(seed)
    audio_vae = MMAudioVAE(**AUDIO_VAE)
    torch.manual_seed(seed)
    vocoder = MMAudioVocoder(**VOCODER)
    scheduler = (PiflowScheduler(shift=SCHEDULER_SHIFT, n_grid=PIFLOW_GRID) if distilled
                 else FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT))
    return Kandinsky6TI2VAPipeline(
        transformer=transformer.eval(), vae=k5["vae"], text_encoder=k5["text_encoder"], tokenizer=processor,
        text_encoder_2=k5["text_encoder_2"], tokenizer_2=k5["tokenizer_2"], scheduler=scheduler,
        audio_vae=audio_vae.eval(), vocoder=vocoder.eval(),
    )


def _randomize_zero_init(model, seed: int) -> None:
    """Give all-zero parameters random values, so that no layer starts out as a no-op.

    Kandinsky 6 initialises its modulations like any linear layer, but the text and audio embedding LayerNorms
    start with zero biases; a trained checkpoint has none of these exact zeros, and neither should the tiny model.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
