"""Encode what a replica renders to bytes and back: frames (H.264 mp4 or lossless npy), one image (PNG, WebP or
JPEG), or frames with sound (mp4 with H.264 video and AAC audio, or a lossless npz of frames and waveform)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable

import av
import numpy as np

# One encoder thread: x264's output depends on its thread count (so never "auto", which follows the host's cores).
# A replica encodes off its render path (the next batch renders meanwhile), so one thread (~5 s for 121 frames of
# 768x512 on one core) does not bound throughput.
X264_THREADS = 1


def _x264_cpu_cap() -> dict[str, str]:
    """x264's SIMD capped at AVX2 on a host with AVX-512: x264's AVX-512 code reads memory it has not written, so
    the same frames gave different bytes now and then (19 of 640 encodes on an Intel Xeon; none with this cap, none
    with `MALLOC_PERTURB_` set). x264's SIMD levels are bit-exact with its C code, so the cap changes no byte of a
    good encode: every host writes the same bytes. `asm` names x264's flags outright, so only where AVX-512 (and so
    AVX2) is present."""
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:  # not Linux: x264 detects its own SIMD
        return {}
    return {"x264-params": "asm=AVX2"} if avx512 else {}


X264_OPTIONS = {"crf": "18", "preset": "medium", **_x264_cpu_cap()}
# The index (moov) before the media (mdat): a browser starts playing a linked mp4 before it has all of it.
MP4_OPTIONS = {"movflags": "+faststart"}


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
    return _write_mp4(lambda container: _mux_frames(container, _video_stream(container, frames, fps), frames))


def _write_mp4(mux: Callable) -> bytes:
    """The bytes of a new mp4 container filled by `mux(container)`, muxed with `MP4_OPTIONS`.

    A file, not memory: to move the moov atom in front FFmpeg reopens its output by name once it is written."""
    with tempfile.TemporaryDirectory(prefix="kb-mp4-") as folder:
        path = os.path.join(folder, "clip.mp4")
        with av.open(path, mode="w", format="mp4", options=dict(MP4_OPTIONS)) as container:
            mux(container)
        with open(path, "rb") as f:
            return f.read()


def _video_stream(container, frames: np.ndarray, fps: int):
    """The container's H.264 stream for these frames (libx264, yuv420p, fixed options and threads)."""
    _, height, width, _ = frames.shape
    stream = container.add_stream("libx264", rate=int(fps))
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.options = dict(X264_OPTIONS)
    stream.codec_context.thread_count = X264_THREADS
    return stream


def _mux_frames(container, stream, frames: np.ndarray) -> None:
    for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))  # drain the encoder's delayed frames


def decode_mp4(data: bytes) -> np.ndarray:
    """Frames of an mp4 as uint8 RGB (F, H, W, 3)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("mp4 holds no video frames")
    return np.stack(frames)


def container_fps(data: bytes) -> int | None:
    """The frame rate an mp4 (or another container PyAV reads) declares for its video stream, rounded; None if none."""
    with av.open(io.BytesIO(data), mode="r") as container:
        rate = container.streams.video[0].average_rate if container.streams.video else None
    return round(float(rate)) if rate else None


def encode_npy(frames: np.ndarray) -> bytes:
    """Lossless `.npy` bytes of the frames."""
    _check_frames(frames)
    buf = io.BytesIO()
    np.save(buf, frames, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Frames from `.npy` bytes (no pickles are loaded)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


IMAGE_FORMATS = ("png", "webp", "jpeg")
# PNG is lossless; WebP and JPEG at a quality where noise-free renders show no artefacts.
_IMAGE_OPTIONS = {"png": dict(format="PNG", optimize=False, compress_level=6),
                  "webp": dict(format="WEBP", quality=95, method=4), "jpeg": dict(format="JPEG", quality=95)}
AAC_BITRATE = 192_000


def encode_image(frames: np.ndarray, fmt: str) -> bytes:
    """One rendered image (frames of shape (1, H, W, 3)) as PNG, WebP or JPEG bytes."""
    from PIL import Image

    _check_frames(frames)
    if frames.shape[0] != 1:
        raise ValueError(f"an image format ({fmt}) holds one frame, got {frames.shape[0]}")
    buf = io.BytesIO()
    Image.fromarray(frames[0], "RGB").save(buf, **_IMAGE_OPTIONS[fmt])
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """An image file as frames (1, H, W, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))[None]


def _check_audio(audio: np.ndarray, sample_rate: int) -> None:
    if not isinstance(audio, np.ndarray) or audio.dtype != np.float32 or audio.ndim != 2 or audio.shape[0] not in (1, 2):
        shape, dtype = getattr(audio, "shape", None), getattr(audio, "dtype", type(audio).__name__)
        raise ValueError(f"audio must be float32 of shape (channels 1 or 2, samples), got shape={shape} dtype={dtype}")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")


