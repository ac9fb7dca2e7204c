"""SIGINT and SIGTERM stop `kandinsky-batch run` promptly: exit 130 / 143, one line on stderr, no traceback, what
was committed published, and the same command resumes.

The oracle: the line's count equals the manifest rows published, every ok row's object exists, and the re-run
renders exactly the rows that were missing. The real CLI runs as a subprocess in its own session, with its own
Ray temp dir, so cleanup finds (and kills) only this test's processes. Stop times are printed, not asserted.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kandinsky_batch.cli import main
from kandinsky_batch.interrupt import Interrupted, StopSignals
from kandinsky_batch.output import lease
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.storage import Storage
from tests.helpers import TINY_RENDER, write_dataset
from tests.processes import kill_all, marked
from tests.test_queue import World, _queue, _task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^interrupted \((SIGINT|SIGTERM)\): (\d+) rows committed this run(?: \((\d+) ok in the output\))?; "
                  r"re-run the same command to resume$")
GUARD = 300  # seconds: only against hanging


@pytest.fixture
def ray_tmp():
    """A Ray temp dir of this test's own (short: Ray's socket paths must fit); its processes are killed after."""
    path = tempfile.mkdtemp(prefix="kbi-", dir="/tmp")
    yield path
    kill_all(marked(path))
    shutil.rmtree(path, ignore_errors=True)


def _env(ray_tmp: str, model_cache: str) -> dict:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp,
            "KANDINSKY_BATCH_CACHE": model_cache}


def _cli(data: str, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kandinsky_batch", "run", os.path.join(ROOT, "configs", "tiny.yaml"),
            f"input.path={data}", f"output.uri={uri}", "output.format=npy", "cluster.replicas=1", "--no-progress",
            *TINY_RENDER, *extra]


def _interrupt(args, env, signum, ready, repeat: float | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Start the CLI, send `signum` to it once `ready()` (again `repeat` s later), and return its result and the
    seconds signal -> exit."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + GUARD
        while not ready():
            assert proc.poll() is None, f"the job ended before the signal: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the job never got where the signal should land"
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signum)
        if repeat is not None:
            time.sleep(repeat)
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=GUARD)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err), seconds


def _stopped(result, signum) -> int:
    """The contract of a stop: 128 + signum, one line after the job's own output, no traceback. Returns N."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 128 + signum, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    match = LINE.match(lines[-1])
    assert match and match.group(1) == signal.Signals(signum).name, lines[-3:]
    assert sum(1 for line in lines if line.startswith("interrupted")) == 1, lines
    return int(match.group(2))


def _published(uri: str) -> list[dict]:
    """The manifest rows on storage, each ok row's object there."""
    storage = Storage(uri)
    rows = read_manifest(storage).to_pylist()
    for row in rows:
        if row["status"] == "ok":
            assert storage.fs.exists(row["uri"].removeprefix("file://")), row["uri"]
    return rows


def test_signals_raise_in_read_only_phases_and_only_ask_elsewhere():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with StopSignals() as stop:
            pass
        assert signal.getsignal(signal.SIGTERM) is saved[signal.SIGTERM]  # no signal: the caller's are back
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)  # outside `abortable`: only asks (the work queue looks)
            assert stop.signum == signal.SIGINT
            with pytest.raises(Interrupted) as raised:
                with stop.abortable():
                    pass
            assert raised.value.exit_code == 130
        assert signal.getsignal(signal.SIGINT) == stop._handle  # stopping: a second signal would exit at once
        with StopSignals() as stop:
            with pytest.raises(Interrupted) as raised:
                with stop.abortable():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # never reached: the handler raises
            assert raised.value.exit_code == 143
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    line = Interrupted(signal.SIGINT, committed=3, in_output=10).line()
    assert LINE.match(line) and "3 rows committed this run (10 ok in the output)" in line


def test_the_work_queue_stops_when_asked_and_settles_what_is_back():
    world = World({"default": 2})
    tasks = [_task(i) for i in range(40)]
    rows: list[dict] = []
    queue, rows = _queue(world, tasks, should_stop=lambda: len(rows) >= 5)
    queue.run()
    assert queue.stopped and 5 <= len(rows) < len(tasks)
    assert queue.flying == 0  # every batch on a replica came back and was settled before it returned
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r.killed for r in world.spawned)  # replicas released


