"""Object stores at scale: throttling (503 SlowDown) and transient errors are retried at one layer (`Storage`),
counted, and never leave a partial object; listings go a page at a time.

Oracles: the loopback proxy's own request counts (`tests/s3_proxy.py`: what reached S3, what it answered 503)
equal what `Storage` counts, so no second retry layer hides a throttle; S3's own multipart-upload listing is empty
after a failed large write; a job through a throttling proxy has one ok manifest row per input row and one
successful PUT per video key."""

from __future__ import annotations

import errno
import itertools
import re
import threading

import boto3
import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from kandinsky_batch.config.load import load_config
from kandinsky_batch.errors import StorageUnavailable
from kandinsky_batch.job import run
from kandinsky_batch.output import listing
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.storage import Storage, one_retry_layer
from kandinsky_batch.output.verify import verify
from tests.conftest import S3_BUCKET
from tests.helpers import write_dataset
from tests.s3_proxy import SlowDownProxy, kind


MIB = 2**20


class Throttle:
    """Answer 503 to the listed (kind, n-th request of that kind) pairs; `every[kind] = k`: every k-th of that
    kind whose key matches `keys`."""

    def __init__(self, nth: set[tuple[str, int]] = frozenset(), every: dict[str, int] | None = None,
                 keys: str = ".*") -> None:
        self.nth, self.every, self.keys = set(nth), dict(every or {}), re.compile(keys)
        self.seen: dict[str, itertools.count] = {}
        self._lock = threading.Lock()

    def __call__(self, what: str, key: str) -> bool:
        if not self.keys.search(key):
            return False
        with self._lock:
            n = next(self.seen.setdefault(what, itertools.count(1)))
        return (what, n) in self.nth or (what in self.every and n % self.every[what] == 0)


@pytest.fixture
def proxied(s3_storage_options, moto_endpoint):
    """(proxy, storage options through it) in front of a freshly reset moto; the proxy's throttle is set per test."""
    with SlowDownProxy(moto_endpoint) as proxy:
        yield proxy, {**s3_storage_options, "client_kwargs": {"endpoint_url": proxy.endpoint}}


def _pending_uploads(moto_endpoint: str) -> list:
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    return client.list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", [])


