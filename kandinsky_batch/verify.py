"""Check a finished output: `_SUCCESS`, one manifest row per id, every ok object present and intact, no strays."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from .manifest import STATUSES, read_manifest, read_parts, read_success
from .storage import Storage

VIDEOS_DIR = "videos"
_CHECK_THREADS = 16  # objects are checked concurrently: verification is dominated by round trips


def _check_object(storage: Storage, row: dict) -> tuple[str | None, str | None]:
    """(key, problem) for one ok row; key is None when the uri cannot be mapped to a key."""
    rid = row["id"]
    if row["uri"] is None or row["bytes"] is None or row["sha256"] is None:
        return None, f"id={rid!r}: ok row lacks uri, bytes or sha256"
    try:
        key = storage.key_of(row["uri"])
    except ValueError as exc:
        return None, f"id={rid!r}: {exc}"
    size = storage.size(key)
    if size is None:
        return key, f"id={rid!r}: object {key} is missing"
    if size != row["bytes"]:
        return key, f"id={rid!r}: object {key} has {size} bytes, manifest says {row['bytes']}"
    digest = hashlib.sha256(storage.get_bytes(key)).hexdigest()
    if digest != row["sha256"]:
        return key, f"id={rid!r}: object {key} has sha256 {digest}, manifest says {row['sha256']}"
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
    storage = Storage(uri, storage_options)
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

    ok_rows = table.filter(pc.equal(table["status"], "ok")).select(["id", "uri", "bytes", "sha256"]).to_pylist()
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        results = list(pool.map(lambda row: _check_object(storage, row), ok_rows))
    referenced = {key for key, _ in results if key is not None}
    problems.extend(problem for _, problem in results if problem is not None)

    for key in storage.list(VIDEOS_DIR):
        if key not in referenced:
            problems.append(f"stray object {key}: no ok manifest row refers to it")
    return problems
