"""Moving bytes for a format writer: a sample's video read back checked, an export object published exactly once."""

from __future__ import annotations

import hashlib

from kandinsky_batch.errors import InputError, ResumeConflict
from kandinsky_batch.export.sample import Sample
from kandinsky_batch.output.storage import Storage


def read_video(source: Storage, sample: Sample, extension: str) -> bytes:
    """The bytes of the sample's video, refused unless they hash to the sha256 the manifest recorded."""
    key = sample.media[extension]
    data = source.get_bytes(key)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sample.sha256:
        raise InputError(
            f"id {sample.id!r}: {source.url(key)} has sha256 {digest}, the manifest recorded {sample.sha256}; "
            "the source output changed after it was rendered (`kandinsky-batch verify` it)"
        )
    return data


def publish_once(dest: Storage, key: str, data: bytes) -> bool:
    """Create `key` with `data`; True if created, False if it already held these bytes (a resumed export).

    Other bytes under the key raise: an earlier export wrote it from other samples or another source."""
    if dest.put_bytes_if_absent(key, data):
        return True
    existing = hashlib.sha256(dest.get_bytes(key)).hexdigest()
    built = hashlib.sha256(data).hexdigest()
    if existing != built:
        raise ResumeConflict(
            f"{dest.url(key)} already exists with sha256 {existing}, this export built sha256 {built}: "
            "DEST holds another export's object; export to an empty DEST"
        )
    return False


def replace(dest: Storage, key: str, data: bytes) -> None:
    """Replace `key` whole with `data` (an index, a metadata file), leaving it untouched when it holds them."""
    try:
        if dest.get_bytes(key) == data:
            return
    except FileNotFoundError:
        pass
    dest.put_bytes(key, data)
