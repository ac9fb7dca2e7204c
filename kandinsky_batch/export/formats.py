"""The export formats by name, each a module imported only when asked for, and the one way a writer publishes.

A format module has `NAME`, `SHARDED`, `check(samples)`, `write_unit(unit, source, dest)` and
`finish(dest, index, samples)` (docs/exports.md#writing-a-format).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kandinsky_batch.errors import InputError
from kandinsky_batch.output.storage import Storage

FORMATS = {
    "webdataset": "kandinsky_batch.export.webdataset",
    "videofolder": "kandinsky_batch.export.videofolder",
    "csv": "kandinsky_batch.export.csv_manifest",
    "vbench": "kandinsky_batch.export.vbench",
}


def load_format(name: str) -> ModuleType:
    """The format module for `--format name`; InputError naming the value when there is none."""
    if name not in FORMATS:
        raise InputError(f"--format={name!r}: unknown format; one of {sorted(FORMATS)}")
    return importlib.import_module(FORMATS[name])


def publish(dest: Storage, key: str, data: bytes) -> None:
    """Create `key` whole with `data`, once: the same bytes already there are a resumed export's and accepted,
    other bytes mean the destination holds another export's object and raise."""
    if dest.put_bytes_if_absent(key, data):
        return
    if dest.get_bytes(key) != data:
        raise RuntimeError(f"{dest.url(key)} exists with other bytes than this export writes there: the "
                           "destination holds another export's object; export to an empty --to")


def replace(dest: Storage, key: str, data: bytes) -> None:
    """Replace `key` whole with `data` (an index, a metadata file), leaving it untouched when it holds them."""
    try:
        if dest.get_bytes(key) == data:
            return
    except FileNotFoundError:
        pass
    dest.put_bytes(key, data)
