"""`_SUCCESS`: the marker a finished job writes last, with its counts, config and the libraries' versions."""

from __future__ import annotations

import json
import platform
from importlib import metadata

from kandinsky_batch.output.layout import SUCCESS_KEY
from kandinsky_batch.output.storage import Storage

LIBRARIES = ("torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "av")


def versions() -> dict:
    """Python's and the libraries' versions, as a `_SUCCESS` records them."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_success(storage: Storage, summary: dict) -> None:
    """Publish `_SUCCESS` with the job summary as pretty JSON."""
    text = json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"
    storage.put_bytes(SUCCESS_KEY, text.encode("utf-8"))


def read_success(storage: Storage) -> dict | None:
    """The `_SUCCESS` summary, or None if the job has not finished."""
    try:
        return json.loads(storage.get_bytes(SUCCESS_KEY))
    except FileNotFoundError:
        return None
