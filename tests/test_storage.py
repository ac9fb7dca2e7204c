"""Storage on local disk and on S3 (moto): whole-object writes, create-only, listing, retries, safe keys."""

from __future__ import annotations

import errno
import os
import pickle
import re

import pytest
from botocore.exceptions import EndpointConnectionError

from kandinsky_batch.errors import StorageUnavailable
from kandinsky_batch.output.leftovers import TEMP_PREFIX
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import object_key


def _flaky(fn, failures: int, exc: BaseException):
    """Wrap fn so its first `failures` calls raise exc; `.calls` counts every call."""

    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls <= failures:
            raise exc
        return fn(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def _raw_names(storage: Storage) -> list[str]:
    """Every file name under the root, temp files included (bypasses Storage.list's filter)."""
    return [p.rsplit("/", 1)[-1] for p in storage.fs.find(storage.root)]


def _pending_uploads(storage: Storage) -> list:
    bucket, _, prefix = storage.root.partition("/")
    return storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])


def test_put_bytes_round_trip_and_overwrite(output_target):
    uri, options = output_target
    storage = Storage(uri, options)
    storage.put_bytes("a/b/c.bin", b"first")
    assert storage.get_bytes("a/b/c.bin") == b"first"
    storage.put_bytes("a/b/c.bin", b"second, longer")
    assert storage.get_bytes("a/b/c.bin") == b"second, longer"
    assert storage.url("a/b/c.bin") == uri.rstrip("/") + "/a/b/c.bin"
    assert storage.key_of(storage.url("a/b/c.bin")) == "a/b/c.bin"
    assert not any(name.startswith(TEMP_PREFIX) for name in _raw_names(storage))
    if storage.local:
        assert storage.url("x").startswith("file:///")
    else:
        assert _pending_uploads(storage) == []


def test_put_bytes_if_absent_creates_only_once(output_target):
    storage = Storage(*output_target)
    assert storage.put_bytes_if_absent("lock/one", b"winner") is True
    assert storage.put_bytes_if_absent("lock/one", b"loser") is False
    assert storage.get_bytes("lock/one") == b"winner"
    assert not any(name.startswith(TEMP_PREFIX) for name in _raw_names(storage))


def test_list_size_exists_delete(output_target):
    storage = Storage(*output_target)
    assert storage.list("") == []
    assert storage.list("videos") == []
    for key, data in {"videos/a.mp4": b"aaa", "videos/sub/b.mp4": b"bb", "manifest/p.parquet": b"p"}.items():
        storage.put_bytes(key, data)
    assert storage.list("") == ["manifest/p.parquet", "videos/a.mp4", "videos/sub/b.mp4"]
    assert storage.list("videos/") == ["videos/a.mp4", "videos/sub/b.mp4"]
    assert storage.list("vid") == []  # a prefix is a directory, not a string prefix
    assert storage.size("videos/a.mp4") == 3
    assert storage.size("videos/missing.mp4") is None
    assert storage.size("videos") is None  # a directory is not an object
    assert storage.exists("videos/sub/b.mp4")
    storage.delete("videos/a.mp4")
    storage.delete("videos/a.mp4")  # idempotent
    assert not storage.exists("videos/a.mp4")
    assert storage.list("videos") == ["videos/sub/b.mp4"]
    with pytest.raises(FileNotFoundError):
        storage.get_bytes("videos/a.mp4")


def test_reads_see_writes_from_another_instance(output_target):
    reader, writer = Storage(*output_target), Storage(*output_target)
    assert reader.list("videos") == [] and reader.size("videos/x.npy") is None
    writer.put_bytes("videos/x.npy", b"xyz")
    assert reader.list("videos") == ["videos/x.npy"]
    assert reader.size("videos/x.npy") == 3


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a/../b", ""])
def test_keys_cannot_escape_the_prefix(output_target, key):
    storage = Storage(*output_target)
    with pytest.raises(ValueError, match="storage key"):
        storage.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.key_of("s3://elsewhere/videos/a.mp4")


def test_failed_write_leaves_old_object_and_no_partial(output_target, monkeypatch):
    storage = Storage(*output_target)
    storage.put_bytes("videos/v.mp4", b"old")
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    if storage.local:
        monkeypatch.setattr(os, "fsync", _flaky(os.fsync, 99, disk_full))
    else:
        monkeypatch.setattr(storage.fs, "pipe_file", _flaky(storage.fs.pipe_file, 99, disk_full))
    with pytest.raises(OSError, match="No space"):
        storage.put_bytes("videos/v.mp4", b"new")
    with pytest.raises(OSError, match="No space"):
        storage.put_bytes("videos/w.mp4", b"new")
    monkeypatch.undo()
    assert storage.get_bytes("videos/v.mp4") == b"old"
    assert not storage.exists("videos/w.mp4")
    assert storage.list("") == ["videos/v.mp4"]
    assert not any(name.startswith(TEMP_PREFIX) for name in _raw_names(storage))


