"""Shared fixtures: a real S3 server (moto) on loopback and an `output_target` that runs a test on file:// and s3://."""

from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import pytest
from moto.server import ThreadedMotoServer

# Before any test module imports ray: Ray reads this once at import, and the test Ray must bind loopback only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# CPU replicas render on one pinned BLAS code path (pipelines.numerics) with one thread (kandinsky_batch.fleet.cluster);
# the in-process oracle must too: small CPU GEMMs round differently per code path and per thread count. The
# variables are read when torch loads, so before it is imported; spawned test processes inherit them.
# KANDINSKY_BATCH_CPU_NUMERICS=native runs the whole suite on the host's own kernels instead.
from pipelines.numerics import cpu_numerics_env  # noqa: E402

os.environ.update(cpu_numerics_env())
import torch  # noqa: E402

torch.set_num_threads(1)

# Test Rays start no idle workers ahead of need (Ray's default: one per logical CPU, each importing Ray): a test's
# jobs start the actors they use, and nothing else spends the suite's two cores. Spawned Rays inherit it.
os.environ["RAY_enable_worker_prestart"] = "0"
os.environ["RAY_prestart_worker_first_driver"] = "0"  # nor the idle workers a first driver gets by default

S3_BUCKET = "kb-test"
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session", autouse=True)
def one_botocore_loader() -> Iterator[None]:
    """botocore sessions share one loader per data path, and so its parsed service JSON: each `Storage` on S3 is a
    fresh s3fs filesystem with a fresh botocore session, which would parse it again (~0.2 CPU-s a `Storage`, most of
    what a moto-backed test spends). Credentials, endpoints and clients stay per session."""
    import functools

    import botocore.loaders
    import botocore.session

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader", functools.cache(botocore.loaders.create_loader))
        yield


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1, running for the whole session."""
    saved = {name: os.environ.get(name) for name in _AWS_ENV}
    os.environ.update(_AWS_ENV)
    werkzeug_log = logging.getLogger("werkzeug")
    saved_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one access-log line per request drowns failure output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()  # werkzeug closes the listening socket when serve_forever returns
        werkzeug_log.setLevel(saved_level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_storage_options(moto_endpoint: str) -> dict:
    """fsspec options for a freshly reset moto holding an empty bucket `kb-test`."""
    reset = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(reset, timeout=10) as response:
        assert response.status == 200
    boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=S3_BUCKET)
    return {"client_kwargs": {"endpoint_url": moto_endpoint}, "key": "testing", "secret": "testing"}


def _output(request: pytest.FixtureRequest, tmp_path, backend: str) -> tuple[str, dict | None]:
    if backend == "file":
        return f"file://{tmp_path / 'out'}", None
    options = request.getfixturevalue("s3_storage_options")
    return f"s3://{S3_BUCKET}/out-{uuid.uuid4().hex}", options


@pytest.fixture(params=["file", "s3"])
def output_target(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict | None]:
    """(uri, storage_options) of an empty output prefix, on local disk and on S3: for the storage layer's tests."""
    return _output(request, tmp_path, request.param)


@pytest.fixture
def s3_output(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict | None]:
    """An S3 output prefix. End-to-end tests run on one backend each (the storage layer is tested on both)."""
    return _output(request, tmp_path, "s3")