def encode_av(frames: np.ndarray, audio: np.ndarray, sample_rate: int, fps: int) -> bytes:
    """mp4 with the H.264 video of `encode_mp4` and the waveform (channels, samples) as AAC at its sample rate."""
    _check_frames(frames)
    _check_audio(audio, sample_rate)

    def mux(container) -> None:
        video = _video_stream(container, frames, fps)
        layout = "mono" if audio.shape[0] == 1 else "stereo"
        sound = container.add_stream("aac", rate=int(sample_rate), layout=layout)
        sound.bit_rate = AAC_BITRATE
        _mux_frames(container, video, frames)
        size = sound.codec_context.frame_size or 1024
        clipped = np.ascontiguousarray(np.clip(audio, -1.0, 1.0))
        for start in range(0, clipped.shape[1], size):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(clipped[:, start:start + size]), format="fltp",
                                               layout=layout)
            chunk.sample_rate, chunk.pts = int(sample_rate), start
            container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))

    return _write_mp4(mux)


def encode_av_copy(frames: np.ndarray, fps: int, source: bytes) -> bytes:
    """mp4 with the H.264 video of `encode_mp4` and the audio stream of the mp4 `source`, packet for packet (no
    re-encoding: the sound decodes exactly as the source's does)."""
    _check_frames(frames)
    with av.open(io.BytesIO(source), mode="r") as original:
        if not original.streams.audio:
            raise ValueError("the source mp4 holds no audio stream")
        return _write_mp4(lambda container: _mux_copy(container, original, frames, fps))


def _mux_copy(container, original, frames: np.ndarray, fps: int) -> None:
    video = _video_stream(container, frames, fps)
    sound_in = original.streams.audio[0]
    sound = container.add_stream_from_template(sound_in)
    _mux_frames(container, video, frames)
    for packet in original.demux(sound_in):
        if packet.dts is None:  # the demuxer's end-of-stream marker
            continue
        packet.stream = sound
        container.mux(packet)


def decode_av(data: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """(frames, waveform (channels, samples) float32, sample rate) of an mp4 with sound."""
    frames = decode_mp4(data)
    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise ValueError("mp4 holds no audio stream")
        rate = container.streams.audio[0].codec_context.sample_rate
        chunks = [frame.to_ndarray() for frame in container.decode(audio=0)]
    audio = np.concatenate(chunks, axis=1).astype(np.float32) if chunks else np.zeros((1, 0), np.float32)
    return frames, audio, rate


def encode_npz(frames: np.ndarray, audio: np.ndarray, sample_rate: int) -> bytes:
    """Lossless `.npz` of the frames, the waveform and its sample rate (no pickles)."""
    _check_frames(frames)
    _check_audio(audio, sample_rate)
    buf = io.BytesIO()
    np.savez(buf, frames=frames, audio=audio, sample_rate=np.int64(sample_rate))
    return buf.getvalue()


def decode_npz(data: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """(frames, waveform, sample rate) from `encode_npz` bytes."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return archive["frames"], archive["audio"], int(archive["sample_rate"])


ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "mp4": encode_mp4,
    "npy": lambda frames, fps: encode_npy(frames),
    **{fmt: (lambda frames, fps, fmt=fmt: encode_image(frames, fmt)) for fmt in IMAGE_FORMATS},
}
DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "mp4": decode_mp4, "npy": decode_npy, "npz": lambda data: decode_npz(data)[0],
    **{fmt: decode_image for fmt in IMAGE_FORMATS},
}


def extension(fmt: str, sound: bool) -> str:
    """The object's file extension: the format's, but raw frames with sound are an `.npz`."""
    return "npz" if fmt == "npy" and sound else fmt


def encode(rendered, fmt: str, fps: int) -> bytes:
    """Encode a render in the named format: frames (mp4, npy, or an image format for one frame), or a
    `pipelines.kinds.Clip` with sound (mp4 with AAC, or npy: an npz with the waveform)."""
    audio = getattr(rendered, "audio", None)
    if audio is not None:
        if fmt == "mp4":
            return encode_av(rendered.frames, audio, rendered.sample_rate, fps)
        if fmt == "npy":
            return encode_npz(rendered.frames, audio, rendered.sample_rate)
        raise ValueError(f"format for video with sound must be mp4 or npy, got {fmt!r}")
    if fmt not in ENCODERS:
        raise ValueError(f"format must be one of {sorted(ENCODERS)}, got {fmt!r}")
    return ENCODERS[fmt](getattr(rendered, "frames", rendered), fps)  # a Clip without sound: its frames


def decode(data: bytes, ext: str) -> np.ndarray:
    """The frames of bytes written by `encode`, by the object's extension (`mp4`, `npy`, `npz`, `png`, ...)."""
    if ext not in DECODERS:
        raise ValueError(f"format must be one of {sorted(DECODERS)}, got {ext!r}")
    return DECODERS[ext](data)
