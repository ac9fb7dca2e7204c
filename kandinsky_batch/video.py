"""Encode rendered frames to bytes (H.264 mp4 or lossless npy) and back."""

from __future__ import annotations

import io
from collections.abc import Callable

import av
import numpy as np

# Fixed rather than "auto": x264's output depends on its thread count, and auto follows the host's cores.
X264_THREADS = 4
X264_OPTIONS = {"crf": "18", "preset": "medium"}


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        shape, dtype = getattr(frames, "shape", None), getattr(frames, "dtype", type(frames).__name__)
        raise ValueError(f"frames must be a uint8 array of shape (F, H, W, 3), got shape={shape} dtype={dtype}")
    if frames.shape[0] == 0:
        raise ValueError(f"frames must hold at least one frame, got shape={frames.shape}")


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 (libx264, yuv420p) mp4 of uint8 RGB frames (F, H, W, 3); identical frames give identical bytes."""
    _check_frames(frames)
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"mp4 (yuv420p) needs even height and width, got height={height} width={width}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = dict(X264_OPTIONS)
        stream.codec_context.thread_count = X264_THREADS
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))  # drain the encoder's delayed frames
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """Frames of an mp4 as uint8 RGB (F, H, W, 3)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("mp4 holds no video frames")
    return np.stack(frames)


def encode_npy(frames: np.ndarray) -> bytes:
    """Lossless `.npy` bytes of the frames."""
    _check_frames(frames)
    buf = io.BytesIO()
    np.save(buf, frames, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Frames from `.npy` bytes (no pickles are loaded)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "mp4": encode_mp4,
    "npy": lambda frames, fps: encode_npy(frames),
}
DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {"mp4": decode_mp4, "npy": decode_npy}


def encode(frames: np.ndarray, fmt: str, fps: int) -> bytes:
    """Encode frames in the named format (`mp4` or `npy`)."""
    if fmt not in ENCODERS:
        raise ValueError(f"format must be one of {sorted(ENCODERS)}, got {fmt!r}")
    return ENCODERS[fmt](frames, fps)


def decode(data: bytes, fmt: str) -> np.ndarray:
    """Decode bytes written by `encode` in the named format."""
    if fmt not in DECODERS:
        raise ValueError(f"format must be one of {sorted(DECODERS)}, got {fmt!r}")
    return DECODERS[fmt](data)
