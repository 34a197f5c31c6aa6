"""Shared fixtures: one private Ray and one local S3 server for the whole pytest session.

`ray_address`: started with `sweeps.local_ray.start` (its own temp dir and free ports, never a cluster some `ray
start` left on the machine, start-up retried on a busy machine), with RAY_AUTH_MODE fixed for the
session so that driver subprocesses joining it (`--address`) authenticate the same way. Never
`ray stop`: that would end every Ray on the machine.

`s3_env`: a real S3-compatible server for the session (moto's server mode, from the dev extra) with
the bucket `sweeps`, and the AWS_* variables pyarrow, boto3 and Ray Tune read to reach it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the session's Ray is a `cluster` test (`pytest -m "not cluster"`: the tests without Ray)."""
    for item in items:
        if "ray_address" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def ray_address():
    """The GCS address of this session's private Ray (2 CPUs), started on first use."""
    import ray

    from sweeps import local_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = None
    if not ray.is_initialized():
        temp_dir = local_ray.start(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    if temp_dir:
        ray.shutdown()
        local_ray.cleanup(temp_dir)


@pytest.fixture(scope="session")
def s3_env():
    """A local S3-compatible server (moto[server]) with a bucket; the AWS settings pyarrow and boto3 read."""
    pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="sweeps")
        yield env
    finally:
        server.terminate()
        server.wait(30)


def sigkill_sweep_when(cmd: list[str], cwd: str | os.PathLike, sweep: Path, *, finished: int, running: int,
                       timeout: float) -> tuple[dict, str]:
    """Start a sweep command in its own session and SIGKILL its whole process group as soon as the
    sweep's progress.json shows at least `finished` trials done and `running` running. Returns the
    last progress state and the tail of the command's stderr (for the assertion message)."""
    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    state: dict = {}
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                state = json.loads((sweep / "progress.json").read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("finished", 0) >= finished and state.get("running", 0) >= running:
                break
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    return state, proc.stderr.read()[-3000:]
