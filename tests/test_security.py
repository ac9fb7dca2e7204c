"""A real job in a subprocess, started from a hostile environment: every socket it opens listens on loopback
only, no credential reaches the output prefix, the job's own output or Ray's session files, and nothing it
started outlives it.

The job runs once per environment (module fixture); each property is its own test so one failure does not
hide another.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import fsspec
import psutil
import pyarrow.parquet as pq
import pytest

from tests.helpers import TINY_RENDER, write_dataset
from tests.processes import marked as _marked

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY = "AKIDSECRETKEY123"
SECRET = "SuperSecretValue-XYZ"
ENV_SECRET = "EnvSecretValue-ABC"
SECRETS = (KEY, SECRET, ENV_SECRET)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
JOB_TIMEOUT = 420
ROWS = 3


@dataclass
class Finished:
    """What one job run left behind for the tests to inspect."""

    model: str
    returncode: int
    stdout: str
    stderr: str
    sockets: set = field(default_factory=set)
    objects: dict = field(default_factory=dict)
    session_files: dict = field(default_factory=dict)
    sessions: list = field(default_factory=list)
    survivors: list = field(default_factory=list)


def _job_processes(root_pid: int, marker: str) -> list[psutil.Process]:
    """The job and its descendants, plus any process naming our Ray temp dir (in case one was reparented)."""
    found = {}
    try:
        root = psutil.Process(root_pid)
        for proc in [root, *root.children(recursive=True)]:
            found[proc.pid] = proc
    except psutil.NoSuchProcess:
        pass
    for proc in _marked(marker):
        found.setdefault(proc.pid, proc)
    return list(found.values())


def _bound_sockets(proc: psutil.Process) -> list[tuple[str, str, int]]:
    """(process, ip, port) of every listening TCP socket and every unconnected bound UDP socket of a process."""
    try:
        connections = proc.net_connections(kind="inet")
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []
    return [(f"{name}[{proc.pid}]", c.laddr.ip, c.laddr.port) for c in connections
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr and not c.raddr)]


def _run_job(tmp_path: Path, model_cache: str, moto_endpoint: str, hostile_flag: str | None, model: str) -> Finished:
    bucket = f"kb-sec-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    data = write_dataset(tmp_path / "prompts.parquet",
                         [{"id": f"row{i}", "prompt": f"a lighthouse at night {i}"} for i in range(ROWS)])
    ray_tmp = tempfile.mkdtemp(prefix="kbsec-", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "KANDINSKY_BATCH_CACHE": model_cache, "RAY_TMPDIR": ray_tmp,
           "AWS_ACCESS_KEY_ID": "EnvKeyId", "AWS_SECRET_ACCESS_KEY": ENV_SECRET}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    if hostile_flag is not None:
        # The flag that makes Ray bind the host's network address instead of loopback.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = hostile_flag
    command = [sys.executable, "-m", "kandinsky_batch", "run", "configs/tiny.yaml", f"input.path={data}",
               f"output.uri=s3://{bucket}/secure", f"output.storage_options.key={KEY}",
               f"output.storage_options.secret={SECRET}",
               f"output.storage_options.client_kwargs.endpoint_url={moto_endpoint}", "cluster.replicas=1",
               f"model.path={model}", *TINY_RENDER]  # with its progress bar: the console test below reads what the user sees
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    sockets: set[tuple[str, str, int]] = set()
    try:
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
            deadline = time.monotonic() + JOB_TIMEOUT
            try:
                while job.poll() is None and time.monotonic() < deadline:
                    for proc in _job_processes(job.pid, ray_tmp):
                        sockets.update(_bound_sockets(proc))
                    time.sleep(0.2)
            finally:
                if job.poll() is None:
                    job.kill()
                job.wait(timeout=30)
        finished = Finished(model, job.returncode, stdout_path.read_text(), stderr_path.read_text(), sockets)

        for _ in range(50):  # ray.shutdown() has returned; give its processes a moment to exit
            finished.survivors = [f"{p.name()}[{p.pid}]" for p in _marked(ray_tmp)]
            if not finished.survivors:
                break
            time.sleep(0.2)

        fs = fsspec.filesystem("s3", skip_instance_cache=True, key="testing", secret="testing",
                               client_kwargs={"endpoint_url": moto_endpoint})
        finished.objects = {path: fs.cat_file(path) for path in fs.find(f"{bucket}/secure")}
        finished.sessions = [s for s in glob.glob(f"{ray_tmp}/**/session_*", recursive=True)
                             if os.path.isdir(s) and not os.path.islink(s)]
        for session in finished.sessions:
            for dirpath, _, files in os.walk(session):
                for name in files:
                    path = os.path.join(dirpath, name)
                    if os.path.isfile(path) and not os.path.islink(path):  # not sockets or fifos
                        with open(path, "rb") as f:
                            finished.session_files[os.path.relpath(path, ray_tmp)] = f.read()
        return finished
    finally:
        for proc in _marked(ray_tmp):
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


# The sockets, credentials and processes are Ray's and the storage layer's, not the model's: the hostile flag's job
# renders with the simulated model (its actor imports no torch: ~15 s less), the other with the tiny one, whose
# libraries' console noise the console test checks.
@pytest.fixture(scope="module", params=[("1", "simulated"), (None, "tiny")], ids=["flag=1", "flag-unset"])
def finished(request, tmp_path_factory, model_cache, moto_endpoint) -> Finished:
    """One tiny job (3 rows, s3 output with fake credentials) run through the CLI."""
    hostile, model = request.param
    result = _run_job(tmp_path_factory.mktemp("security"), model_cache, moto_endpoint, hostile, model)
    assert result.returncode == 0, f"job exited {result.returncode}:\n{result.stderr[-4000:]}"
    assert f"{ROWS} rows: {ROWS} ok" in result.stdout, result.stdout
    return result


def _leaks(where: str, data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    return [f"{secret!r} in {where}" for secret in SECRETS if secret in text]


def test_every_socket_of_the_job_is_on_loopback(finished):
    exposed = sorted(s for s in finished.sockets if s[1] not in LOOPBACK)
    assert exposed == [], f"sockets beyond loopback: {exposed}"
    ray_listeners = [s for s in finished.sockets if s[0].startswith(("gcs_server", "raylet"))]
    assert ray_listeners, f"saw no Ray listener, so the check above proves nothing: {sorted(finished.sockets)}"


def test_no_credential_in_outputs_printed_text_or_ray_session(finished):
    leaks = []
    for path, blob in finished.objects.items():
        leaks += _leaks(path, blob)
        if path.endswith(".parquet"):  # compressed: look at the decoded values and metadata too
            table = pq.read_table(io.BytesIO(blob))
            leaks += _leaks(f"{path} (decoded)", repr(table.to_pylist()).encode() + repr(table.schema.metadata).encode())
    names = [p.rsplit("/", 1)[-1] for p in finished.objects]
    assert "_SUCCESS" in names and sum(n.endswith(".mp4") for n in names) == ROWS, names
    assert any(n.endswith(".parquet") for n in names), names

    leaks += _leaks("stdout", finished.stdout.encode()) + _leaks("stderr", finished.stderr.encode())
    assert len(finished.sessions) == 1, f"expected exactly one Ray session: {finished.sessions}"
    logs = [path for path in finished.session_files if "/logs/" in path]
    assert logs, f"no Ray log files found in {finished.sessions}"
    # A positive control: the files scanned are the job's real Ray logs (they name its actor class).
    assert any(b"RenderWorker" in finished.session_files[path] for path in logs), logs
    for path, blob in finished.session_files.items():
        leaks += _leaks(path, blob)
    assert leaks == [], "credentials leaked:\n" + "\n".join(leaks)


def test_the_console_shows_the_phases_and_no_ray_or_library_noise(finished):
    """stderr is the progress bar: its phases until it moves, none of Ray's start-up warnings and none of the
    model libraries' bars (a cold session cache has this driver build the tiny preset: its save prints one)."""
    # Read back as text, the carriage returns of tqdm's redraws are line ends.
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    phases = [line.split(":")[0] for line in lines]
    assert phases[:3] == ["reading rows…", "starting Ray…", f"loading model {finished.model} on 1 replica…"], phases
    assert set(phases[3:]) == {"rendering"} and f"{ROWS}/{ROWS}" in lines[-1], lines
    for noise in ("Writing model shards", "Loading checkpoint shards", "Token authentication", "WARNING"):
        assert noise not in finished.stderr, finished.stderr[-2000:]
    assert finished.stdout.startswith(f"done: {ROWS} rows: {ROWS} ok") and "done:" not in finished.stderr


def test_the_job_leaves_no_ray_process_running(finished):
    assert finished.survivors == [], f"Ray processes outlived the job: {finished.survivors}"
