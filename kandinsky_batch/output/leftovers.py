"""What interrupted writes leave behind under a prefix, and its removal: local temp files, S3 multipart uploads."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

TEMP_PREFIX = ".tmp-"
"""Names of local temp files a write renames or links into place; listings skip them."""


def is_temp(key: str) -> bool:
    """Whether a key names an in-flight (or abandoned) temp file."""
    return key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)


def remove_local_temp(path: str, older_than_s: float) -> int:
    """Remove temp files under a local directory last written over `older_than_s` ago; returns the count."""
    removed = 0
    cutoff = time.time() - older_than_s
    for directory, _, files in os.walk(path):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            full = os.path.join(directory, name)
            try:
                if os.path.getmtime(full) > cutoff:
                    continue  # maybe a live writer's; it renames or removes it itself
                os.unlink(full)
            except FileNotFoundError:
                continue  # its writer finished or cleaned up meanwhile
            removed += 1
    return removed


def abort_s3_uploads(fs, path: str, older_than_s: float) -> int:
    """Abort the multipart uploads under `bucket/prefix` started over `older_than_s` ago (s3fs `fs`); the count."""
    bucket, _, key_prefix = path.partition("/")
    key_prefix = f"{key_prefix}/" if key_prefix else ""
    now = datetime.now(timezone.utc)
    aborted = 0
    markers: dict = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix, **markers)
        for upload in page.get("Uploads", []):
            if (now - upload["Initiated"]).total_seconds() < older_than_s:
                continue
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted += 1
        if not page.get("IsTruncated"):
            return aborted
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
