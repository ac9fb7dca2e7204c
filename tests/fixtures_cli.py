"""A fixture for S3-heavy test modules: one botocore data loader for all their sessions.

Each `Storage` on S3 is a fresh s3fs filesystem, so a fresh botocore session, whose own loader parses the endpoint
and S3 service JSON again: about 0.2 CPU-s a `Storage`, most of what a moto-backed test spends. The parsed data is
botocore's static description of the service, the same for every session; credentials, endpoints and clients stay
per session. A candidate for conftest as a session-wide autouse fixture.
"""

from __future__ import annotations

import functools
from typing import Iterator

import pytest


@pytest.fixture(scope="module")
def one_botocore_loader() -> Iterator[None]:
    """botocore sessions created during the module share one loader per data path (and so its parsed JSON)."""
    import botocore.loaders
    import botocore.session

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader", functools.cache(botocore.loaders.create_loader))
        yield
