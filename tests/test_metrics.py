"""Job metrics: what `JobMetrics` records (fake backend), and a real local Ray that exports it to Prometheus."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from kandinsky_batch.fleet.metrics import BUSY, LOST, QUEUED, RATE, ROWS, JobMetrics
from tests.processes import marked as _marked

ROOT = Path(__file__).resolve().parents[1]


class FakeMetric:
    """Keeps the last value per tag set, and checks tags the way Ray does (every tag key, nothing else)."""

    def __init__(self, name: str, description: str = "", tag_keys: tuple = ()):
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.values: dict[tuple, float] = {}
        self.calls = 0

    def _key(self, tags: dict) -> tuple:
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        assert all(isinstance(v, str) for v in tags.values()), tags
        self.calls += 1
        return tuple(sorted(tags.items()))

    def inc(self, value, tags):
        assert value > 0
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0) + value

    def set(self, value, tags):
        self.values[self._key(tags)] = value

    def get(self, **tags):
        return self.values.get(tuple(sorted(tags.items())))


class FakeBackend:
    """Shaped like ray.util.metrics: `Counter(name, description, tag_keys)` and `Gauge(...)`."""

    def __init__(self):
        self.made: dict[str, FakeMetric] = {}

    def _make(self, name, description="", tag_keys=None):
        assert name not in self.made, f"{name} made twice"
        self.made[name] = FakeMetric(name, description, tag_keys or ())
        return self.made[name]

    Counter = Gauge = _make


class Broken:
    """A backend whose every record raises: the job must not notice."""

    def Counter(self, *args, **kwargs):
        return self

    Gauge = Counter

    def inc(self, value, tags):
        raise RuntimeError("export broke")

    set = inc


def test_rows_queued_and_busy_are_recorded_with_their_tags():
    backend = FakeBackend()
    metrics = JobMetrics("run-1", backend=backend)
    metrics.settled("ok")
    metrics.settled("ok", 2)
    metrics.settled("failed")
    metrics.settled("invalid", 4)
    metrics.queued(7)
    metrics.busy("default/0", 0.5)
    metrics.busy("default/1", 1.0)
    metrics.queued(5)

    rows, queued, busy = backend.made[ROWS], backend.made[QUEUED], backend.made[BUSY]
    assert rows.tag_keys == ("run_id", "status")
    assert [rows.get(run_id="run-1", status=s) for s in ("ok", "failed", "invalid")] == [3, 1, 4]
    assert queued.get(run_id="run-1") == 5
    assert busy.get(run_id="run-1", replica="default/0") == 0.5
    assert busy.get(run_id="run-1", replica="default/1") == 1.0
    assert metrics.counts == {"ok": 3, "failed": 1, "invalid": 4}
    assert all(m.description for m in backend.made.values())


def test_tick_sets_videos_per_hour_and_sets_every_gauge_again():
    backend = FakeBackend()
    metrics = JobMetrics("run-2", backend=backend)
    metrics.settled("ok", 10)
    metrics.settled("failed", 5)  # not videos
    metrics.queued(3)
    metrics.busy("a/0", 0.25)
    before = {name: m.calls for name, m in backend.made.items()}

    metrics.tick(now=metrics.started + 1800)  # half an hour
    rate = backend.made[RATE]
    assert rate.get(run_id="run-2") == pytest.approx(20.0)
    assert metrics.videos_per_hour == pytest.approx(20.0)
    # Ray drops a gauge not set again within two export intervals: every tick refreshes them all.
    assert backend.made[QUEUED].calls == before[QUEUED] + 1
    assert backend.made[BUSY].calls == before[BUSY] + 1
    assert backend.made[ROWS].calls == before[ROWS]  # counters are cumulative: nothing to re-send

    metrics.tick(now=metrics.started)  # no time elapsed: no division by zero
    assert rate.get(run_id="run-2") == 0.0


def test_replicas_lost_to_drains_are_counted_apart_from_failures():
    backend = FakeBackend()
    metrics = JobMetrics("run-6", backend=backend)
    metrics.replicas_lost(restarts=1, drains=0)
    metrics.replicas_lost(restarts=1, drains=2)  # the queue's running totals: only what is new is added
    metrics.replicas_lost(restarts=3, drains=2)
    lost = backend.made[LOST]
    assert lost.tag_keys == ("run_id", "cause")
    assert (lost.get(run_id="run-6", cause="failure"), lost.get(run_id="run-6", cause="drain")) == (3, 2)
    calls = lost.calls
    metrics.tick()
    assert lost.calls == calls  # a counter: nothing to re-send


def test_default_backend_waits_for_ray_then_counts_the_rows_settled_meanwhile(monkeypatch):
    import ray
    import ray.util.metrics

    fake = FakeBackend()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray.util.metrics, "Counter", fake.Counter)
    monkeypatch.setattr(ray.util.metrics, "Gauge", fake.Gauge)
    metrics = JobMetrics("run-3")
    metrics.settled("ok", 2)
    metrics.queued(9)
    metrics.tick()
    assert fake.made == {}  # nothing made before Ray is up

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    metrics.settled("ok")
    assert fake.made[ROWS].get(run_id="run-3", status="ok") == 3
    metrics.tick()
    assert fake.made[QUEUED].get(run_id="run-3") == 9


def test_export_failures_never_reach_the_job(caplog):
    caplog.set_level(logging.WARNING, logger="kandinsky_batch.fleet.metrics")
    metrics = JobMetrics("run-4", backend=Broken())
    for _ in range(3):
        metrics.settled("ok")
        metrics.queued(1)
        metrics.busy("r", 0.1)
        metrics.tick()
    assert metrics.counts["ok"] == 3
    assert len(caplog.records) == 1  # logged once, not per row

    class Unmakeable:
        def Counter(self, *args, **kwargs):
            raise RuntimeError("no metrics here")

    metrics = JobMetrics("run-5", backend=Unmakeable())
    metrics.settled("ok")
    metrics.tick()
    assert metrics.counts["ok"] == 1


def test_recording_is_cheap():
    metrics = JobMetrics("run-6", backend=FakeBackend())
    start = time.perf_counter()
    for i in range(10_000):
        metrics.settled("ok")
        metrics.busy("default/0", 0.5)
    assert (time.perf_counter() - start) / 20_000 < 100e-6  # ~2 us here; Ray itself adds ~2 us


# A driver started the way kandinsky_batch.fleet.cluster.connect() starts a local Ray. It records from itself and
# from an actor, prints the Prometheus port, keeps ticking (gauges must be set again every export interval)
# until its stdin closes, then shuts Ray down.
DRIVER = r"""
import json, logging, select, sys
from kandinsky_batch.fleet.local_ray import start_local  # binds loopback only, as the product's local Ray
import ray
from kandinsky_batch.fleet.metrics import JobMetrics

