"""The storage retry policy: which errors another attempt can fix, and the jittered backoff between attempts.

It is the one retry layer of the output store: `Storage` turns off s3fs' and botocore's own retries
(`storage.one_retry_layer`), so every throttle (S3 503 SlowDown) and dropped connection is seen, backed off
and counted here, under one bounded budget.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from typing import TypeVar

from kandinsky_batch.errors import StorageUnavailable

try:
    from botocore import exceptions as _boto
    from botocore.parsers import ResponseParserError
except ImportError:  # botocore only comes with s3fs; other backends raise plain OSErrors
    _boto = None

T = TypeVar("T")

# Caller or backend problems that another attempt cannot fix.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EINVAL, errno.EPERM, errno.ENOSYS
}
# ResponseParserError: a throttled S3 may answer with invalid XML (why s3fs retries it: s3fs.core.S3_RETRYABLE_ERRORS).
_TRANSIENT_BOTO = (
    (_boto.ConnectionError, _boto.HTTPClientError, _boto.ReadTimeoutError, _boto.ConnectTimeoutError,
     ResponseParserError)
    if _boto is not None
    else ()
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: dropped connections, timeouts, 5xx-style OSErrors."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, _TRANSIENT_BOTO):
        return True
    # ConnectionError and TimeoutError are OSErrors; s3fs maps server errors (500, 503 SlowDown, unknown codes)
    # to OSErrors with EREMOTEIO, EBUSY or EIO, and only caller mistakes to the errnos listed as permanent.
    return isinstance(exc, OSError) and exc.errno not in _PERMANENT_ERRNOS


def with_retries(key: str, op: Callable[[], T], retries: int, backoff: float, max_backoff: float,
                 on_retry: Callable[[BaseException], None] = lambda exc: None) -> T:
    """`op()`, tried up to `retries` more times on transient errors; `StorageUnavailable` naming `key` after that.

    `on_retry(error)` is called before each further attempt (what `Storage` counts as `storage_retries`)."""
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return op()
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
        if attempt < retries:
            on_retry(last)
            # Full jitter keeps many workers from hammering a recovering endpoint in lockstep.
            time.sleep(random.uniform(0, min(max_backoff, backoff * 2**attempt)))
    assert last is not None
    raise StorageUnavailable(key, last) from last
