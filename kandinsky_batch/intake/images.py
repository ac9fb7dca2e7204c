"""Conditioning images: a row's `image` (an fsspec URI, a path relative to the dataset, or the bytes themselves),
read, checked and hashed before anything renders.

A row whose image is missing, unreadable, not an image or of a size no model takes is `invalid`, naming the field,
the value and the rule; the rest render. The manifest records the image's URI and sha256, and resume treats a
changed image as a changed parameter. How the image is fitted to the render size is the pipeline's own behaviour
(recorded in docs/family.md), never done here.

Images read from a URI are read again by the replica that renders the row (the driver keeps only their sha256,
so its memory does not grow with the images); the replica checks the sha256 and fails the row if the image changed
in between. Images given as bytes in the dataset travel with their row.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec

from pipelines.limits import image_size

MAX_SIDE = 8192
MIN_SIDE = 16
MAX_BYTES = 64 * 2**20
_THREADS = 16  # reads are dominated by round trips on object stores


@dataclass(frozen=True)
class Conditioning:
    """One row's image as checked: where it came from (None for bytes in the dataset), its sha256 and, for
    images given as bytes, the bytes."""

    uri: str | None
    sha256: str
    data: bytes | None = None
    size: tuple = (0, 0)
    """(width, height) as the pipelines see it (EXIF orientation applied)."""


def shown(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return repr(value if len(value) <= 80 else value[:77] + "...")


def check_image(data: bytes) -> str | None:
    """Why `data` is not an image a model can take, or None."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_BYTES:
        return f"{len(data)} bytes (rule: at most {MAX_BYTES} bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max(width, height) > MAX_SIDE or min(width, height) < MIN_SIDE:
                return f"{width}x{height} pixels (rule: each side from {MIN_SIDE} to {MAX_SIDE} pixels)"
            image.load()  # decodes whole: a truncated file fails here, not on the GPU
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return f"not an image ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


class ImageReader:
    """Reads the `image` values of a dataset's rows: URIs and paths relative to the dataset's folder, or bytes."""

    def __init__(self, dataset_path: str, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(dataset_path, **self.storage_options)
        folder = root if fs.isdir(root) else posixpath.dirname(root)
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        self.base = folder if protocol in ("file", "local") else f"{protocol}://{folder}"

    def uri(self, value: str) -> str:
        """A row's image value as a URI: URIs and absolute paths as they are, others relative to the dataset."""
        if "://" in value or value.startswith("/"):
            return value
        return f"{self.base.rstrip('/')}/{value}"

    def _one(self, value) -> Conditioning | str:
        if isinstance(value, (bytes, bytearray)):
            data, uri = bytes(value), None
        else:
            if not value.strip():
                return f"image={shown(value)}: empty (rule: an image URI, a path relative to the dataset, or bytes)"
            uri = self.uri(value)
            try:
                data = read(uri, self.storage_options)
            except Exception as exc:  # noqa: BLE001 - any failure to read is the row's problem
                return f"image={shown(value)}: cannot read {uri} ({type(exc).__name__}: {str(exc)[:160]})"
        problem = check_image(data)
        if problem is not None:
            return f"image={shown(value)}: {problem}"
        return Conditioning(uri, hashlib.sha256(data).hexdigest(), None if uri else data, image_size(data))

    def read_all(self, values: list) -> list[Conditioning | str | None]:
        """Each value checked: a `Conditioning`, the row's error message, or None where the value is null."""
        todo = [(i, v) for i, v in enumerate(values) if v is not None]
        found: list = [None] * len(values)
        with ThreadPoolExecutor(min(_THREADS, max(1, len(todo)))) as pool:
            for (i, _), result in zip(todo, pool.map(lambda item: self._one(item[1]), todo)):
                found[i] = result
        return found


def read(uri: str, storage_options: dict | None = None) -> bytes:
    """The bytes at an image URI (the replica's read: the same URI the driver checked)."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        data = f.read(MAX_BYTES + 1)
    return data
