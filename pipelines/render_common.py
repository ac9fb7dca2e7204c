"""What every diffusers renderer shares (K5, K6, SR): devices, frames to uint8, images in, text encoders tamed."""

from __future__ import annotations

import numpy as np
import torch

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline float frames in [0, 1] to uint8, exactly as the seed contract states."""
    return np.round(frames * 255).astype(np.uint8)


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """The pipeline's `output_type="pt"` video (F, C, H, W) in [0, 1] to uint8 (F, H, W, C), on its device.

    The same float32 multiply and round-half-to-even as `to_uint8` on the `np` output, so the same bytes;
    done where the frames are, the GPU is not left idle while the CPU converts 121 float frames (~0.45 s
    per 5 s 768x512 row, measured on an H200) and only the uint8 frames cross to the host.
    """
    return torch.round(video.float() * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def decode_image(data: bytes):
    """The PIL image a pipeline is given for a row's encoded image bytes (PNG, JPEG, WebP, ...).

    diffusers' own `load_image`: EXIF orientation applied, converted to RGB (the pipelines' image processors do
    neither, and an RGBA or grayscale image would not fit the VAE). The pipeline then resizes it itself.
    """
    import io

    import PIL.Image
    from diffusers.utils import load_image

    return load_image(PIL.Image.open(io.BytesIO(data)))


def default_device() -> str:
    """The device a renderer loads on when none is given: the GPU if there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def hidden_states_only(text_encoder) -> None:
    """Have the Qwen encoder skip the logits the pipeline throws away (it reads the last hidden states).

    Over Qwen's 151,665-token vocabulary the logits of every prompt token cost more than the rest of a small
    encoder (65 ms of a 107 ms tiny-preset render on a CPU); the hidden states, and so the frames, are unchanged.
    """
    import inspect

    if text_encoder is None or "logits_to_keep" not in inspect.signature(text_encoder.forward).parameters:
        return
    text_encoder.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "logits_to_keep": 1}),
                                           with_kwargs=True)


def offload_text_encoders(pipe, device: str) -> None:
    """Text encoders kept in pinned CPU memory, streamed to the GPU layer by layer while they encode.

    diffusers' group offloading (leaf level, on a side stream): each encoding copies the weights in
    ahead of use and drops them after, so nothing is copied back. Moving the 7 B Qwen whole instead
    took 10.4 s out and 2.5 s in per new prompt on an H200. On a CPU-only host there is nothing to offload.
    """
    if not device.startswith("cuda"):
        return
    from diffusers.hooks import apply_group_offloading

    for name in TEXT_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            apply_group_offloading(module, onload_device=torch.device(device), offload_type="leaf_level",
                                   use_stream=True)
    torch.cuda.empty_cache()


def set_attention_backend(model, backend: str) -> None:
    """`model.set_attention_backend(backend)` for this model alone.

    diffusers 0.42's `ModelMixin.set_attention_backend` sets each processor's backend and then also makes it the
    process-wide default (`_AttentionBackendRegistry.set_active_backend`), which every model loaded later in the
    process without a backend of its own runs with: the next model of a replica switching models, an in-process
    replica's neighbour, a plain-diffusers oracle. The processors' setting is all this model needs: the default is
    put back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    try:
        model.set_attention_backend(backend)
    finally:
        _AttentionBackendRegistry.set_active_backend(default)
