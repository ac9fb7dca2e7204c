"""A video's poster: its middle frame as a small JPEG, for browsing an output without decoding videos."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kandinsky_batch.output.video import _check_frames

POSTER_SIDE = 320  # the long side's bound in pixels; smaller frames keep their size
POSTER_QUALITY = 80


def poster(frames: np.ndarray) -> bytes:
    """JPEG bytes of `frames[len(frames) // 2]`, downscaled (LANCZOS) to a long side of at most POSTER_SIDE.

    The same frames give the same bytes (Pillow's JPEG encoder has no timestamps or randomness).
    """
    _check_frames(frames)
    image = Image.fromarray(frames[len(frames) // 2])
    scale = POSTER_SIDE / max(image.size)
    if scale < 1:
        # Rounded, never below 1 px: a 1x4000 strip still has a poster.
        size = tuple(max(1, round(side * scale)) for side in image.size)
        image = image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=POSTER_QUALITY, optimize=True)
    return buf.getvalue()
