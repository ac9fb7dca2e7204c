"""Faults lose nothing: killed replicas, a killed driver, failing rows, orphaned and truncated objects.

Each test states its oracle: input rows = manifest rows, `verify` clean, and a re-run renders nothing.
Replicas run the simulated stand-in (`SIMULATED`, ~0.3 s a row, no torch in the actor): what is under test is the
work queue, the actors' lifecycle and the storage, not the model, and a replica restarts in about a second
instead of reloading diffusers. The real renderer's path through Ray actors is test_job.py's seed contract and
test_gangs.py's kill of a gang member.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import boto3
import psutil
import pytest
from moto.server import ThreadedMotoServer

from kandinsky_batch.cli import main
from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.layout import MANIFEST_DIR
from kandinsky_batch.errors import StorageOutage, StorageUnavailable
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import verify
from tests.faults import MARKER
from tests.helpers import TINY_RENDER, write_dataset

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ~0.3 s a row at TINY_RENDER's size (8 visual tokens x 2 steps x 2 passes): slow enough to be stopped mid-job.
SIMULATED = "model.path=simulated:10000"


def _rows(n: int, prefix: str = "row") -> list[dict]:
    return [{"id": f"{prefix}-{i:03d}", "prompt": f"scene number {i}, a slow pan over a field"} for i in range(n)]


def _config(tmp_path, uri, options, rows, extra=(), replicas=1):
    """One replica unless several are the point (each is an actor process to start, and to restart after a kill)."""
    data = write_dataset(tmp_path / "prompts.parquet", rows)
    cfg = load_config(None, [f"input.path={data}", f"output.uri={uri}", "output.format=npy",
                             f"cluster.replicas={replicas}",
                             *TINY_RENDER, SIMULATED, *extra])
    cfg.output.storage_options = options or {}
    return cfg


def _assert_complete(uri, options, n_rows):
    """The oracle: one manifest row per input row, all ok, every object whole with its checksum."""
    manifest = read_manifest(Storage(uri, options)).to_pylist()
    assert len(manifest) == n_rows
    assert {r["status"] for r in manifest} == {"ok"}, [r for r in manifest if r["status"] != "ok"][:3]
    assert verify(uri, options) == []
    return manifest


def _render_workers() -> list[psutil.Process]:
    """Render actors of this test process's own Ray (driver -> raylet -> worker), never anyone else's."""
    found = []
    for raylet in psutil.Process().children():
        for proc in raylet.children():
            try:
                if " ".join(proc.cmdline()).startswith("ray::RenderWorker"):
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
    return found


class _Killer(threading.Thread):
    """SIGKILLs a random render replica `kills` times at random moments while a job runs."""

    def __init__(self, kills: int, seed: int):
        super().__init__(daemon=True)
        self.kills, self.random, self.killed, self.stop = kills, random.Random(seed), 0, threading.Event()

    def run(self):
        while self.killed < self.kills and not self.stop.is_set():
            time.sleep(self.random.uniform(0.3, 1.0))
            victims = _render_workers()
            if victims:
                os.kill(self.random.choice(victims).pid, signal.SIGKILL)
                self.killed += 1


def test_replicas_sigkilled_at_random_points(tmp_path, s3_output, ray_local):
    uri, options = s3_output
    rows = _rows(16)
    # Two replicas: one is killed while the other renders on, and either may be the next victim.
    cfg = _config(tmp_path, uri, options, rows, extra=["cluster.max_attempts=6"], replicas=2)
    killer = _Killer(kills=3, seed=len(uri))
    killer.start()
    try:
        result = run(cfg, progress=False)
    finally:
        killer.stop.set()
        killer.join()
    manifest = _assert_complete(uri, options, len(rows))
    print(f"\nreplica kills: {killer.killed}, restarts: {result.restarts}, retries: {result.retries}, "
          f"rows with attempts > 1: {sum(r['attempts'] > 1 for r in manifest)}")
    assert killer.killed >= 1
    assert result.restarts >= 1
    again = run(_config(tmp_path, uri, options, rows, replicas=2), progress=False)
    assert again.rendered == 0 and again.skipped == len(rows)


def test_deterministic_row_failure_is_recorded_after_its_attempts(tmp_path, ray_local):
    rows = _rows(4) + [{"id": "doomed", "prompt": f"this one will {MARKER}"}]
    uri = f"file://{tmp_path / 'out'}"
    result = run(_config(tmp_path, uri, None, rows, extra=["cluster.max_attempts=3"]), progress=False)
    manifest = {r["id"]: r for r in read_manifest(Storage(uri)).to_pylist()}
    assert len(manifest) == len(rows)
    doomed = manifest.pop("doomed")
    assert doomed["status"] == "failed" and doomed["attempts"] == 3
    assert "injected failure" in doomed["error"] and doomed["uri"] is None
    assert {r["status"] for r in manifest.values()} == {"ok"}
    assert (result.ok, result.failed, result.retries) == (4, 1, 2)
    assert verify(uri) == []
    # A re-run tries the failed row again (its failure may have been transient) and nothing else.
    again = run(_config(tmp_path, uri, None, rows, extra=["cluster.max_attempts=1"]), progress=False)
    assert (again.rendered, again.skipped, again.failed) == (1, 4, 1)


def test_orphaned_video_is_adopted_and_a_truncated_one_rendered_again(tmp_path, file_output, inprocess):
    uri, options = file_output
    rows = _rows(5)
    run(_config(tmp_path, uri, options, rows), progress=False)
    storage = Storage(uri, options)
    originals = {k: storage.get_bytes(k) for k in storage.list("videos")}
    # The driver died after the uploads, before any manifest part: the videos exist, the manifest doesn't.
    for key in storage.list(MANIFEST_DIR):
        storage.delete(key)
    storage.delete("_SUCCESS")
    truncated = "videos/row-002.npy"
    storage.put_bytes(truncated, originals[truncated][: len(originals[truncated]) // 2])
    # One orphan lost its poster too (the worker died between the two uploads); the others' posters stand.
    posters = {k: storage.get_bytes(k) for k in storage.list("posters")}
    storage.delete("posters/row-003.jpg")
    result = run(_config(tmp_path, uri, options, rows), progress=False)
    assert (result.adopted, result.rendered) == (4, 1)
    manifest = _assert_complete(uri, options, len(rows))  # verify covers every ok row's poster
    assert {r["id"] for r in manifest if r["worker"] == "adopted"} == {f"row-{i:03d}" for i in (0, 1, 3, 4)}
    assert {k: storage.get_bytes(k) for k in storage.list("videos")} == originals
    assert all(r["poster"] == storage.url(f"posters/{r['id']}.jpg") for r in manifest)
    # npy decodes to the rendered frames exactly, so the adopted row's new poster is the lost one, byte for byte.
    assert {k: storage.get_bytes(k) for k in storage.list("posters")} == posters


def test_an_orphan_of_an_expanded_prompt_is_rendered_again(tmp_path):
    """Adopting records a row from its object alone, and the rewrite of an expanded prompt is not in the object:
    such an orphan renders again, so its manifest row records the rewrite."""
    import numpy as np

    from kandinsky_batch.output.record import Stamp
    from kandinsky_batch.intake.resume import OutputState
    from kandinsky_batch.intake.rows import Task
    from kandinsky_batch.output.video import encode_npy
    from pipelines.request import RenderOptions

    storage = Storage(str(tmp_path))
    storage.put_bytes("videos/a.npy", encode_npy(np.zeros((1, 16, 16, 3), np.uint8)))
    task = Task(id="a", row_index=0, prompt="a cat", negative_prompt=None, seed=1, height=16, width=16, num_frames=1,
                num_inference_steps=2, guidance_scale=1.0)
    silent = RenderOptions(sample_audio=False)
    expanding = RenderOptions(sample_audio=False, expand_prompts=True)
    assert len(OutputState(storage, Stamp("tiny-k6", "npy", 24, silent)).split([task]).adopted) == 1
    split = OutputState(storage, Stamp("tiny-k6", "npy", 24, expanding)).split([task])
    assert split.adopted == [] and [t.overwrite for t in split.todo] == [True]


def _snapshot(storage: Storage) -> dict:
    """key -> (bytes, modification stamp), to show committed objects are never touched again."""
    out = {}
    for key in storage.list("videos"):
        info = storage.fs.info(storage.root.rstrip("/") + "/" + key)
        out[key] = (storage.get_bytes(key), info.get("mtime") or info.get("LastModified") or info.get("ETag"))
    return out


def _cli(tmp_path, uri, options, data, extra=()) -> list[str]:
    args = [sys.executable, "-m", "kandinsky_batch", "run", os.path.join(ROOT, "configs", "tiny.yaml"),
            f"input.path={data}", f"output.uri={uri}", "output.format=npy", "cluster.replicas=1", "--no-progress",
            *TINY_RENDER, SIMULATED, *extra]
    for key, value in (options or {}).items():
        if key == "client_kwargs":
            args.append(f"output.storage_options.client_kwargs.endpoint_url={value['endpoint_url']}")
        else:
            args.append(f"output.storage_options.{key}={value}")
    return args


def test_driver_sigkilled_mid_job_then_rerun(tmp_path, s3_output, model_cache, ray_local, capsys):
    uri, options = s3_output
    rows = _rows(24)
    data = write_dataset(tmp_path / "prompts.parquet", rows)
    storage = Storage(uri, options)
    env = {**os.environ, "KANDINSKY_BATCH_CACHE": model_cache}
    # Its own session, so the kill takes the driver and the local Ray it started, as a preemption would.
    proc = subprocess.Popen(_cli(tmp_path, uri, options, data), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while len(storage.list("videos")) < 4:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the job never committed 4 videos"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = _snapshot(storage)
    assert 4 <= len(committed) < len(rows), "the kill should land mid-job"
    assert not storage.exists("_SUCCESS")

    # The same command again, through the CLI's own entry point in this process (on the module's Ray): what is
    # under test is the resume from what the killed driver left, not a fresh interpreter (the killed one was).
    capsys.readouterr()
    started = time.monotonic()
    code = main(_cli(tmp_path, uri, options, data)[3:])
    resume_seconds = time.monotonic() - started
    rerun = capsys.readouterr()
    assert code == 0, rerun.err[-2000:]
    assert f"its driver (pid {proc.pid}) is gone" in rerun.err  # its lease taken at once: it ran on this machine
    manifest = _assert_complete(uri, options, len(rows))
    after = _snapshot(storage)
    assert all(after[key] == stamp for key, stamp in committed.items()), "a committed video was touched"
    print(f"\ndriver kill: {len(committed)} of {len(rows)} committed before the kill; "
          f"re-run: {rerun.out.strip().splitlines()[-1]}; resume took {resume_seconds:.1f} s")
    assert sum(r["worker"] == "adopted" for r in manifest) + sum(r["attempts"] >= 1 for r in manifest) == len(rows)
    # And a third run renders nothing (in-process: the same `run` path the CLI takes, without another Ray start).
    final = run(_config(tmp_path, uri, options, rows), progress=False)
    assert (final.ok, final.rendered) == (len(rows), 0)


class _RestartableS3:
    """A moto S3 server of this test's own on a fixed loopback port that can go down and come back."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = None
        self.start()
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="kb-outage")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        # moto keeps its buckets in process memory, so a restarted server serves the same objects.
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()
        if self.server._server is not None:
            self.server._server.server_close()