def test_only_s3_loses_its_lower_retry_layers_and_an_explicit_setting_stands():
    assert one_retry_layer("file", {"a": 1}) == {"a": 1}
    assert one_retry_layer("s3", {"key": "k"}) == {"key": "k", "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    given = {"config_kwargs": {"retries": {"mode": "adaptive"}, "connect_timeout": 1}}
    assert one_retry_layer("s3a", given) == given


def test_request_kinds_are_told_apart():
    assert kind("GET", "/b?list-type=2&prefix=x%2F") == kind("GET", "/b?uploads") == kind("GET", "/b") == "LIST"
    assert kind("GET", "/b/videos/a.mp4") == "GET" and kind("PUT", "/b/videos/a.mp4?partNumber=1") == "PUT"


def test_throttles_are_retried_once_each_at_the_storage_layer_and_counted(proxied, monkeypatch):
    proxy, options = proxied
    monkeypatch.setattr(listing, "PAGE_KEYS", 2)  # 5 objects: 3 pages
    proxy.throttle = Throttle({("PUT", 1), ("GET", 1), ("LIST", 2)})
    storage = Storage(f"s3://{S3_BUCKET}/out", options, backoff=0.001)
    assert storage.put_bytes_if_absent("videos/a.mp4", b"a")
    assert storage.get_bytes("videos/a.mp4") == b"a"
    for name in "bcde":
        storage.put_bytes(f"videos/{name}.mp4", name.encode())
    assert storage.list("videos") == [f"videos/{n}.mp4" for n in "abcde"]
    # What S3 saw plus what the proxy refused is what Storage tried: no retry below it (botocore, s3fs) hid one.
    assert dict(proxy.throttled) == {"PUT": 1, "GET": 1, "LIST": 1}
    assert dict(proxy.counts) == {"PUT": 5, "GET": 1, "LIST": 3}
    assert dict(storage.requests) == {"put": 6, "get": 2, "list": 4}
    assert storage.retried == 3 and storage.take_retries() == 3 and storage.take_retries() == 0
    assert proxy.puts == {f"out/videos/{n}.mp4": 1 for n in "abcde"}


def test_a_throttle_outlasting_the_budget_names_the_key_and_leaves_no_object(proxied, moto_endpoint):
    proxy, options = proxied
    proxy.throttle = Throttle(every={"PUT": 1})
    storage = Storage(f"s3://{S3_BUCKET}/out", options, retries=2, backoff=0.001)
    with pytest.raises(StorageUnavailable) as info:
        storage.put_bytes_if_absent("videos/u.mp4", b"u" * 1000)
    assert info.value.key == "videos/u.mp4" and isinstance(info.value.last_error, OSError)
    assert info.value.last_error.errno == errno.EBUSY  # s3fs' mapping of SlowDown (s3fs.errors)
    assert proxy.throttled["PUT"] == 3 and proxy.counts["PUT"] == 0 and storage.retried == 2
    proxy.throttle = Throttle()
    assert not storage.exists("videos/u.mp4") and _pending_uploads(moto_endpoint) == []


class FlakyS3:
    """An fsspec wrapper over a real s3fs filesystem: writes take s3fs' multipart path from 5 MiB on (S3's smallest
    part) instead of 100 MiB, and the `fail`-th call of `method` raises the OSError s3fs raises for a 503 SlowDown,
    before the request (`after=False`) or after S3 took it (a lost response)."""

    def __init__(self, fs, method: str, fail: int, after: bool = False) -> None:
        self.inner, self.method, self.fail, self.after = fs, method, fail, after
        self.calls = 0
        real = fs._call_s3

        async def call_s3(name, *args, **kwargs):
            if name != self.method:
                return await real(name, *args, **kwargs)
            self.calls += 1
            out = await real(name, *args, **kwargs) if self.after else None
            if self.calls == self.fail:
                raise translate_boto_error(ClientError(
                    {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}}, name))
            return out if self.after else await real(name, *args, **kwargs)

        fs._call_s3 = call_s3

    def pipe_file(self, path, data, **kwargs):
        return self.inner.pipe_file(path, data, chunksize=5 * MIB, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("retries", [0, 1])
def test_a_multipart_write_failing_mid_upload_leaves_the_old_object_and_no_upload(s3_storage_options, moto_endpoint,
                                                                                    retries):
    storage = Storage(f"s3://{S3_BUCKET}/out", s3_storage_options, retries=retries, backoff=0.001)
    storage.put_bytes("videos/big.bin", b"old")
    storage.fs = FlakyS3(storage.fs, "upload_part", fail=2)
    new = bytes(range(256)) * (11 * MIB // 256)  # 3 parts: the second fails
    if retries:
        storage.put_bytes("videos/big.bin", new)
        assert storage.get_bytes("videos/big.bin") == new and storage.retried == 1
    else:
        with pytest.raises(StorageUnavailable):
            storage.put_bytes("videos/big.bin", new)
        assert storage.get_bytes("videos/big.bin") == b"old"
    assert _pending_uploads(moto_endpoint) == []  # s3fs aborted the failed upload: nothing half-written stays


def test_a_create_whose_response_was_lost_finds_its_own_object(s3_storage_options):
    """The PUT landed, its answer did not: the retry meets If-None-Match (412), so the key holds exactly its bytes."""
    storage = Storage(f"s3://{S3_BUCKET}/out", s3_storage_options, backoff=0.001)
    storage.fs = FlakyS3(storage.fs, "put_object", fail=1, after=True)
    assert storage.put_bytes_if_absent("manifest/part-r-000000.parquet", b"rows") is False
    assert storage.fs.calls == 2 and storage.retried == 1
    assert storage.get_bytes("manifest/part-r-000000.parquet") == b"rows"


def test_local_listing_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "PAGE_KEYS", 2)
    storage = Storage(f"file://{tmp_path}")
    for i in range(5):
        storage.put_bytes(f"videos/{i}.npy", b"x")
    storage.put_bytes("videos/sub/5.npy", b"x")
    pages = list(storage.pages("videos"))
    assert [len(p) for p in pages] == [2, 2, 2] and storage.requests["list"] == 3
    assert sorted(k for p in pages for k in p) == [*(f"videos/{i}.npy" for i in range(5)), "videos/sub/5.npy"]
    assert storage.holds("videos") and not storage.holds("posters") and storage.root_type() == "directory"


def _job(tmp_path, uri, options, rows=8):
    data = write_dataset(tmp_path / "in.parquet", [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(rows)])
    cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", "output.format=npy",
                             "output.retry_backoff=0.001", "model.path=simulated:0.01", "cluster.address=inprocess",
                             "cluster.replicas=2", "render.height=32", "render.width=32", "render.num_frames=5"])
    cfg.output.storage_options = options
    return cfg


def test_a_job_through_a_throttling_proxy_settles_every_row_once(tmp_path, proxied, inprocess):
    proxy, options = proxied
    # Every 3rd object or manifest PUT and every 2nd manifest GET refused: the replicas' writes and the driver's.
    proxy.throttle = Throttle(every={"PUT": 3, "GET": 2}, keys=r"/(videos|posters|manifest)/")
    uri = f"s3://{S3_BUCKET}/job"
    result = run(_job(tmp_path, uri, options), progress=False)
    storage = Storage(uri, options)
    assert (result.rows, result.ok, result.rendered) == (8, 8, 8)
    throttled = sum(proxy.throttled.values())
    assert throttled >= 8 // 3 * 2 and result.storage_retries == throttled
    assert read_success(storage)["counts"]["storage_retries"] == throttled
    manifest = read_manifest(storage).to_pylist()
    assert sorted(r["id"] for r in manifest) == [f"r{i}" for i in range(8)]
    assert {r["status"] for r in manifest} == {"ok"}
    assert {k: v for k, v in proxy.puts.items() if "/videos/" in k} == {f"job/videos/r{i}.npy": 1 for i in range(8)}
    proxy.throttle, before = Throttle({("GET", 1)}), proxy.throttled["GET"]
    assert verify(uri, options) == [] and proxy.throttled["GET"] == before + 1  # through the same retry layer
    proxy.throttle = Throttle(every={"PUT": 3, "GET": 2}, keys=r"/(videos|posters|manifest)/")
    again = run(_job(tmp_path, uri, options), progress=False)
    assert (again.ok, again.rendered, again.skipped) == (8, 0, 8)
    assert {k: v for k, v in proxy.puts.items() if "/videos/" in k} == {f"job/videos/r{i}.npy": 1 for i in range(8)}
