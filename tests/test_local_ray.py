"""A local Ray whose start ran out Ray's own start-up clock (a busy host) is started again once, after what the
failed start left running is killed; every other error is the caller's at once. `ray.init` is a fake here: the real
starts are every Ray test's (`tests/conftest.py::ray_local` goes through `start_local`)."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
import ray

from kandinsky_batch.fleet import local_ray

# What ray/_private/node.py raises when the raylet never registered (ray-project/ray#65983).
TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet failed to "
             "startup or the GCS has become overloaded.")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_a_start_that_timed_out_is_started_again_once_its_leftovers_are_killed(monkeypatch):
    calls, leftovers = [], []
    earlier = _sleeper()  # a child of this process from before the start: not the failed start's

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            leftovers.append(_sleeper())  # as the GCS and agents of a start that timed out are left running
            raise Exception(TIMED_OUT)
        return "context"

    monkeypatch.setattr(ray, "init", init)
    try:
        assert local_ray.start_local(num_cpus=1, include_dashboard=False) == "context"
        assert calls == [{"address": "local", "num_cpus": 1, "include_dashboard": False}] * 2
        assert not psutil.pid_exists(leftovers[0].pid)  # killed (and reaped) before the second start
        assert earlier.poll() is None
    finally:
        for proc in (earlier, *leftovers):
            proc.kill()
            proc.wait()


def test_a_second_timeout_and_any_other_error_reach_the_caller(monkeypatch):
    calls = []

    def timing_out(**kwargs):
        calls.append(kwargs)
        raise Exception(TIMED_OUT)

    monkeypatch.setattr(ray, "init", timing_out)
    with pytest.raises(Exception, match="timed out during startup"):
        local_ray.start_local()
    assert len(calls) == local_ray.START_ATTEMPTS == 2

    calls.clear()

    def refusing(**kwargs):
        calls.append(kwargs)
        raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not be provided.")

    monkeypatch.setattr(ray, "init", refusing)
    with pytest.raises(ValueError, match="existing cluster"):
        local_ray.start_local(num_cpus=1)
    assert len(calls) == 1
