"""Check a finished output: `_SUCCESS`, one manifest row per id, every ok object present and intact, no strays.

An ok row with latents (`latents_key`) must have them with their size and checksum, like its video.
Every ok row's poster must exist and decode whole as a JPEG. Objects are read from the manifest's keys (one GET
each); the only listing, for strays, goes a page at a time. An ok row without a poster is accepted only when it
was committed before the output's first row with one (an earlier version of kandinsky-batch wrote it, before
posters existed, and a re-run skips done rows rather than revisit them); any later ok row without one is a problem.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from kandinsky_batch.intake.dataset import _reason
from kandinsky_batch.output.manifest import STATUSES, read_manifest, read_parts
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.layout import MANIFEST_DIR, OBJECT_DIRS, SUCCESS_KEY
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.errors import VerifyError

_CHECK_THREADS = 16  # objects are checked concurrently: verification is dominated by round trips


def target_problem(storage: Storage, storage_options: dict | None = None) -> str | None:
    """Why `storage`'s prefix is not a job's output (missing, a file, neither manifest/ nor _SUCCESS), or None."""
    try:
        kind = storage.root_type()
        if kind is None:
            return "no such file or directory"
        if kind == "file":
            return "is a file, not an output prefix (give the output.uri a job wrote to)"
        if not storage.holds(MANIFEST_DIR) and not storage.exists(SUCCESS_KEY):
            return (f"holds no {MANIFEST_DIR}/ and no {SUCCESS_KEY}: not a kandinsky-batch output "
                    "(give the output.uri a job wrote to)")
    except Exception as exc:  # noqa: BLE001 - credentials, network: said in one line, secrets blanked
        return f"cannot be read ({_reason(exc, storage_options)})"
    return None


def open_target(uri: str, storage_options: dict | None, verb: str, error: type[Exception]) -> Storage:
    """The storage of an output prefix to read (`verify`, `report`); `error` naming the verb if it is none."""
    try:
        storage = Storage(uri, storage_options)
    except Exception as exc:  # noqa: BLE001 - unknown protocol, missing backend, bad options
        raise error(f"{verb} {uri!r}: cannot open ({_reason(exc, storage_options)})") from None
    if (problem := target_problem(storage, storage_options)) is not None:
        raise error(f"{verb} {uri!r}: {problem}")
    return storage


def _check_object(storage: Storage, row: dict, prefix: str = "") -> tuple[str | None, str | None]:
    """(key, problem) for one ok row's object (`prefix`: its `latents_` columns for its latents); key is None when
    the uri cannot be mapped to a key."""
    rid, key, size_, sha256 = row["id"], row[f"{prefix}key"], row[f"{prefix}bytes"], row[f"{prefix}sha256"]
    what = "latents" if prefix else "object"
    if key is None or size_ is None or sha256 is None:
        return None, f"id={rid!r}: ok row lacks {prefix}key, {prefix}bytes or {prefix}sha256"
    try:
        data = storage.get_bytes(key)  # read whole for its checksum anyway: its length is its size (no HEAD)
    except FileNotFoundError:
        return key, f"id={rid!r}: {what} {key} is missing"
    if len(data) != size_:
        return key, f"id={rid!r}: {what} {key} has {len(data)} bytes, manifest says {size_}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        return key, f"id={rid!r}: {what} {key} has sha256 {digest}, manifest says {sha256}"
    return key, None


def _check_latents(storage: Storage, row: dict) -> tuple[str | None, str | None]:
    """(key, problem) for one ok row's latents; (None, None) for a row without any."""
    if row["latents_key"] is None and row["latents_bytes"] is None and row["latents_sha256"] is None:
        return None, None
    return _check_object(storage, row, "latents_")


def _check_poster(storage: Storage, row: dict, predates_posters: bool) -> tuple[str | None, str | None]:
    """(key, problem) for one ok row's poster; key is None when it has none or the uri cannot be mapped."""
    rid, key = row["id"], row["poster_key"]
    if key is None:
        return None, None if predates_posters else f"id={rid!r}: ok row has no poster"
    try:
        data = storage.get_bytes(key)
    except FileNotFoundError:
        return key, f"id={rid!r}: poster {key} is missing"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                raise ValueError(f"it is {image.format}, not JPEG")
            image.load()  # decodes every byte: verify() alone would pass a truncated JPEG
    except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the poster is unreadable
        return key, f"id={rid!r}: poster {key} does not decode: {type(exc).__name__}: {exc}"
    return key, None


def _repeated(table: pa.Table, keys: list[str]) -> list[tuple]:
    """Key tuples that occur more than once in `table`."""
    if table.num_rows == 0:
        return []
    counts = table.select(keys).group_by(keys).aggregate([([], "count_all")])
    counts = counts.filter(pc.greater(counts["count_all"], 1))
    return list(zip(*(counts[key].to_pylist() for key in keys)))


def verify(uri: str, storage_options: dict | None = None) -> list[str]:
    """Problems found in the output at `uri`, one line each; [] when it is complete and consistent."""
    storage = open_target(uri, storage_options, "verify", VerifyError)
    problems: list[str] = []
    if read_success(storage) is None:
        problems.append("_SUCCESS is missing: the job did not finish")

    raw, parts = read_parts(storage)
    if not parts:
        problems.append("manifest is missing: no manifest/*.parquet parts")
    elif raw.num_rows == 0:
        problems.append("manifest is empty")
    # One row per input row: a duplicate id's own `invalid` row has its own row_index and is no duplicate.
    duplicates = sorted(_repeated(raw, ["id", "row_index"]))
    if duplicates:
        problems.append(f"manifest has {len(duplicates)} input rows recorded twice across {len(parts)} parts: "
                        f"{duplicates[:10]}")

    table = read_manifest(storage)
    for rid in sorted(_repeated(table.filter(pc.equal(table["status"], "ok")), ["id"])):
        problems.append(f"id={rid[0]!r}: more than one ok row (one object key per id)")
    bad_status = table.filter(pc.invert(pc.is_in(table["status"], pa.array(STATUSES))))
    for row in bad_status.select(["id", "status"]).to_pylist():
        problems.append(f"id={row['id']!r}: status {row['status']!r} is not one of {list(STATUSES)}")

    ok = table.filter(pc.equal(table["status"], "ok"))
    ok_rows = ok.select(["id", "key", "bytes", "sha256", "poster_key", "finished_at", "latents_key", "latents_bytes",
                         "latents_sha256"]).to_pylist()
    first_poster = pc.min(ok.filter(pc.is_valid(ok["poster_key"]))["finished_at"]).as_py()

    def check(row: dict) -> list[tuple[str | None, str | None]]:
        # Null finished_at ranks oldest, as in the manifest's own resolution.
        predates = first_poster is None or row["finished_at"] is None or row["finished_at"] < first_poster
        return [_check_object(storage, row), _check_poster(storage, row, predates), _check_latents(storage, row)]

    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        results = [found for pair in pool.map(check, ok_rows) for found in pair]
    referenced = {key for key, _ in results if key is not None}
    problems.extend(problem for _, problem in results if problem is not None)

    # Strays a listing page at a time: the ok rows' keys are held, the listing never is (only its strays).
    strays = sorted(key for folder in OBJECT_DIRS for key in storage.iter_keys(folder) if key not in referenced)
    problems.extend(f"stray object {key}: no ok manifest row refers to it" for key in strays)
    return problems