@pytest.fixture
def file_output(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict | None]:
    """A local-disk output prefix, for end-to-end tests that run on one backend."""
    return _output(request, tmp_path, "file")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Iterator[str]:
    """A per-session node cache, so the tiny model is built once and never read from ~/.cache. Under pytest-xdist
    the workers share one (the run's temp root): presets are published into it by an atomic rename."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "model-cache"
        shared.mkdir(exist_ok=True)
        path = str(shared)
    else:
        path = str(tmp_path_factory.mktemp("model-cache"))
    saved = os.environ.get("KANDINSKY_BATCH_CACHE")
    os.environ["KANDINSKY_BATCH_CACHE"] = path
    yield path
    if saved is None:
        os.environ.pop("KANDINSKY_BATCH_CACHE", None)
    else:
        os.environ["KANDINSKY_BATCH_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_pipe(model_cache):
    """Plain diffusers: the tiny checkpoint loaded with `Kandinsky5T2VPipeline.from_pretrained` (the oracle)."""
    from diffusers import Kandinsky5T2VPipeline

    from pipelines import resolve_model

    pipe = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def nabla_pipe(model_cache):
    """Plain diffusers with NABLA switched on the way its docs say (config + flex backend): the NABLA oracle of the
    model-layer, gang-job and NABLA tests, loaded once per session."""
    from diffusers import Kandinsky5T2VPipeline

    from pipelines import resolve_model
    from pipelines.nabla import NABLA_DEFAULTS
    from pipelines.render_common import set_attention_backend

    pipe = Kandinsky5T2VPipeline.from_pretrained(resolve_model("tiny"))
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.register_to_config(attention_type="nabla",
                                        **{f"attention_{k}": v for k, v in NABLA_DEFAULTS.items()})
    pipe.transformer.attention_type = "nabla"
    # `pipe.transformer.set_attention_backend("flex")`, which also makes flex the process default for every model
    # loaded later (the other tests' oracles): the helper calls it and puts the default back.
    set_attention_backend(pipe.transformer, "flex")
    return pipe


@pytest.fixture(scope="module")
def ray_local(model_cache) -> Iterator[None]:
    """A loopback-only local Ray for a module's tests; jobs run in-process join it instead of starting their own.

    Per module, not per session: an idle Ray (its daemons and agents) spends about a tenth of a core, more over a
    session than the ~6 CPU-s a start and a shutdown cost."""
    import ray

    from kandinsky_batch.fleet.local_ray import start_local

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # `address="local"` (start_local): a fresh cluster even when a stale `ray start` left its address file on this
    # host; started again once if the busy host made Ray's own start-up clock run out.
    # 8 logical CPUs: the largest fleet a test runs (tests/test_gangs.py: gangs of 2 and 4 ranks) holds one per rank.
    start_local(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1",
                runtime_env={"worker_process_setup_hook": "tests.faults.install", "env_vars": {"PYTHONPATH": root}})
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _in_process() -> Iterator[None]:
    from kandinsky_batch.fleet import inprocess

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inprocess, "transport", lambda cfg: inprocess)
        yield


@pytest.fixture
def inprocess(model_cache) -> Iterator[None]:
    """Jobs run their replicas as threads of this process (no Ray): for tests whose point is the system's logic.

    Each such test's Ray side stays covered by a real-Ray end-to-end test (`ray_local`) of the same kind."""
    with _in_process():
        yield


@pytest.fixture(scope="module")
def inprocess_module(model_cache) -> Iterator[None]:
    """`inprocess` for a module-scoped fixture that runs a job once for several tests."""
    with _in_process():
        yield


@dataclass(frozen=True)
class CpuGangs:
    jobs: dict
    frames: dict


@pytest.fixture(scope="session")
def cpu_gangs(model_cache, tmp_path_factory) -> CpuGangs:
    """Rank 0's frames of every gang in `tests.gang_ranks.PINNED_GANGS`, on the replicas' pinned numerics, rendered
    once per session by one pair of spawned rank processes (tests/test_parallel.py). Under
    pytest-xdist the first worker to ask renders them and leaves them in the run's temp root for the other."""
    import pickle

    from filelock import FileLock

    from tests.gang_ranks import PINNED_GANGS, run_gangs

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return CpuGangs(PINNED_GANGS, run_gangs(PINNED_GANGS, model_cache))
    shared = tmp_path_factory.getbasetemp().parent / "cpu-gangs.pickle"
    with FileLock(f"{shared}.lock"):
        if not shared.exists():
            shared.write_bytes(pickle.dumps(run_gangs(PINNED_GANGS, model_cache)))
        return CpuGangs(PINNED_GANGS, pickle.loads(shared.read_bytes()))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` (addopts) with a lane for the modules that mostly wait (tests/lanes.py)."""
    if config.getvalue("dist") == "loadfile":
        from tests.lanes import WaitingLane

        return WaitingLane(config, log)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with `slow` tests (Ray, spawned jobs) run first: pytest-xdist hands out whole modules in this order
    (`--no-loadscope-reorder`: its default order is by test count, which put the 4-test fleet module last), so the
    workers end on short modules instead of one of them finishing a long one alone."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: file and test order kept otherwise
