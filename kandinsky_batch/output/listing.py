"""Keys under a prefix a page at a time (S3 ListObjectsV2 pages, a lazy local walk): a listing is never held whole."""

from __future__ import annotations

import os
from collections.abc import Iterator

PAGE_KEYS = 1000
"""Keys per page: S3's largest ListObjectsV2 page, and the size of the local walk's pages."""


def walk_local(path: str) -> Iterator[str]:
    """Every file under a local directory, recursively and lazily (nothing if it does not exist)."""
    try:
        entries = os.scandir(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from walk_local(entry.path)
            else:
                yield entry.path


def local_pages(path: str, size: int | None = None) -> Iterator[list[str]]:
    """`walk_local` in lists of at most `size` paths (`PAGE_KEYS`)."""
    size = size or PAGE_KEYS
    page: list[str] = []
    for found in walk_local(path):
        page.append(found)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def s3_page(fs, path: str, token: str | None, size: int | None = None) -> tuple[list[str], str | None]:
    """One ListObjectsV2 page (of `size`, `PAGE_KEYS`) of the objects under `bucket/prefix` (s3fs `fs`): their
    paths, and the next page's token (None after the last). s3fs' own `find` gathers every page before returning."""
    bucket, _, prefix = path.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "MaxKeys": size or PAGE_KEYS}
    if token is not None:
        request["ContinuationToken"] = token
    page = fs.call_s3("list_objects_v2", **request)
    paths = [f"{bucket}/{entry['Key']}" for entry in page.get("Contents", []) if not entry["Key"].endswith("/")]
    return paths, page.get("NextContinuationToken") if page.get("IsTruncated") else None
