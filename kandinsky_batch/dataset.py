"""Read the prompt dataset: a Parquet file or directory at any fsspec URI.

Whole-input problems (missing path, not Parquet, no `prompt` column, wrong column types, no rows)
raise InputError with a one-line message before Ray starts.
"""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

# Column -> predicate on its Arrow type, and the type named in errors.
COLUMNS = {
    "prompt": (pa.types.is_string, "string"),
    "id": (lambda t: pa.types.is_string(t) or pa.types.is_integer(t), "string or integer"),
    "negative_prompt": (pa.types.is_string, "string"),
    "seed": (pa.types.is_integer, "integer"),
    "height": (pa.types.is_integer, "integer"),
    "width": (pa.types.is_integer, "integer"),
    "num_frames": (pa.types.is_integer, "integer"),
    "num_inference_steps": (pa.types.is_integer, "integer"),
    "guidance_scale": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "float"),
}


class InputError(ValueError):
    """The input dataset as a whole cannot be used; the message says why in one line."""


def _is_null_type(t: pa.DataType) -> bool:
    return pa.types.is_null(t)


def read_table(path: str, storage_options: dict | None = None) -> pa.Table:
    """Read the whole dataset (a file or a directory of `*.parquet`) and check its columns."""
    try:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise InputError(f"input.path={path!r}: cannot open ({exc})") from None
    if not fs.exists(root):
        raise InputError(f"input.path={path!r}: no such file or directory")
    try:
        if fs.isdir(root):
            files = sorted(f for f in fs.find(root) if f.endswith(".parquet"))
            if not files:
                raise InputError(f"input.path={path!r}: directory holds no .parquet files")
            table = pa.concat_tables(
                [pq.read_table(f, filesystem=fs) for f in files], promote_options="permissive"
            )
        else:
            table = pq.read_table(root, filesystem=fs)
    except InputError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"input.path={path!r}: not a readable Parquet dataset ({first})") from None
    check_columns(table, path)
    return table


def check_columns(table: pa.Table, path: str) -> None:
    """Refuse a dataset without `prompt`, with a known column of the wrong type, or with no rows."""
    if "prompt" not in table.column_names:
        raise InputError(f"input.path={path!r}: required column 'prompt' is missing (columns: {table.column_names})")
    for name, (ok, wanted) in COLUMNS.items():
        if name in table.column_names:
            actual = table.schema.field(name).type
            if not (ok(actual) or _is_null_type(actual) or pa.types.is_large_string(actual) and wanted == "string"):
                raise InputError(f"input.path={path!r}: column {name!r} has type {actual}, expected {wanted}")
    if table.num_rows == 0:
        raise InputError(f"input.path={path!r}: the dataset has no rows")
