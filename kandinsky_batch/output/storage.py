"""Whole-object storage for one output prefix (local disk, S3, GCS, Azure) over fsspec."""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kandinsky_batch.output.leftovers import TEMP_PREFIX, abort_s3_uploads, is_temp, remove_local_temp
from kandinsky_batch.output.listing import local_pages, s3_page
from kandinsky_batch.output.retry import with_retries

T = TypeVar("T")
S3_PROTOCOLS = ("s3", "s3a")


def one_retry_layer(protocol: str | None, options: dict) -> dict:
    """`options` with botocore's own retries off for S3, so throttles reach `Storage`'s retry layer (counted there).

    botocore would retry a 503 SlowDown up to 4 more times unseen (its default legacy mode:
    botocore.configprovider `_DEFAULT_RETRY_MODE`, `data/_retry.json` max_attempts 5); an explicit
    `config_kwargs.retries` in the job's storage options is kept as given."""
    if protocol not in S3_PROTOCOLS:
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    return {**options, "config_kwargs": config}


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
        self.fs, root = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **one_retry_layer(scheme, self._options))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.scheme = "file" if self.local else (scheme or self.fs.protocol[0])
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        self.s3 = not self.local and self.fs.protocol[0] in S3_PROTOCOLS
        if self.s3:
            # s3fs' `_error_wrapper` would retry SlowDown 5 times itself (S3FileSystem.retries): one attempt there.
            self.fs.retries = 1
        self.requests: Counter = Counter()
        """Attempts of each operation (`put`, `get`, `head`, `list`, `delete`), retries included: on S3 one request
        each (a listing: one per page; a write over 100 MB: its multipart upload's)."""
        self.retried = 0
        """Attempts made again after a transient error (throttling, a dropped connection): `storage_retries`."""
        self._counted = threading.Lock()
        self._taken = 0

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

    def _retry(self, key: str, op: Callable[[], T], kind: str) -> T:
        """One operation of `kind` under this storage's retry budget (`output.retries`, `output.retry_backoff`):
        the one place a storage operation is retried, and where its attempts and retries are counted."""

        def attempt() -> T:
            with self._counted:
                self.requests[kind] += 1
            return op()

        def retried(exc: BaseException) -> None:
            with self._counted:
                self.retried += 1

        return with_retries(key, attempt, self.retries, self.backoff, self.max_backoff, retried)

    def take_retries(self) -> int:
        """Retries since the last call (a replica reports them with each batch)."""
        with self._counted:
            taken, self._taken = self.retried - self._taken, self.retried
        return taken

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
                # A single PUT below 100 MB (s3fs `_pipe_file`: 2 x its 50 MB chunk), above it a multipart upload
                # completed only at the end and aborted on error: never a partial object. fs.open() could be one.
                self.fs.pipe_file(path, data)

        self._retry(key, op, "put")

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
                # S3 If-None-Match: * on the PUT, or on CompleteMultipartUpload for a large object (s3fs
                # `_pipe_file`). A retried PUT whose first try landed finds its own object: False, as for a rival.
                self.fs.pipe_file(path, data, mode="create")
            return True

        try:
            return self._retry(key, op, "put")
        except FileExistsError:
            return False

    def get_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if missing."""
        path = self._path(key)

        def op() -> bytes:
            if self.s3:
                # One GET: with its default concurrency s3fs first HEADs the object to split large reads.
                return self.fs.cat_file(path, max_concurrency=1)
            self.fs.invalidate_cache()
            return self.fs.cat_file(path)

        return self._retry(key, op, "get")

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        """Object size in bytes, or None if missing."""
        path = self._path(key)

        def op() -> int | None:
            if self.s3:
                # One HEAD: s3fs' info() follows a missing key's 404 with a listing (is it a directory?).
                bucket, _, name = path.partition("/")
                try:
                    return int(self.fs.call_s3("head_object", Bucket=bucket, Key=name)["ContentLength"])
                except FileNotFoundError:
                    return None
            self.fs.invalidate_cache()
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                return None
            return int(info["size"]) if info.get("type") == "file" else None

        return self._retry(key, op, "head")

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

        return self._retry(key, op, "head")

    def root_type(self) -> str | None:
        """What the prefix itself is: `file`, `directory` (an S3 prefix holding objects), or None if nothing."""

        def op() -> str | None:
            self.fs.invalidate_cache()
            try:
                return self.fs.info(self.root).get("type")
            except FileNotFoundError:
                return None

        return self._retry("", op, "head")

    def pages(self, prefix: str = "") -> Iterator[list[str]]:
        """Keys of the files under a prefix, a folder (recursive; a key of a file lists nothing), a page
        (<= 1,000) at a time, in no promised order; in-flight temp files are skipped. Each S3 page is one request,
        retried alone."""
        path = self._path(prefix.rstrip("/"), allow_root=True)
        base = self.root + "/"

        def keys(paths: list[str]) -> list[str]:
            return [k for k in (p[len(base):] for p in paths if p.startswith(base)) if not is_temp(k)]

        if self.local:
            # A walk that raised cannot resume where it was, so a local listing is counted but not retried.
            for page in local_pages(path):
                with self._counted:
                    self.requests["list"] += 1
                yield keys(page)
        elif self.s3:
            token: str | None = None
            while True:
                page, token = self._retry(prefix, lambda: s3_page(self.fs, path, token), "list")
                yield keys(page)
                if token is None:
                    return
        else:
            # GCS and Azure through fsspec's find, which gathers its pages first: one page of everything.
            def found() -> list[str]:
                self.fs.invalidate_cache()
                try:
                    return self.fs.find(path)
                except FileNotFoundError:
                    return []

            yield keys(self._retry(prefix, found, "list"))

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """`pages` one key at a time: stop early and the rest is never listed."""
        for page in self.pages(prefix):
            yield from page

    def holds(self, prefix: str) -> bool:
        """Whether the prefix is there: a local folder (empty or not), or on an object store a prefix holding
        an object, its folders existing only through them (one listing request on S3)."""
        if self.local:
            return os.path.isdir(self._path(prefix.rstrip("/"), allow_root=True))
        return next(self.iter_keys(prefix), None) is not None

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of all files under a prefix (recursive): for folders of bookkeeping (manifest parts, an
        export's plan), not of objects; those are read with `pages`."""
        return sorted(self.iter_keys(prefix))

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error, so retries and re-runs are safe."""
        path = self._path(key)

        def op() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

        self._retry(key, op, "delete")

    def cleanup_temp(self, prefix: str = "", older_than_s: float = 0.0) -> int:
        """Remove leftovers of interrupted writes (local temp files, S3 multipart uploads); returns the count."""
        path = self._path(prefix.rstrip("/"), allow_root=True)
        if self.local:
            return self._retry(prefix, lambda: remove_local_temp(path, older_than_s), "list")
        if self.s3:
            return self._retry(prefix, lambda: abort_s3_uploads(self.fs, path, older_than_s), "list")
        return 0  # GCS resumable uploads and Azure uncommitted blocks expire by themselves

def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
