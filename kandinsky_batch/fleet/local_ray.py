"""Starting a local Ray: a single-machine instance bound to 127.0.0.1, started again once if a busy host made its
start time out.

Ray's start has two fixed clocks (ray-project/ray#65983): the raylet waits 15 s for its dashboard agent's port
files, and `ray.init` waits 30 s for the raylet to register (`raylet_start_wait_time_s` in ray/_private/node.py).
Neither is configurable. On a 2-core host that is busy elsewhere, the agent's imports alone can take longer, and
`ray.init` then raises "The current node timed out during startup".
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

START_ATTEMPTS = 2
"""How many times a local Ray is started before its start-up timeout is the job's error."""
TIMED_OUT = "timed out during startup"
"""Ray's words (ray/_private/node.py) for a start whose raylet never registered."""


def loopback_only() -> None:
    """Make the local Ray we are about to start a single-machine instance bound to 127.0.0.1 only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when `ray` is first imported, and on Linux an unset
    value means "bind the host's network address". So set the variable (for every Ray process we spawn)
    and the constant already read from it (for this one), whatever the caller's environment says.
    Only for a local Ray: a driver joining a real cluster must keep advertising its network address.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local(**kwargs):
    """`ray.init(address="local", **kwargs)` on loopback; once more if Ray's own start-up clock ran out.

    Before the second start, what the first one left running is killed: the processes this one started during it
    (its GCS, agents, log monitor and reaper). Any other error is raised at once. Returns `ray.init`'s context."""
    import psutil
    import ray

    loopback_only()
    for attempt in range(1, START_ATTEMPTS + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            return ray.init(address="local", **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if attempt == START_ATTEMPTS or TIMED_OUT not in str(exc):
                raise
            logger.warning("the local Ray's start timed out (the host is busy): starting it again")
            _kill_started_since(before)


def _kill_started_since(before: set[int]) -> None:
    import psutil

    left = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    for child in left:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
