"""A real job in a subprocess, started from a hostile environment: every socket it opens listens on loopback
only, and no credential reaches the output prefix, the job's own output or Ray's session files.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest

from tests.conftest import S3_BUCKET
from tests.helpers import TINY_RENDER, write_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEY = "AKIDSECRETKEY123"
SECRET = "SuperSecretValue-XYZ"
ENV_SECRET = "EnvSecretValue-ABC"
SECRETS = (KEY, SECRET, ENV_SECRET)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
JOB_TIMEOUT = 420


def _ray_processes(root_pid: int, marker: str) -> list[psutil.Process]:
    """The job's descendants, plus any process naming our Ray temp dir (in case one was reparented)."""
    found = {}
    try:
        for proc in psutil.Process(root_pid).children(recursive=True):
            found[proc.pid] = proc
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            found.setdefault(proc.pid, proc)
    return list(found.values())


def _survivors(marker: str) -> list[str]:
    """Live processes (zombies aside) that still name the job's Ray temp dir."""
    left = []
    for proc in psutil.process_iter(["cmdline", "name", "status"]):
        if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            left.append(f"{proc.info['name']}[{proc.pid}]")
    return left


def _bound_sockets(proc: psutil.Process) -> list[tuple[str, str, int]]:
    """(kind, ip, port) of every TCP socket in LISTEN and every unconnected bound UDP socket of a process."""
    try:
        connections = proc.net_connections(kind="inet")
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []
    bound = []
    for c in connections:
        if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr and c.laddr):  # 2: SOCK_DGRAM
            bound.append((f"{name}[{proc.pid}]", c.laddr.ip, c.laddr.port))
    return bound


def _scan(path: str, data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    return [f"{secret} in {path}" for secret in SECRETS if secret in text]


def test_a_job_listens_on_loopback_only_and_leaks_no_credential(tmp_path, model_cache, moto_endpoint,
                                                                 s3_storage_options):
    data = write_dataset(tmp_path / "prompts.parquet",
                         [{"id": f"row{i}", "prompt": f"a lighthouse at night {i}"} for i in range(3)])
    uri = f"s3://{S3_BUCKET}/secure"
    ray_tmp = tempfile.mkdtemp(prefix="kbsec-", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "KANDINSKY_BATCH_CACHE": model_cache, "RAY_TMPDIR": ray_tmp,
           # The caller's hostile environment: a flag that makes Ray bind the host's address, and credentials.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "AWS_ACCESS_KEY_ID": "EnvKeyId",
           "AWS_SECRET_ACCESS_KEY": ENV_SECRET}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "kandinsky_batch", "run", "configs/tiny.yaml", f"input.path={data}",
               f"output.uri={uri}", f"output.storage_options.key={KEY}", f"output.storage_options.secret={SECRET}",
               f"output.storage_options.client_kwargs.endpoint_url={moto_endpoint}", "cluster.replicas=1",
               *TINY_RENDER, "--no-progress"]
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    sockets: set[tuple[str, str, int]] = set()
    try:
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
            deadline = time.monotonic() + JOB_TIMEOUT
            try:
                while job.poll() is None and time.monotonic() < deadline:
                    for proc in _ray_processes(job.pid, ray_tmp):
                        sockets.update(_bound_sockets(proc))
                    time.sleep(0.2)
            finally:
                if job.poll() is None:
                    job.kill()
                job.wait(timeout=30)
        out, err = stdout_path.read_text(), stderr_path.read_text()
        assert job.returncode == 0, f"job exited {job.returncode}:\n{err[-4000:]}"
        assert "3 rows: 3 ok" in out, out

        # 1. Every socket that any process of the job bound is on loopback, and Ray's were among them.
        exposed = sorted(s for s in sockets if s[1] not in LOOPBACK)
        assert exposed == [], f"sockets beyond loopback: {exposed}"
        assert any(name.startswith(("gcs_server", "raylet")) for name, _, _ in sockets), \
            f"saw no Ray listener, the check above proves nothing: {sorted(sockets)}"

        # 2. No credential in any object under the output prefix (Parquet decoded: it is compressed).
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_storage_options)
        leaks, objects = [], fs.find(f"{S3_BUCKET}/secure")
        for path in objects:
            blob = fs.cat_file(path)
            leaks += _scan(path, blob)
            if path.endswith(".parquet"):
                table = pq.read_table(io.BytesIO(blob))
                leaks += _scan(path, repr(table.to_pylist()).encode() + repr(table.schema.metadata).encode())
        names = {p.rsplit("/", 1)[-1] for p in objects}
        assert "_SUCCESS" in names and sum(p.endswith(".mp4") for p in objects) == 3, objects
        assert any(p.endswith(".parquet") for p in objects), objects

        # 3. ... nor in what the job printed, nor in any file of its Ray session (logs and the rest).
        leaks += _scan("stdout", out.encode()) + _scan("stderr", err.encode())
        sessions = [s for s in glob.glob(f"{ray_tmp}/**/session_*", recursive=True)
                    if os.path.isdir(s) and not os.path.islink(s)]
        assert len(sessions) == 1, f"expected one Ray session under {ray_tmp}: {sessions}"
        scanned_logs = 0
        for dirpath, _, files in os.walk(sessions[0]):
            for name in files:
                path = os.path.join(dirpath, name)
                if not os.path.isfile(path) or os.path.islink(path):
                    continue  # sockets, fifos
                with open(path, "rb") as f:
                    leaks += _scan(os.path.relpath(path, ray_tmp), f.read())
                scanned_logs += "/logs/" in path
        assert scanned_logs > 0, f"no Ray log files found under {sessions[0]}"
        assert leaks == [], "credentials leaked:\n" + "\n".join(leaks)

        # 4. The job stopped everything it started.
        for _ in range(50):
            left = _survivors(ray_tmp)
            if not left:
                break
            time.sleep(0.2)
        assert left == [], f"Ray processes outlived the job: {left}"
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if ray_tmp in " ".join(proc.info["cmdline"] or []):
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
