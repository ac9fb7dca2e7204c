"""One job per output prefix (`kandinsky_batch.output.lease`), on file:// and on S3 (moto).

Oracles: the objects under `_LEASE/` (who created which generation, create-only), the store's own modification
times for staleness (a contender's clock is the store's, moved forward by the test where a lease must look dead),
the holder's monotonic clock injected for its lapses, and for jobs the manifest: one row per id, whoever rendered it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

from kandinsky_batch.config.load import load_config
from kandinsky_batch.config.schema import OutputConfig
from kandinsky_batch.errors import ConfigError, LeaseHeld, LeaseLost, StorageUnavailable
from kandinsky_batch.output import lease
from kandinsky_batch.output.lease import Lease, margin_seconds, read, store_now
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from tests.helpers import write_dataset


HELD = re.compile(r"output\.uri='[^']+' is being written by run (\S+) \(host (\S+), pid (\d+)\): its heartbeat is "
                  r"(\d+) s old \(lease generation (\d+), ttl [\d.]+ s\); one job per output prefix")


class Counting(Storage):
    """A storage that records every create-only write and its outcome."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.creates: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        created = super().put_bytes_if_absent(key, data)
        with self._lock:
            self.creates.append((key, created))
        return created


def _objects(storage: Storage) -> list[str]:
    return [key.split("/", 1)[1] for key in storage.list("_LEASE")]


def test_a_lease_is_created_once_a_live_one_refused_and_a_released_one_followed(output_target):
    uri, options = output_target
    storage = Storage(uri, options)
    first = Lease.acquire(storage, "run-a", ttl=30)
    state = read(storage)
    assert state.live and state.generation == 0 and state.holder == first.record
    assert {k: state.holder[k] for k in ("run_id", "generation", "ttl_seconds")} == \
        {"run_id": "run-a", "generation": 0, "ttl_seconds": 30}
    assert state.beat["nonce"] == first.record["nonce"] and state.beat["pid"] == first.record["pid"]
    assert _objects(storage) == ["00000000.beat", "00000000.lease"]

    with pytest.raises(LeaseHeld) as refused:
        Lease.acquire(storage, "run-b", ttl=30)
    named = HELD.search(str(refused.value))
    assert named, str(refused.value)
    assert named.group(1, 2, 3, 5) == ("run-a", first.record["host"], str(first.record["pid"]), "0")
    assert int(named.group(4)) <= 2  # by the store's clock: a probe written just now against the heartbeat
    assert _objects(storage) == ["00000000.beat", "00000000.lease"]  # the refusal's probe is gone

    before = read(storage)
    assert first.release() and not read(storage).live and read(storage).released
    after = read(storage)
    second = Lease.acquire(storage, "run-b", ttl=30)
    assert second.generation == 1 and second.took_over is None
    assert second.follows(after) and not second.follows(before)  # `before` was live: the output is read again
    assert _objects(storage) == ["00000001.beat", "00000001.lease"]  # the ended generation pruned
    second.release()


def test_a_stale_lease_goes_to_exactly_one_of_two_racing_contenders_and_its_holder_stops(output_target):
    uri, options = output_target
    storage = Counting(uri, options)
    # Never renewed again: its driver was killed. Its own clock stands still, so however long the race takes on a
    # loaded host, it still believes it holds the lease until its next renewal reads the store.
    dead = Lease.acquire(storage, "run-dead", ttl=5, clock=lambda: 0.0)
    race = threading.Barrier(2)

    def later(store: Storage, nonce: str):
        """The store's clock, a minute on while generation 0 is the newest: the dead holder's heartbeat is stale.
        Both contenders judge it before either creates generation 1 (the barrier), so both race to create it."""
        stamp = store_now(store, nonce)
        if read(store).generation == 0:
            race.wait(timeout=30)
            return stamp + timedelta(seconds=60)
        return stamp

    won, refused = [], []

    def contend(run_id: str) -> None:
        try:
            won.append(Lease.acquire(storage, run_id, ttl=5, now=later))
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(won) == 1 and len(refused) == 1, (won, refused)
    winner = won[0]
    attempts = [created for key, created in storage.creates if key == "_LEASE/00000001.lease"]
    assert sorted(attempts) == [False, True]  # both tried the create-only write of generation 1; one took
    assert winner.generation == 1 and winner.took_over.state.holder["run_id"] == "run-dead"
    assert winner.took_over.age >= 60 and winner.took_over.why.startswith("its heartbeat was")
    assert HELD.search(refused[0]).group(1, 5) == (winner.record["run_id"], "1")  # the loser names the winner
    assert read(storage).holder == winner.record and _objects(storage) == ["00000001.beat", "00000001.lease"]

    # The old holder wakes up: its next renewal sees the newer generation, and it stops for good.
    assert dead.held()
    dead.renew()
    assert not dead.held()
    with pytest.raises(LeaseLost, match=rf"generation 0\): run {winner.record['run_id']} .* took it over"):
        dead.check()
    assert dead.release() is False  # it marks nothing: the prefix is the winner's
    assert read(storage).live and read(storage).holder == winner.record
    winner.release()