@pytest.fixture
def outage_s3(moto_endpoint):
    s3 = _RestartableS3()
    yield s3
    s3.stop()


def _outage_options(endpoint: str) -> dict:
    # One botocore attempt per call, so the retry budget under test is the job's own (output.retries).
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}


def _outage_during(run_job, s3: _RestartableS3, storage: Storage, down_seconds: float | None):
    """Run a job in a thread; once 3 videos are committed take S3 down (for good if down_seconds is None)."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_catch(run_job)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300  # only against hanging
    while len(storage.list("videos")) < 3:
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline
        time.sleep(0.1)
    committed = _snapshot(storage)
    s3.stop()
    if down_seconds is not None:
        time.sleep(down_seconds)
        s3.start()
    thread.join(timeout=300)
    assert not thread.is_alive()
    return outcome["result"], committed


def _catch(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects what the job raised
        return exc


def test_s3_outage_shorter_than_the_retry_budget_is_ridden_out(tmp_path, outage_s3, ray_local):
    uri, options = "s3://kb-outage/short", _outage_options(outage_s3.endpoint)
    rows = _rows(16)
    cfg = _config(tmp_path, uri, options, rows, extra=["output.retries=10", "output.retry_backoff=0.5"])
    storage = Storage(uri, options)
    result, committed = _outage_during(lambda: run(cfg, progress=False), outage_s3, storage, down_seconds=3)
    assert not isinstance(result, Exception), result
    _assert_complete(uri, options, len(rows))
    assert all(_snapshot(storage)[k] == v for k, v in committed.items())


def test_s3_outage_beyond_the_budget_stops_cleanly_and_a_rerun_continues(tmp_path, outage_s3, ray_local):
    uri, options = "s3://kb-outage/long", _outage_options(outage_s3.endpoint)
    rows = _rows(16)
    cfg = _config(tmp_path, uri, options, rows, extra=["output.retries=2", "output.retry_backoff=0.1"])
    storage = Storage(uri, options)
    result, committed = _outage_during(lambda: run(cfg, progress=False), outage_s3, storage, down_seconds=None)
    assert isinstance(result, (StorageOutage, StorageUnavailable)), result
    outage_s3.start()
    assert not storage.exists("_SUCCESS")
    again = run(_config(tmp_path, uri, options, rows), progress=False)
    _assert_complete(uri, options, len(rows))
    assert all(_snapshot(storage)[k] == v for k, v in committed.items())
    print(f"\nS3 outage: stopped with {type(result).__name__}; {len(committed)} videos committed before it; "
          f"re-run rendered {again.rendered}, adopted {again.adopted}, skipped {again.skipped}")
    assert again.rendered + again.adopted + again.skipped == len(rows)
