"""The export formats by name, each a module imported only when asked for.

A format module has `NAME`, `SHARDED`, `check(samples)`, `write_unit(unit, source, dest)` and
`finish(dest, index, samples)` (docs/exports.md#writing-a-format).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kandinsky_batch.errors import InputError

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
