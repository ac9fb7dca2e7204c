"""poster(): the middle frame as a small JPEG, long side at most 320 px, the same bytes for the same frames."""

import io

import numpy as np
import pytest
from PIL import Image

from kandinsky_batch.output.poster import POSTER_SIDE, poster
from kandinsky_batch.output.layout import object_key, poster_key


def _clip(frames: int, height: int, width: int) -> np.ndarray:
    """Smooth gradients, each frame tinted apart from its neighbours so the middle one is recognisable."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x * 255 // max(width - 1, 1) + 40 * i) % 256, y * 255 // max(height - 1, 1),
                               np.full_like(x, 30 * i)], axis=-1) for i in range(frames)]).astype(np.uint8)


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


@pytest.mark.parametrize(("height", "width", "size"), [
    (480, 640, (320, 240)),   # landscape: width bounded
    (768, 512, (213, 320)),   # portrait: height bounded, the other side rounded
    (200, 1000, (320, 64)),
    (320, 320, (320, 320)),   # exactly the bound: kept
    (32, 48, (48, 32)),       # small frames are never upscaled
])
def test_long_side_is_at_most_the_bound_and_never_upscaled(height, width, size):
    image = _decode(poster(_clip(3, height, width)))
    assert image.size == size and max(image.size) <= POSTER_SIDE and image.mode == "RGB"


def test_content_is_the_downscaled_middle_frame():
    clip = _clip(7, 480, 640)
    got = np.asarray(_decode(poster(clip)), dtype=np.int16)

    def downscaled(i: int) -> np.ndarray:
        return np.asarray(Image.fromarray(clip[i]).resize((320, 240), Image.Resampling.LANCZOS), dtype=np.int16)

    error = {i: np.abs(got - downscaled(i)).mean() for i in range(len(clip))}
    assert error[3] < 3, error  # JPEG at quality 80 on smooth content: a level or two
    assert all(error[i] > 10 * error[3] for i in error if i != 3), error
    # An even count takes the later of the two middle frames: frames[len // 2].
    assert np.abs(np.asarray(_decode(poster(clip[:6])), dtype=np.int16) - downscaled(3)).mean() < 3


def test_same_frames_give_the_same_bytes():
    clip = _clip(5, 512, 768)
    assert poster(clip) == poster(clip.copy()) == poster(np.ascontiguousarray(clip[::-1][::-1]))
    assert poster(clip) != poster(clip[1:])


def test_a_few_kb_for_smooth_frames_and_bounded_for_noise():
    assert len(poster(_clip(5, 480, 640))) < 8_000
    noise = np.random.default_rng(0).integers(0, 256, (1, 512, 768, 3), dtype=np.uint8)
    data = poster(noise)
    width, height = _decode(data).size
    assert (width, height) == (320, 213)
    assert len(data) < width * height * 3 // 4, len(data)  # the worst case stays far below the raw pixels


@pytest.mark.parametrize("frames", [np.zeros((0, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.float32),
                                    np.zeros((2, 8, 8), np.uint8)])
def test_bad_frames_raise_value_error(frames):
    with pytest.raises(ValueError, match="frames"):
        poster(frames)


def test_poster_key_shares_the_video_key_stem():
    for row_id in ["clip-0001.v2", "a/b", "../x", "é" * 200]:
        video, still = object_key(row_id, "mp4"), poster_key(row_id)
        assert still.startswith("posters/") and still.endswith(".jpg")
        assert still[len("posters/"):-len(".jpg")] == video[len("videos/"):-len(".mp4")]
    assert poster_key("clip-1") == "posters/clip-1.jpg"
