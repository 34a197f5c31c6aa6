"""sweeps.preflight against a real multi-node Ray cluster on this machine (cluster.local.LocalCluster).

A CPU-0 head and two workers declaring one GPU each; nodes that misbehave are real raylets too:
one whose worker processes import a stale copy of the code (PYTHONPATH), one in its own mount
namespace where the storage directory is hidden under a tmpfs (as a second machine's disk would be).
The checks run in a driver process of their own (`Driver`), never in pytest's: Ray ends a driver
whose raylet or GCS it loses with a bare exit(1), which would take the whole test session down
without a word; here it fails the test, with the dead nodes' own log lines.
"""
from __future__ import annotations

import functools
import multiprocessing
import shutil
import signal
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cluster.local import LocalCluster, free_port, node_ip
from sweeps import preflight

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
FAKE_AUTOSCALER = REPO / "tests" / "fake_cluster" / "autoscaler.yaml"


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="`unshare -m` (a private mount namespace, "
                                   "to give one node another view of the disk) is not permitted here")


def private_mounts(mount: str) -> list[str]:
    """A command prefix: run the node in its own mount namespace after `mount` (seen by it alone)."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mount} && exec \"$@\"", "sh"]


class Driver:
    """One spawned process connected to the cluster with ray.init; `call` runs a function there and
    returns its value or raises its exception (the exception object itself: pytest.raises matches)."""

    def __init__(self, local: LocalCluster) -> None:
        import ray

        self.local = local
        self.pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=functools.partial(ray.init, address=local.address, log_to_driver=False))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return self.pool.submit(fn, *args, **kwargs).result(timeout=600)
        except BrokenProcessPool:
            raise AssertionError(f"the driver process died (Ray exits a driver that lost its raylet or GCS); "
                                 f"dead nodes: {self.local.dead_nodes() or 'none'}; logs under {self.local.root}"
                                 ) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster()
    try:
        local.start_head()  # CPU 0, as cluster/gpu.yaml's head
        local.add_worker(num_cpus=1, num_gpus=1)
        local.add_worker(num_cpus=1, num_gpus=1)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def driver(cluster: LocalCluster) -> Iterator[Driver]:
    connected = Driver(cluster)
    try:
        _wait_alive(connected, 3)
        yield connected
    finally:
        connected.close()


def _wait_alive(driver: Driver, count: int, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = driver.call(preflight.live_nodes)
        if len(alive) == count:
            return alive
        time.sleep(0.2)
    raise TimeoutError(f"expected {count} live nodes, have {len(alive)}")


@contextmanager
def _odd_worker(driver: Driver, mount: str) -> Iterator[tuple[str, list[dict]]]:
    """A fourth node whose processes see `mount` privately; yields its node id and the live nodes,
    and removes it afterwards."""
    local = driver.local
    odd = local.add_worker(num_cpus=1, wrap=private_mounts(mount))
    try:
        live = _wait_alive(driver, 4)
        yield local.node_ids(live)[odd.name], live
    finally:
        local.kill(odd, signal.SIGTERM)  # graceful: the GCS marks it dead at once
        _wait_alive(driver, 3)


# ------------------------------------------------------------------------------------- address
def test_check_address_accepts_the_live_head(cluster):
    preflight.check_address(cluster.address, timeout_s=30)  # generous: no wall-clock promise tested on a busy machine
    preflight.check_address(None)
    preflight.check_address("local")


def test_check_address_fails_on_a_port_nobody_listens_on_naming_its_timeout():
    address = f"{node_ip()}:{free_port()}"
    with pytest.raises(RuntimeError, match=rf"--address={address} does not answer: TCP connect .* failed within 2 s"):
        preflight.check_address(address, timeout_s=2)


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:8265", r"dashboard/job-server URL; the driver needs the GCS address"),
    ("10.0.0.5", r"is not host:port"),
    ("ray://head", r"is not host:port"),
], ids=["dashboard-url", "no-port", "client-no-port"])
def test_check_address_rejects_malformed_addresses(address, message):
    with pytest.raises(ValueError, match=message):
        preflight.check_address(address)


# ------------------------------------------------------------------------------------- gpu request
def test_gpu_request_that_fits_a_live_node_passes(driver):
    driver.call(preflight.check_gpu_request, 0.5, 1)  # two trials per declared GPU
    driver.call(preflight.check_gpu_request, 1, 1)


@pytest.mark.parametrize("gpus, cpus, message", [
    (2, 1, r"asks for 2 GPU and 1 CPU on one node.*lower --gpus-per-trial to at most 1 "),
    (1, 2, r"asks for 1 GPU and 2 CPU.*--cpus-per-trial to at most 1,"),
], ids=["too-many-gpus", "too-many-cpus"])
def test_gpu_request_no_node_offers_names_every_node(driver, gpus, cpus, message):
    with pytest.raises(RuntimeError, match=message) as info:
        driver.call(preflight.check_gpu_request, gpus, cpus, autoscaler_config=None)
    assert str(info.value).count("1 CPU, 1 GPU") == 2 and "0 CPU, 0 GPU" in str(info.value)  # workers, head


def test_gpu_request_counts_node_types_the_autoscaler_can_add(driver):
    driver.call(preflight.check_gpu_request, 2, 2, autoscaler_config=FAKE_AUTOSCALER)  # gpu2x: 2 CPU, 2 GPU
    with pytest.raises(RuntimeError, match=r"node type gpu2x \(autoscaler\): 2 CPU, 2 GPU.*at most 2 "):
        driver.call(preflight.check_gpu_request, 4, 1, autoscaler_config=FAKE_AUTOSCALER)


@pytest.mark.parametrize("gpus, cpus, message", [
    (1.5, 1, r"--gpus-per-trial=1.5: Ray accepts a fraction up to 1 or a whole number"),
    (-1, 1, r"cannot be negative"),
    (0, 0, r"a trial asking for nothing"),
], ids=["fraction-above-one", "negative", "nothing"])
def test_gpu_request_impossible_values(gpus, cpus, message):
    with pytest.raises(ValueError, match=message):
        preflight.check_gpu_request(gpus, cpus)


# ------------------------------------------------------------------------------------- versions
def test_every_node_runs_the_drivers_code(driver):
    driver.call(preflight.check_node_versions)
    versions = driver.call(preflight.code_versions)
    assert len(versions["code"]) == 16 and versions["python"].startswith("3.")


@needs_unshare
def test_a_node_with_stale_code_is_named(driver, tmp_path):
    stale = tmp_path / "adrec"
    shutil.copytree(REPO / "adrec", stale, ignore=shutil.ignore_patterns("__pycache__"))
    with (stale / "config.py").open("a") as f:
        f.write("\n# an edit the driver does not have\n")
    # This node sees the stale copy at the repository's own path (Ray puts the driver's working
    # directory first on every worker's sys.path): a node whose synced directory is out of date.
    with _odd_worker(driver, f"mount --bind {stale} {REPO / 'adrec'}") as (odd_id, live):
        with pytest.raises(RuntimeError, match=rf"node {odd_id} \(\S+\): code [0-9a-f]{{16}} != driver "
                                               rf"{preflight.code_versions()['code']}.*ray job submit --working-dir"
                           ) as info:
            driver.call(preflight.check_node_versions)
        others = [n["NodeID"] for n in live if n["NodeID"] != odd_id]
        assert not any(other in str(info.value) for other in others)  # only the stale node


# ------------------------------------------------------------------------------------- storage
def test_storage_every_node_sees_passes_and_leaves_no_marker(driver, tmp_path):
    storage = tmp_path / "storage"
    driver.call(preflight.check_storage_visible, str(storage))
    assert storage.is_dir() and list(storage.iterdir()) == []


@needs_unshare
def test_a_node_that_cannot_see_the_storage_is_named(driver, tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    # This node's processes see an empty tmpfs at `storage`: the same path, another disk.
    with _odd_worker(driver, f"mount -t tmpfs none {storage}") as (odd_id, _):
        with pytest.raises(RuntimeError, match=rf"is not visible on every node \(1 of 4 cannot read the driver's "
                                               rf"marker\): node {odd_id} \(\S+\): cannot read .*FileNotFound.*"
                                               rf"an s3:// or gs:// URI .*a folder every node mounts at the same path \(NFS/EFS\)"):
            driver.call(preflight.check_storage_visible, str(storage), timeout_s=30)
        assert list(storage.iterdir()) == []
