"""Shared fixtures: one Ray session for the whole run, sample data, and a loopback S3 server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lungray.raysession import free_port, start_local_ray

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "lungray" / "samples"
SHARED_DATA = REPO.parent / "shared" / "data"

pytest_plugins = ["pacs_fixtures"]  # the Orthanc PACS fixtures (tests/pacs_fixtures.py)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("LUNGRAY_PATIENT_SALT", "test-salt")


def shared_data(name: str) -> Path:
    """A data set from ../shared/data, or a skip that says why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (it sits beside the repository on developer machines and in CI)")
    return path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on loopback, started and stopped here.

    Sets the standard AWS variables so boto3 and pyarrow (and Ray tasks, which inherit the
    driver's environment at start-up) reach it through plain s3:// URIs.
    """
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if executable is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("moto_server did not start")
    saved = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1"
    )
    try:
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_session(s3_server: str) -> Iterator[None]:
    """One local Ray for all tests, sized like the 2-core machine the notes describe.

    It starts after the S3 server so that Ray's workers inherit its endpoint variables.
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory=300_000_000, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A short temp folder for a subprocess's own Ray (its sockets must fit in 107 bytes), with its logs."""
    path = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the loopback server; returns its name."""
    import uuid

    import boto3

    name = f"lungray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
