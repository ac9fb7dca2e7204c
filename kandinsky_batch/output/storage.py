"""Whole-object storage for one output prefix (local disk, S3, GCS, Azure) over fsspec."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kandinsky_batch.output.leftovers import TEMP_PREFIX, abort_s3_uploads, is_temp, remove_local_temp
from kandinsky_batch.output.retry import with_retries

T = TypeVar("T")

def _walk(path: str):
    """Every file under a local directory, recursively (nothing if it does not exist)."""
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)
        else:
            yield entry.path


def _check_key(key: str, allow_root: bool = False) -> str:
    if key == "" and allow_root:
        return key
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"storage key must be a relative '/'-separated path without '.', '..' or empty parts: {key!r}")
    return key


class Storage:
    """Objects under one prefix, addressed by '/'-separated keys relative to it."""

    def __init__(
        self,
        uri: str,
        storage_options: dict | None = None,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
    ) -> None:
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got retries={retries}, backoff={backoff}")
        self.uri = uri
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._options = dict(storage_options or {})
        scheme, _ = fsspec.core.split_protocol(uri)
        # A fresh instance: fsspec's cache would hand back one bound to a dead endpoint or stale listings.
        self.fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **self._options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.scheme = "file" if self.local else (scheme or self.fs.protocol[0])
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self) -> tuple:
        # Rebuild from arguments so Ray ships a small object and each process gets its own client.
        return (Storage, (self.uri, self._options, self.retries, self.backoff, self.max_backoff))

    def _path(self, key: str, allow_root: bool = False) -> str:
        key = _check_key(key, allow_root)
        return f"{self.root}/{key}" if key else self.root

    def under(self, key: str) -> "Storage":
        """The storage of the prefix `key` under this one, with the same options (a job output's `scores/`)."""
        return Storage(self.url(key), self._options, self.retries, self.backoff, self.max_backoff)

    def with_budget(self, retries: int, backoff: float) -> "Storage":
        """The same prefix and options under another retry budget (a last write that must not hold an exit up)."""
        return Storage(self.uri, self._options, retries, backoff, self.max_backoff)

    def url(self, key: str) -> str:
        """Full URI of a key (`file:///abs/path` for local disk)."""
        return f"{self.scheme}://{self._path(key)}"

    def key_of(self, url: str) -> str:
        """Inverse of `url`: the key of a URI under this prefix; ValueError if it lies outside."""
        base = f"{self.scheme}://{self.root}/"
        if not url.startswith(base):
            raise ValueError(f"URI {url!r} is not under {base!r}")
        return _check_key(url[len(base) :])

    def _retry(self, key: str, op: Callable[[], T]) -> T:
        """One operation under this storage's retry budget (`output.retries`, `output.retry_backoff`)."""
        return with_retries(key, op, self.retries, self.backoff, self.max_backoff)

    def _write_local_temp(self, final: str, data: bytes) -> str:
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        # os.open with 0o666 lets the umask decide permissions, as for any other file the job writes.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object; readers see the old object or the new one, never a partial one."""
        path = self._path(key)

        def op() -> None:
            if self.local:
                tmp = self._write_local_temp(path, data)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    _unlink_quietly(tmp)
                    raise
            else:
                # A single PUT (or an MPU completed only at the end); fs.open() would publish a truncated object.
                self.fs.pipe_file(path, data)

        self._retry(key, op)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create a whole object only if the key is free; False if it already existed."""
        path = self._path(key)

        def op() -> bool:
            if self.local:
                tmp = self._write_local_temp(path, data)
                try:
                    os.link(tmp, path)  # fails with FileExistsError instead of replacing
                finally:
                    _unlink_quietly(tmp)
            else:
                self.fs.pipe_file(path, data, mode="create")  # S3 If-None-Match: *
            return True

        try:
            return self._retry(key, op)
        except FileExistsError:
            return False

    def get_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if missing."""
        path = self._path(key)

        def op() -> bytes:
            self.fs.invalidate_cache()
            return self.fs.cat_file(path)

        return self._retry(key, op)

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        """Object size in bytes, or None if missing."""
        path = self._path(key)

        def op() -> int | None:
            self.fs.invalidate_cache()
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
            return int(info["size"]) if info.get("type") == "file" else None

        return self._retry(key, op)

    def modified(self, key: str) -> datetime | None:
        """When the store last wrote the object, by the store's own clock (S3: `LastModified`, whole seconds), or
        None if missing: what a lease's staleness is judged by, so no two hosts' clocks are compared."""
        path = self._path(key)

        def op() -> datetime | None:
            self.fs.invalidate_cache()
            try:
                stamp = self.fs.modified(path)
            except FileNotFoundError:
                return None
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)

        return self._retry(key, op)

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of all files under a prefix (recursive); in-flight temp files are skipped."""
        path = self._path(prefix.rstrip("/"), allow_root=True)

        def op() -> list[str]:
            if self.local:
                return list(_walk(path))  # names only: fsspec's find builds a dict per file first
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(path)
            except FileNotFoundError:
                return []
            return found

        base = self.root + "/"
        keys = (p[len(base) :] for p in self._retry(prefix, op) if p.startswith(base))
        return sorted(k for k in keys if not is_temp(k))

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error, so retries and re-runs are safe."""
        path = self._path(key)

        def op() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

        self._retry(key, op)

    def cleanup_temp(self, prefix: str = "", older_than_s: float = 0.0) -> int:
        """Remove leftovers of interrupted writes (local temp files, S3 multipart uploads); returns the count."""
        path = self._path(prefix.rstrip("/"), allow_root=True)
        if self.local:
            return self._retry(prefix, lambda: remove_local_temp(path, older_than_s))
        if self.fs.protocol[0] in ("s3", "s3a"):
            return self._retry(prefix, lambda: abort_s3_uploads(self.fs, path, older_than_s))
        return 0  # GCS resumable uploads and Azure uncommitted blocks expire by themselves

def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
