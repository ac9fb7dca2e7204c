"""Frame encoding: H.264 mp4 is close and deterministic, npy is exact, bad inputs fail loudly."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from kandinsky_batch.output import video
from kandinsky_batch.output.video import (decode, decode_av, decode_mp4, decode_npy, encode, encode_av, encode_av_copy,
                                   encode_mp4, encode_npy)


def smooth_frames(num_frames: int = 9, height: int = 64, width: int = 96) -> np.ndarray:
    """A slowly moving colour gradient: the kind of content a lossy codec keeps well."""
    t = np.arange(num_frames)[:, None, None, None] / num_frames
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    phase = np.array([0.0, 0.33, 0.66])
    return (255 * (0.5 + 0.5 * np.sin(np.pi * (x + 0.5 * y + t + phase)))).astype(np.uint8)


def test_mp4_round_trip_is_close():
    frames = smooth_frames()
    data = encode_mp4(frames, fps=24)
    decoded = decode_mp4(data)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean() < 3.0


def test_mp4_container_records_codec_and_fps():
    data = encode_mp4(smooth_frames(num_frames=5), fps=16)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 16
        assert stream.codec_context.pix_fmt == "yuv420p"


def test_mp4_bytes_are_deterministic():
    frames = smooth_frames()
    assert encode_mp4(frames, 24) == encode_mp4(frames.copy(), 24)


def test_mp4_bytes_are_the_same_when_encodes_run_at_once_in_one_process():
    """A replica encodes one row while it renders the next, and a process may hold several encoders at a time.
    64 encodes: uncapped, x264's AVX-512 code made about 1 in 40 of them differ on an Intel Xeon."""
    from concurrent.futures import ThreadPoolExecutor

    frames = smooth_frames(num_frames=17)
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda _: encode_mp4(frames, 24), range(64)))
    assert len(set(outputs)) == 1 and outputs[0] == encode_mp4(frames, 24)


def test_npy_round_trip_is_exact():
    frames = np.random.default_rng(0).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_npy(encode_npy(frames)), frames)
    assert np.array_equal(decode(encode(frames, "npy", 24), "npy"), frames)


def test_encode_dispatches_by_format():
    frames = smooth_frames(num_frames=3)
    assert encode(frames, "mp4", 24) == encode_mp4(frames, 24)
    assert encode(frames, "npy", 24) == encode_npy(frames)
    with pytest.raises(ValueError, match="format must be one of"):
        encode(frames, "gif", 24)


def test_mp4_rejects_odd_sizes_naming_them():
    with pytest.raises(ValueError, match="height=63 width=96"):
        encode_mp4(smooth_frames(height=63), 24)
    with pytest.raises(ValueError, match="height=64 width=95"):
        encode_mp4(smooth_frames(width=95), 24)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((2, 8, 8, 4), np.uint8),
        np.zeros((0, 8, 8, 3), np.uint8),
    ],
    ids=["float", "3d", "rgba", "empty"],
)
def test_bad_frames_are_rejected(frames):
    with pytest.raises(ValueError, match="frames must"):
        encode_mp4(frames, 24)
    with pytest.raises(ValueError, match="frames must"):
        encode_npy(frames)


def test_bad_fps_is_rejected():
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(smooth_frames(num_frames=2), 0)


def top_level_boxes(data: bytes) -> list[str]:
    """The types of an mp4's top-level boxes, in file order (ISO BMFF: 32-bit size, 4-char type; size 1 = 64-bit)."""
    boxes, at = [], 0
    while at < len(data):
        size, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8].decode("ascii")
        if size == 1:
            size = int.from_bytes(data[at + 8:at + 16], "big")
        assert size >= 8, f"box {kind!r} at {at} has size {size}"
        boxes.append(kind)
        at += size
    assert at == len(data), "boxes do not tile the file"
    return boxes


def _sound(seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]).astype(np.float32) * 0.5


ENCODE_PATHS = {
    "mp4": lambda frames: encode(frames, "mp4", 12),
    "av": lambda frames: encode_av(frames, _sound(), 16000, 12),
    "av_copy": lambda frames: encode_av_copy(frames, 12, encode_av(frames[::-1].copy(), _sound(), 16000, 12)),
}


@pytest.mark.parametrize("path", sorted(ENCODE_PATHS))
def test_every_mp4_has_its_moov_before_its_mdat_and_decodes_as_before(path, monkeypatch):
    frames = smooth_frames(num_frames=6)
    faststart = ENCODE_PATHS[path](frames)
    boxes = top_level_boxes(faststart)
    assert boxes.index("moov") < boxes.index("mdat"), boxes
    # Before: the same muxer without faststart (moov last, the positive control); the media decode identically.
    monkeypatch.setattr(video, "MP4_OPTIONS", {})
    before = ENCODE_PATHS[path](frames)
    boxes = top_level_boxes(before)
    assert boxes.index("moov") > boxes.index("mdat"), boxes
    assert np.array_equal(decode_mp4(faststart), decode_mp4(before))
    if path != "mp4":
        (_, audio, rate), (_, audio_before, rate_before) = decode_av(faststart), decode_av(before)
        assert rate == rate_before and np.array_equal(audio, audio_before) and audio.shape[1] > 0