def test_a_holder_stops_when_no_renewal_lands_within_its_ttl(file_output, monkeypatch):
    uri, _ = file_output
    storage = Storage(uri, retries=1, backoff=0)
    now = [100.0]
    ttl = 6.0
    held = Lease.acquire(storage, "run-a", ttl=ttl, clock=lambda: now[0])
    lapse = 100.0 + ttl - margin_seconds(ttl)  # the lease was created at 100: a contender may take it at 106
    now[0] = lapse - 0.01
    assert held.held()
    now[0] = lapse
    assert not held.held()
    with pytest.raises(LeaseLost, match=r"no renewal landed within its ttl of 6 s; it stopped committing"):
        held.check()
    held.renew()  # too late: a lapsed lease is not renewed back
    assert not held.held()
    assert held.release() and read(storage).released  # nobody took it over: the prefix is marked free

    # A renewal that takes longer than what is left of the lease does not count.
    again = Lease.acquire(storage, "run-b", ttl=ttl, clock=lambda: now[0])
    put = storage.put_bytes

    def slow_put(key, data):
        now[0] += ttl
        put(key, data)

    monkeypatch.setattr(storage, "put_bytes", slow_put)
    again.renew()
    with pytest.raises(LeaseLost, match="its renewal landed too late"):
        again.check()
    again.release()

    # The store down past its retry budget: the holder tries again at each interval, and stops once its ttl ran out
    # without a renewal, naming the last failure.
    monkeypatch.setattr(storage, "put_bytes", put)
    third = Lease.acquire(storage, "run-c", ttl=ttl, clock=lambda: now[0])

    def down(key, data):
        raise StorageUnavailable(key, ConnectionError("endpoint down"))

    monkeypatch.setattr(storage, "put_bytes", down)
    third.renew()
    assert third.held()
    now[0] += ttl
    with pytest.raises(LeaseLost, match=r"within its ttl of 6 s \(the last try: StorageUnavailable: .*endpoint down\)"):
        third.check()


def test_a_lease_whose_driver_is_gone_from_this_machine_is_taken_at_once(file_output):
    uri, _ = file_output
    storage = Storage(uri)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    machine = lease._machine()
    assert machine is not None  # Linux: a boot id and a pid namespace

    def holding(pid: int, on: str | None, nonce: str = "n") -> lease.State:
        record = {"run_id": "run-x", "host": "h", "pid": pid, "machine": on, "nonce": nonce, "ttl_seconds": 30}
        return lease.State(0, record, None, False, store_now(storage, "probe"))  # a heartbeat written just now

    dead = lease.judge(storage, holding(int(ended.stdout), machine), ttl=30)
    assert dead.why == f"its driver (pid {int(ended.stdout)}) is gone"
    with pytest.raises(LeaseHeld):
        lease.judge(storage, holding(os.getppid(), machine), ttl=30)  # alive
    with pytest.raises(LeaseHeld):
        lease.judge(storage, holding(int(ended.stdout), "another-machine"), ttl=30)  # its pids are not ours
    mine = Lease.acquire(storage, "run-a", ttl=30)
    with pytest.raises(LeaseHeld):  # this process, holding it: alive
        lease.judge(storage, holding(os.getpid(), machine, mine.record["nonce"]), ttl=30)
    mine.release()
    # This process, no longer holding it (a job that ended and could not mark the release): free.
    assert lease.judge(storage, holding(os.getpid(), machine, mine.record["nonce"]), ttl=30).why.endswith("is gone")


