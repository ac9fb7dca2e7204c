"""The `ray job submit` recipe against a real head on loopback: jobs/submit.sh renders a dataset end to end.

Oracle: the job succeeds, one ok manifest row per input row, `_SUCCESS` and `verify` clean, and every socket
the head's processes (job driver and actors included) listen on is a loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from kandinsky_batch.cli import main
from kandinsky_batch.fleet.local_ray import START_ATTEMPTS, TIMED_OUT
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.output.success import read_success
from kandinsky_batch.output.storage import Storage
from tests.helpers import TINY_RENDER, write_dataset
from tests.processes import kill_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the head's processes through /proc"),
]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS = [{"id": f"clip-{i}", "prompt": prompt} for i, prompt in enumerate(["a cat", "a dog", "a red car"])]
PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port",
              "--ray-client-server-port")


@dataclass
class Head:
    dashboard: str
    env: dict
    marker: str
    gcs_port: int


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _head_processes(marker: str) -> list[psutil.Process]:
    """Every process this head started: those carrying our marker in their environment, and their children."""
    name, value = marker.split("=", 1)
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(name) == value:
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop(marker: str) -> None:
    """SIGKILL this head's processes by pid, as `ray stop --force` would, but leave every other Ray alone."""
    kill_all(_head_processes(marker))


def _listeners(marker: str) -> set[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket and bound UDP socket of the head's processes."""
    found = set()
    for proc in _head_processes(marker):
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and conn.laddr):
                    found.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


@pytest.fixture
def ray_head(tmp_path, model_cache):
    """A Ray head bound to 127.0.0.1 with token auth, on free ports; always stopped afterwards. Its node cache
    (KANDINSKY_BATCH_CACHE) holds a copy of the session's tiny build, and its HOME is empty: a job that ignored the
    variable would build the model into HOME's default cache instead."""
    from pipelines import resolve_model

    # Ray's unix sockets live under the temp dir and must fit in 107 bytes: keep it short.
    temp = Path(tempfile.mkdtemp(prefix="kb-", dir="/tmp"))
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    tiny = Path(resolve_model("tiny"))  # built once per session (model_cache); linked, not built again (~25 CPU-s)
    shutil.copytree(tiny, tmp_path / "cache" / tiny.name, copy_function=os.link)
    (tmp_path / "home").mkdir()
    marker = f"KB_TEST_RAY_HEAD={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's, as in an image
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray service binds 127.0.0.1 only
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),  # a token of our own: ~/.ray/auth_token is left alone
        "KANDINSKY_BATCH_CACHE": str(tmp_path / "cache"),
        "HOME": str(tmp_path / "home"),
        marker.split("=")[0]: marker.split("=")[1],
    })
    ports = _free_ports(len(PORT_FLAGS))
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--temp-dir={temp}", "--num-cpus=2", "--disable-usage-stats",
           f"--object-store-memory={256 * 2**20}", *(f"{flag}={port}" for flag, port in zip(PORT_FLAGS, ports))]
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            # As the product's `start_local` does: once more if Ray's own start-up clock ran out on a busy host.
            if started.returncode == 0 or TIMED_OUT not in started.stdout + started.stderr:
                break
            _stop(marker)
        assert started.returncode == 0, started.stdout + started.stderr
        yield Head(dashboard=f"http://127.0.0.1:{ports[1]}", env=env, marker=marker, gcs_port=ports[0])
    finally:
        _stop(marker)
        shutil.rmtree(temp, ignore_errors=True)
    assert not _head_processes(marker), "the head left processes behind"


def test_submit_renders_dataset(ray_head, tmp_path):
    # The head enforces token auth: a request without the token is refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard}/api/jobs/", timeout=10)
    assert refused.value.code == 401

    data = write_dataset(tmp_path / "prompts.parquet", ROWS)
    out = tmp_path / "out"
    # No RAY_AUTH_MODE here: submit.sh must notice the token (RAY_AUTH_TOKEN_PATH) and send it.
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_MODE"}
    env["RAY_ADDRESS"] = ray_head.dashboard
    cmd = ["jobs/submit.sh", "configs/tiny.yaml", f"input.path={data}", f"output.uri={out}", "output.format=npy",
           "cluster.replicas=1", *TINY_RENDER]
    log = tmp_path / "submit.log"
    listeners = _listeners(ray_head.marker)
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            # Sample while the job runs so the driver's and the actors' sockets are checked too.
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                listeners |= _listeners(ray_head.marker)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output

    assert any(port == ray_head.gcs_port for _, _, port in listeners), listeners
    assert {name for name, _, _ in listeners} >= {"gcs_server", "raylet"}, listeners
    exposed = sorted(item for item in listeners if not _is_loopback(item[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"

    assert (out / "_SUCCESS").is_file()
    storage = Storage(str(out))
    assert read_success(storage)["counts"]["ok"] == len(ROWS)
    manifest = read_manifest(storage).to_pylist()
    assert sorted(r["id"] for r in manifest) == sorted(r["id"] for r in ROWS)
    assert [r["status"] for r in manifest] == ["ok"] * len(ROWS), manifest
    # The driver and the actor found the model in KANDINSKY_BATCH_CACHE: nothing was built into HOME's default cache.
    assert not (tmp_path / "home" / ".cache" / "kandinsky-batch").exists(), "the job ignored KANDINSKY_BATCH_CACHE"

    # `verify` through the CLI's entry point in this process: the submitted job is the separate process here.
    assert main(["verify", str(out)]) == 0