context = start_local(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")

@ray.remote(num_cpus=0)
class Replica:
    def __init__(self):
        self.metrics = JobMetrics("run-actor")

    def record(self):
        self.metrics.settled("ok", 2)
        self.metrics.busy("default/1", 0.75)
        self.metrics.tick()

    def tick(self):
        self.metrics.tick()

metrics = JobMetrics("run-driver")
metrics.settled("ok", 3)
metrics.settled("failed")
metrics.settled("invalid", 2)
metrics.queued(5)
metrics.busy("default/0", 0.25)
replica = Replica.remote()
ray.get(replica.record.remote())
print(json.dumps({"port": context.address_info["metrics_export_port"]}), flush=True)
while not select.select([sys.stdin], [], [], 0.5)[0]:
    metrics.tick()
    replica.tick.remote()
ray.shutdown()
"""


def _scrape(port: int) -> dict[tuple, float]:
    """{(name, frozenset of our labels): value} for the kandinsky_batch series on the endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_kandinsky_batch_"):
                labels = frozenset((k, v) for k, v in sample.labels.items() if k in ("run_id", "status", "replica"))
                found[(sample.name, labels)] = sample.value
    return found


def _series(name: str, **labels) -> tuple:
    return name, frozenset(labels.items())


def _family(root_pid: int, marker: str) -> dict[int, psutil.Process]:
    """The driver and its descendants, plus any process naming our Ray temp dir (in case one was reparented).

    Ray's agents retitle themselves (`ray::DashboardAgent`), so the marker alone misses some."""
    found = {}
    try:
        root = psutil.Process(root_pid)
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for proc in _marked(marker):
        found.setdefault(proc.pid, proc)
    return found


def _alive(procs) -> list[str]:
    names = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # is_running() checks pid reuse
                names.append(f"{proc.name()}[{proc.pid}]")
        except psutil.Error:
            pass
    return names


def _connections(proc: psutil.Process) -> list:
    try:
        return proc.net_connections(kind="tcp")
    except psutil.Error:
        return []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_local_ray_exports_job_metrics_from_driver_and_actor_to_prometheus(tmp_path):
    # Its own Ray in a subprocess: this process may already hold the session's Ray (tests.conftest.ray_local).
    ray_tmp = tempfile.mkdtemp(prefix="kbmet-", dir="/tmp")  # short (Ray's unix sockets live under it); a marker
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_metrics_report_interval_ms": "1000",  # Ray's floor: 1 s
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    want = {
        _series("ray_kandinsky_batch_rows_total", run_id="run-driver", status="ok"): 3,
        _series("ray_kandinsky_batch_rows_total", run_id="run-driver", status="failed"): 1,
        _series("ray_kandinsky_batch_rows_total", run_id="run-driver", status="invalid"): 2,
        _series("ray_kandinsky_batch_rows_queued", run_id="run-driver"): 5,
        _series("ray_kandinsky_batch_replica_busy_fraction", run_id="run-driver", replica="default/0"): 0.25,
        _series("ray_kandinsky_batch_rows_total", run_id="run-actor", status="ok"): 2,
        _series("ray_kandinsky_batch_replica_busy_fraction", run_id="run-actor", replica="default/1"): 0.75,
    }
    stderr = tmp_path / "driver-stderr.txt"
    with open(stderr, "wb") as sink:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=sink, text=True)
    family: dict[int, psutil.Process] = {}
    try:
        line = driver.stdout.readline()
        while line and not line.startswith("{"):
            line = driver.stdout.readline()
        assert line, f"driver exited {driver.wait(timeout=60)}:\n{stderr.read_text()[-4000:]}"
        port = json.loads(line)["port"]
        rates = [_series("ray_kandinsky_batch_videos_per_hour", run_id=run) for run in ("run-driver", "run-actor")]

        def exported(seen: dict) -> bool:  # every series, the rates included: each is exported on its own tick
            return all(seen.get(k) == v for k, v in want.items()) and all((seen.get(r) or 0) > 0 for r in rates)

        def scrape_until_exported() -> dict:
            # Wait on the condition, never on a clock: a loaded host exports late, not wrongly.
            deadline, seen = time.monotonic() + 300, {}
            while time.monotonic() < deadline:
                family.update(_family(driver.pid, ray_tmp))
                seen = _scrape(port)
                if exported(seen):
                    break
                time.sleep(0.5)
            return seen

        seen = scrape_until_exported()
        assert {k: seen.get(k) for k in want} == want, sorted(seen.items())
        assert all(seen.get(r, 0) > 0 for r in rates), sorted(seen.items())
        # Ray forgets a gauge not set within two export intervals; ticking keeps them (and counters) alive.
        time.sleep(3)
        again = scrape_until_exported()
        assert {k: again.get(k) for k in want} == want and all(again.get(r, 0) > 0 for r in rates), \
            sorted(again.items())
        # Only loopback: the exporter binds the node's address, 127.0.0.1 here.
        family.update(_family(driver.pid, ray_tmp))
        listeners = {c.laddr.ip for p in family.values() for c in _connections(p)
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listeners == {"127.0.0.1"}, listeners

        driver.stdin.close()  # the driver stops ticking and shuts Ray down
        assert driver.wait(timeout=60) == 0, stderr.read_text()[-4000:]
        for _ in range(50):  # ray.shutdown() has returned; give its processes a moment to exit
            survivors = _alive([*family.values(), *_marked(ray_tmp)])
            if not survivors:
                break
            time.sleep(0.2)
        assert survivors == [], f"Ray processes left running: {survivors}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        for proc in [*family.values(), *_marked(ray_tmp)]:  # only this test's driver and its Ray
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