def test_retry_succeeds_after_transient_errors(output_target, monkeypatch):
    storage = Storage(*output_target, backoff=0.001)
    if storage.local:
        flaky_put = _flaky(os.replace, 2, OSError(errno.EIO, "I/O error"))
        monkeypatch.setattr(os, "replace", flaky_put)
    else:
        flaky_put = _flaky(storage.fs.pipe_file, 2, EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
        monkeypatch.setattr(storage.fs, "pipe_file", flaky_put)
    storage.put_bytes("videos/r.mp4", b"payload")
    assert flaky_put.calls == 3
    flaky_get = _flaky(storage.fs.cat_file, 2, ConnectionResetError("reset by peer"))
    monkeypatch.setattr(storage.fs, "cat_file", flaky_get)
    assert storage.get_bytes("videos/r.mp4") == b"payload"
    assert flaky_get.calls == 3
    assert not any(name.startswith(TEMP_PREFIX) for name in _raw_names(storage))


def test_storage_unavailable_after_retry_budget(output_target, monkeypatch):
    uri, options = output_target
    storage = Storage(uri, options, retries=2, backoff=0.001)
    storage.put_bytes("videos/u.mp4", b"u")
    always = _flaky(storage.fs.cat_file, 10**6, ConnectionRefusedError("refused"))
    monkeypatch.setattr(storage.fs, "cat_file", always)
    with pytest.raises(StorageUnavailable) as info:
        storage.get_bytes("videos/u.mp4")
    assert always.calls == 3
    assert info.value.key == "videos/u.mp4"
    assert isinstance(info.value.last_error, ConnectionRefusedError)
    for text in (str(info.value), repr(storage)):
        assert "testing" not in text and "secret" not in text


def test_permanent_errors_are_not_retried(output_target, monkeypatch):
    storage = Storage(*output_target, backoff=0.001)
    denied = _flaky(storage.fs.cat_file, 10**6, PermissionError("access denied"))
    monkeypatch.setattr(storage.fs, "cat_file", denied)
    with pytest.raises(PermissionError):
        storage.get_bytes("videos/p.mp4")
    assert denied.calls == 1


def test_cleanup_temp_removes_leftovers(output_target):
    storage = Storage(*output_target)
    storage.put_bytes("videos/keep.mp4", b"k")
    if storage.local:
        leftover = os.path.join(storage.root, "videos", f"{TEMP_PREFIX}dead-writer")
        with open(leftover, "wb") as f:
            f.write(b"partial")
        assert storage.list("videos") == ["videos/keep.mp4"]  # temp files are never listed as objects
    else:
        bucket, _, prefix = storage.root.partition("/")
        storage.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/videos/dead.mp4")
        assert len(_pending_uploads(storage)) == 1
    if storage.local:  # moto reports every upload as initiated in 2010, so age is only testable locally
        assert storage.cleanup_temp("videos", older_than_s=3600) == 0  # too young: maybe a live writer
    assert storage.cleanup_temp("videos") == 1
    assert storage.cleanup_temp("videos") == 0
    assert not any(name.startswith(TEMP_PREFIX) for name in _raw_names(storage))
    if not storage.local:
        assert _pending_uploads(storage) == []
    assert storage.get_bytes("videos/keep.mp4") == b"k"


def test_storage_pickles_without_sharing_its_client(output_target):
    storage = Storage(*output_target)
    storage.put_bytes("videos/p.npy", b"p")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.fs is not storage.fs
    assert clone.get_bytes("videos/p.npy") == b"p"


NASTY_IDS = [
    "../etc/passwd",
    "a/b",
    "a\\b",
    "a_b",
    ".hidden",
    "..",
    "...",
    "",
    " ",
    "x" * 300,
    "x" * 300 + "y",
    "видео-1",
    "視頻",
    "emoji-🎥",
    "abc\n",
    "a..b",
    "-leading-dash",
    "%2e%2e%2fetc",
]
SAFE_KEY = re.compile(r"videos/[A-Za-z0-9_-][A-Za-z0-9._-]*\.mp4")


def test_object_key_is_safe_deterministic_and_collision_free():
    keys = [object_key(i, "mp4") for i in NASTY_IDS]
    for row_id, key in zip(NASTY_IDS, keys):
        assert SAFE_KEY.fullmatch(key), (row_id, key)
        assert ".." not in key.removeprefix("videos/").removesuffix(".mp4").split("/")
        assert key.count("/") == 1 and len(key) <= len("videos/") + 128 + len(".mp4")
        assert object_key(row_id, "mp4") == key
    assert len(set(keys)) == len(NASTY_IDS)
    assert object_key("clip-0001.v2", "mp4") == "videos/clip-0001.v2.mp4"
    assert object_key("A" * 128, "npy") == f"videos/{'A' * 128}.npy"
    with pytest.raises(ValueError, match="format"):
        object_key("ok", "../mp4")


def test_object_keys_for_nasty_ids_land_under_videos(output_target):
    storage = Storage(*output_target)
    keys = {object_key(i, "mp4") for i in NASTY_IDS}
    for key in keys:
        storage.put_bytes(key, key.encode())
    assert storage.list("") == sorted(keys)
    assert all(storage.get_bytes(key) == key.encode() for key in keys)
