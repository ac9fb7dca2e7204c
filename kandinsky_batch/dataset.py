"""Read the prompt dataset: a Parquet file or directory at any fsspec URI.

Whole-input problems (missing path, not Parquet, no `prompt` column, wrong column types, no rows)
raise InputError with a one-line message before Ray starts.
"""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def _is_text(t: pa.DataType) -> bool:
    # Parquet strings come back as string, large_string or (pyarrow >= 16) string_view.
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


# Column -> predicate on its Arrow type, and the type named in errors.
COLUMNS = {
    "prompt": (_is_text, "string"),
    "id": (lambda t: _is_text(t) or pa.types.is_integer(t), "string or integer"),
    "negative_prompt": (_is_text, "string"),
    "seed": (pa.types.is_integer, "integer"),
    "height": (pa.types.is_integer, "integer"),
    "width": (pa.types.is_integer, "integer"),
    "num_frames": (pa.types.is_integer, "integer"),
    "num_inference_steps": (pa.types.is_integer, "integer"),
    "guidance_scale": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "float"),
}
MAX_NAMED_COLUMNS = 20


class InputError(ValueError):
    """The input dataset as a whole cannot be used; the message says why in one line."""


# Option values that say where, not who: kept in messages unless they embed credentials (user:pass@host).
_PUBLIC_OPTIONS = ("endpoint_url", "region_name", "region")


def _secrets(options, name: str = "") -> list[str]:
    """Every string value in (nested) storage options that could be a credential: never shown in a message."""
    if isinstance(options, dict):
        return [s for key, value in options.items() for s in _secrets(value, str(key))]
    if isinstance(options, (list, tuple)):
        return [s for value in options for s in _secrets(value, name)]
    if not isinstance(options, str) or len(options) < 4:
        return []
    return [] if name in _PUBLIC_OPTIONS and "@" not in options else [options]


def _reason(exc: BaseException, storage_options: dict | None) -> str:
    """The first line of an exception, with any storage option value blanked out."""
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    for secret in _secrets(storage_options):
        line = line.replace(secret, "<redacted>")
    return line


def _read_file(fs, file: str) -> pa.Table:
    table = pq.read_table(file, filesystem=fs)
    # pandas categoricals come back dictionary-encoded; rows want plain values.
    for name in COLUMNS:
        for i in table.schema.get_all_field_indices(name):
            if pa.types.is_dictionary(table.schema.field(i).type):
                table = table.set_column(i, name, table.column(i).cast(table.schema.field(i).type.value_type))
    return table


def read_table(path: str, storage_options: dict | None = None) -> pa.Table:
    """Read the whole dataset (a file, or a directory of `*.parquet` in name order) and check its columns."""
    where = f"input.path={path!r}"
    try:
        fs, root = fsspec.core.url_to_fs(path, skip_instance_cache=True, **(storage_options or {}))
    except Exception as exc:  # noqa: BLE001 - unknown protocol, missing backend, bad options
        raise InputError(f"{where}: cannot open ({_reason(exc, storage_options)})") from None
    try:
        exists = fs.exists(root)
        files = sorted(f for f in fs.find(root) if f.endswith(".parquet")) if exists and fs.isdir(root) else None
    except Exception as exc:  # noqa: BLE001 - credentials, network, permissions
        raise InputError(f"{where}: cannot list ({_reason(exc, storage_options)})") from None
    if not exists:
        raise InputError(f"{where}: no such file or directory")
    if files == []:
        raise InputError(f"{where}: directory holds no .parquet files")

    tables = []
    for file in files or [root]:
        try:
            tables.append(_read_file(fs, file))
        except Exception as exc:  # noqa: BLE001 - corrupt, truncated, not Parquet, unreadable
            name = "" if files is None else f" file {file!r}"
            raise InputError(f"{where}:{name} not a readable Parquet file ({_reason(exc, storage_options)})") from None
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{where}: the files' columns do not agree ({_reason(exc, storage_options)})") from None
    check_columns(table, path)
    return table


def check_columns(table: pa.Table, path: str) -> None:
    """Refuse a dataset without `prompt`, with a known column of the wrong type or twice, or with no rows."""
    where = f"input.path={path!r}"
    names = table.column_names
    if "prompt" not in names:
        shown = names[:MAX_NAMED_COLUMNS] + (["..."] if len(names) > MAX_NAMED_COLUMNS else [])
        raise InputError(f"{where}: required column 'prompt' is missing (columns: {shown})")
    for name, (ok, wanted) in COLUMNS.items():
        count = names.count(name)
        if count > 1:
            raise InputError(f"{where}: column {name!r} appears {count} times")
        if count:
            actual = table.schema.field(name).type
            if not (ok(actual) or pa.types.is_null(actual)):
                raise InputError(f"{where}: column {name!r} has type {actual}, expected {wanted}")
    if table.num_rows == 0:
        raise InputError(f"{where}: the dataset has no rows")
