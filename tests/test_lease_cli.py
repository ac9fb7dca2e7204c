"""One job per output prefix through the real CLI, without Ray (`cluster.address=inprocess`, the simulated model):
the takeover on S3 (moto; file:// is the in-process job test's and the unit tests'), the stop on file://. The first
driver is a process of its own (SIGKILLed, SIGTERMed); the runs that meet its lease go through the CLI's `main` in
the test's process.

Oracles: the refusal's one line names the running driver (its run id from the lease, its pid from the process we
started); after a SIGKILL the lease is left live and a later run takes it over once it is stale; the output is then
exactly once (one manifest row per id, all ok, `verify` clean). After a SIGTERM (what `ray job stop` sends first,
SIGKILL 3 s later: ray/dashboard/modules/job/job_supervisor.py) the driver prints what it kept, releases its lease and
exits 143 by itself; that it does so inside those 3 s is measured by benchmarks/interrupt.py (RESULTS §7), not
asserted on a host whose load no test controls.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from kandinsky_batch.cli import main
from kandinsky_batch.output.lease import read
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.storage import Storage
from tests.helpers import write_dataset
from tests.test_interrupt import LINE
from tests.test_lease import HELD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD = 300  # seconds: only against hanging
ROWS = 30
TTL = 12  # renewed every 2 s; its lapses are the unit tests', and a killed driver's lease is taken at once here


def _args(data: str, uri: str, options: dict | None) -> list[str]:
    # configs/tiny.yaml's rows cost 6.4e-4 megaunits: simulated:800 sleeps ~0.5 s a row, on one replica.
    opts = [f"output.storage_options={json.dumps(options).replace(' ', '')}"] if options else []
    return [sys.executable, "-m", "kandinsky_batch", "run", os.path.join(ROOT, "configs", "tiny.yaml"),
            f"input.path={data}", f"output.uri={uri}", "output.format=npy", "cluster.address=inprocess",
            "cluster.replicas=1", "model.path=simulated:800", f"output.lease_ttl={TTL}", "--no-progress", *opts]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, start_new_session=True, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait(until, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + GUARD
    while not until():
        assert proc.poll() is None, f"the job ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the job never got there"
        time.sleep(0.1)


def _dataset(tmp_path) -> str:
    return write_dataset(tmp_path / "in.parquet", [{"id": f"r{i:02d}", "prompt": f"prompt {i}"} for i in range(ROWS)])


@pytest.mark.slow
def test_a_second_run_refuses_naming_the_first_then_takes_its_lease_over_once_it_was_killed(tmp_path, s3_output,
                                                                                            capsys):
    uri, options = s3_output
    storage = Storage(uri, options)
    args = _args(_dataset(tmp_path), uri, options)
    first = _start(args)
    started = time.monotonic()
    try:
        _wait(lambda: read(storage).live, first)
        holder = read(storage).holder
        time.sleep(max(0.0, started + 8 - time.monotonic()))  # the second run 8 s after the first

        # The second and third runs go through the CLI's entry point in this process: what is under test is the
        # lease between two drivers, and the first (killed below) is the separate process.
        capsys.readouterr()
        code = main(args[3:])
        second = capsys.readouterr()
        assert first.poll() is None, "the first job ended before the second one was refused"
        lines = [line for line in second.err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), second.err[-2000:]
        named = HELD.search(lines[0])
        assert named.group(1, 2, 3) == (holder["run_id"], socket.gethostname(), str(first.pid)), lines[0]
        assert int(named.group(4)) <= 5  # renewed all along (every 2 s), though the first job has run for 8 s and more
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    left = read(storage)
    assert left.live and left.holder == holder  # a killed driver releases nothing
    published = read_manifest(storage).num_rows
    assert published < ROWS

    # Without waiting for its ttl: the killed driver ran on this machine and its pid is no process now.
    # Three replicas for what is left (not a parameter of the rows: the output is the same).
    code = main([*args[3:], "cluster.replicas=3"])
    third = capsys.readouterr()
    assert code == 0, third.err[-3000:]
    assert (f"note: took over the lease of run {holder['run_id']} (host {socket.gethostname()}, pid {first.pid}) "
            f"on {uri}: its driver (pid {first.pid}) is gone") in third.err, third.err
    table = read_manifest(storage)
    assert sorted(table["id"].to_pylist()) == [f"r{i:02d}" for i in range(ROWS)]  # one row per id
    assert set(table["status"].to_pylist()) == {"ok"}
    counts = read_success(storage)["counts"]
    assert counts["skipped"] == published and counts["rendered"] + counts["adopted"] == ROWS - published, counts
    verify = ["verify", uri] + (["--storage-options", json.dumps(options)] if options else [])
    assert main(verify) == 0
    ended = read(storage)
    assert ended.released and ended.generation == 1 and ended.holder["run_id"] != holder["run_id"]


@pytest.mark.slow
def test_sigterm_prints_what_was_kept_releases_the_lease_and_exits_by_itself(tmp_path):
    # What a stop does, whatever the host's load; how fast (inside `ray job stop`'s 3 s) is benchmarks/interrupt.py's.
    uri = f"file://{tmp_path / 'out'}"
    storage = Storage(uri)
    job = _start(_args(_dataset(tmp_path), uri, None))
    videos = tmp_path / "out" / "videos"
    try:
        _wait(lambda: videos.is_dir() and len(os.listdir(videos)) >= 3, job)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=GUARD)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 128 + signal.SIGTERM, (job.returncode, err[-2000:])  # exited by itself
    line = [line for line in err.splitlines() if line.strip()][-1]
    kept = LINE.match(line)
    assert kept and kept.group(1) == "SIGTERM", line
    assert int(kept.group(2)) == read_manifest(storage).num_rows > 0
    state = read(storage)
    assert state.released and not state.live