def test_a_lease_goes_stale_by_the_stores_own_clock(s3_output):
    uri, options = s3_output
    storage = Storage(uri, options)
    started = time.monotonic()
    Lease.acquire(storage, "run-a", ttl=3)  # held by this process and never renewed: only its age can free it
    with pytest.raises(LeaseHeld):
        Lease.acquire(storage, "run-b", ttl=3)
    time.sleep(4.2)
    taker = Lease.acquire(storage, "run-b", ttl=3)
    elapsed = time.monotonic() - started
    # The age is the store's: its timestamps of the heartbeat and the probe, each in S3's whole seconds, so it is
    # within a second of the time that passed between the two writes (more than the 4.2 s slept, less than all).
    assert taker.generation == 1 and 4.2 - 1 <= taker.took_over.age <= elapsed + 1, (taker.took_over, elapsed)
    assert taker.took_over.why == f"its heartbeat was {taker.took_over.age:.0f} s old (ttl 3 s)"
    taker.release()


def test_the_ttl_is_a_config_key_checked_in_one_line(tmp_path):
    assert OutputConfig(uri="out").lease_ttl == 30.0
    with pytest.raises(ConfigError, match=r"^output\.lease_ttl=1: must be >= 3 seconds"):
        OutputConfig(uri="out", lease_ttl=1)
    cfg = load_config(None, ["input.path=x.parquet", f"output.uri={tmp_path}", "output.lease_ttl=4.5"])
    assert cfg.output.lease_ttl == 4.5


def _job(tmp_path, rows: int, *extra: str):
    data = write_dataset(tmp_path / "in.parquet", [{"id": f"r{i:02d}", "prompt": f"prompt {i}"} for i in range(rows)])
    return load_config(None, [f"input.path={data}", f"output.uri=file://{tmp_path / 'out'}", "output.format=npy",
                              "cluster.address=inprocess", "cluster.replicas=1", *extra])


def test_a_second_run_on_a_running_prefix_refuses_naming_it_then_runs_after_it(tmp_path, inprocess):
    from kandinsky_batch.job import run

    slow = _job(tmp_path, 6, "model.path=simulated:0.06")  # ~0.3 s a row: the first job runs ~2 s
    storage = Storage(slow.output.uri)
    results, errors = [], []
    first = threading.Thread(target=lambda: _collect(run, slow, results, errors))
    first.start()
    try:
        for _ in range(200):
            if read(storage).live or not first.is_alive():
                break
            first.join(0.05)
        holder = read(storage).holder
        assert holder is not None, errors
        with pytest.raises(LeaseHeld) as refused:
            run(_job(tmp_path, 6, "model.path=simulated:0.06"), progress=False)
        assert HELD.search(str(refused.value)).group(1, 3) == (holder["run_id"], str(holder["pid"]))
        assert first.is_alive()  # refused while the first one ran
    finally:
        first.join(60)
    assert not errors and results[0].ok == 6
    assert not read(storage).live

    second = run(_job(tmp_path, 6, "model.path=simulated:0.06"), progress=False)
    assert (second.skipped, second.rendered) == (6, 0)  # the first job's rows, read under the second's lease
    ids = read_manifest(storage)["id"].to_pylist()
    assert sorted(ids) == [f"r{i:02d}" for i in range(6)]


def _collect(run, cfg, results, errors):
    try:
        results.append(run(cfg, progress=False))
    except Exception as exc:  # noqa: BLE001 - reported by the test's asserts
        errors.append(exc)


def test_status_reads_the_lease_of_a_job_that_died_as_stale(file_output):
    from datetime import datetime

    from kandinsky_batch.output.status import status

    uri, _ = file_output
    held = Lease.acquire(Storage(uri), "run-a", ttl=10)
    beat = read(Storage(uri)).beat
    updated = datetime.fromisoformat(beat["updated_at"])
    assert status(uri, now=updated + timedelta(seconds=9)).state == "running"
    assert status(uri, now=updated + timedelta(seconds=11)).state == "stale"
    held.release()
    assert status(uri).state == "not started"