@pytest.mark.slow
def test_small_job_stops_on_sigint_and_sigterm_then_resumes(tmp_path, model_cache, ray_tmp, capsys):
    n = 12
    data = write_dataset(tmp_path / "prompts.parquet",
                         [{"id": f"row-{i:02d}", "prompt": f"scene number {i}, a slow pan over a field"}
                          for i in range(n)])
    uri = f"file://{tmp_path / 'out'}"
    # The simulated model (no torch in the replica, so a cheaper start) at ~0.3 s a row: slow enough to stop mid-job.
    args, env = _cli(data, uri, "model.path=simulated:10000"), _env(ray_tmp, model_cache)
    videos = tmp_path / "out" / "videos"

    def objects() -> int:
        return len([p for p in os.listdir(videos) if p.endswith(".npy")]) if videos.is_dir() else 0

    # SIGINT after 3 videos, then SIGTERM to the resumed job after 3 more: each publishes what it committed.
    committed, times = 0, {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        before = objects()
        result, times[signum] = _interrupt(args, env, signum, lambda: objects() >= before + 3)
        mine = _stopped(result, signum)
        rows = _published(uri)
        assert len(rows) == committed + mine and {r["status"] for r in rows} == {"ok"}
        assert f"({len(rows)} ok in the output)" in result.stderr
        assert lease.read(Storage(uri)).released  # released before Ray shut down: the re-run need not wait
        committed = len(rows)
    assert 3 <= committed < n, "the signals should land mid-job"
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    # The same command finishes the job, rendering (or adopting) only the rows that were missing: through the CLI's
    # main in this process, its replicas threads (`cluster.address=inprocess`). The resume on a local Ray after a
    # stop is the SIGTERM run's above (it resumed the SIGINT-stopped job); no signal is sent to this one.
    capsys.readouterr()
    code = main([*args[3:], "cluster.address=inprocess"])
    done = capsys.readouterr()
    assert code == 0, done.err[-3000:]
    counts = json.loads((tmp_path / "out" / "_SUCCESS").read_text())["counts"]
    assert (counts["ok"], counts["skipped"]) == (n, committed), counts
    assert counts["rendered"] + counts["adopted"] == n - committed, counts
    assert f"{counts['rendered']} rendered, {committed} already done" in done.out
    print(f"\nsmall job stop (signal -> exit): SIGINT {times[signal.SIGINT]:.1f} s, "
          f"SIGTERM {times[signal.SIGTERM]:.1f} s; {committed} of {n} rows kept")


def _large_dataset(path, rows: int) -> str:
    """`rows` short prompts, all but the last 8 invalid (height 100): the front end streams and records the
    whole dataset before anything could render. Written with Arrow, no Python object per row."""
    heights = pa.array([100] * (rows - 8) + [None] * 8, pa.int32())
    numbers = pa.array(np.arange(rows)).cast(pa.string())
    ids = pc.binary_join_element_wise("r", numbers, "")
    prompts = pc.binary_join_element_wise("a prompt ", numbers, "")
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "height": heights}), path)
    return str(path)


@pytest.mark.slow
def test_large_dataset_stops_while_the_front_end_is_busy(tmp_path, model_cache, ray_tmp):
    data = _large_dataset(tmp_path / "large.parquet", 300_000)
    env = _env(ray_tmp, model_cache)
    times = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / f"out-{signum}"
        args = _cli(data, f"file://{out}", "model.path=simulated:0")
        # Once the front end has published a first manifest part, it is streaming the dataset.
        result, times[signum] = _interrupt(
            args, env, signum, lambda: (out / "manifest").is_dir() and any(os.scandir(out / "manifest")))
        mine = _stopped(result, signum)
        rows = _published(f"file://{out}")
        assert len(rows) == mine and 0 < mine < 300_000 and {r["status"] for r in rows} == {"invalid"}
    # Ctrl-C twice: the second exits at once (or finds the job gone), with no traceback either way.
    out = tmp_path / "out-twice"
    twice, _ = _interrupt(_cli(data, f"file://{out}", "model.path=simulated:0"), env, signal.SIGINT,
                          lambda: (out / "manifest").is_dir() and any(os.scandir(out / "manifest")), repeat=0.1)
    # -2: the second signal came while the interpreter was ending (its handlers reset): a shell sees 130 too.
    assert twice.returncode in (130, -signal.SIGINT) and "Traceback" not in twice.stderr, twice.stderr[-3000:]
    assert [line for line in twice.stderr.splitlines() if line.strip()][-1].startswith("interrupted")
    print(f"\n300k-row front end stop (signal -> exit): SIGINT {times[signal.SIGINT]:.1f} s, "
          f"SIGTERM {times[signal.SIGTERM]:.1f} s")
