"""Cluster checks the sweep driver runs before any trial starts.

A sweep on several nodes fails late and quietly when a node cannot see the storage (its trials
write to its own disk), runs other code (its trials are not comparable), cannot host a trial
(trials stay pending forever) or when --address points nowhere (ray.init waits, then says little).
Each check fails fast with the node named (id and IP) and the fix:

    check_address(args.address)                 # before ray.init
    ray.init(address=args.address)
    check_node_versions()
    check_gpu_request(args.gpus_per_trial, args.cpus_per_trial)
    check_storage_visible(args.storage)         # before the Tuner starts

(`run_preflight` does the last three.) The probes run as zero-CPU Ray tasks pinned to every live
node, so they run even on a head with CPU 0 and on nodes already busy with trials.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import platform
import re
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

# Packages whose source every node must share with the driver (trials import both).
CODE_PACKAGES = ("adrec", "sweeps")
DISTRIBUTION = "adrec-sensitivity"
SHARED_STORAGE_FIX = ("use storage every node sees: an s3:// or gs:// URI (--storage s3://BUCKET/adrec on "
                      "cluster/gpu.yaml) or a folder every node mounts at the same path (NFS/EFS)")
SYNC_FIX = ("Make every node run the driver's code and versions: re-sync and reinstall (`ray up "
            "cluster/gpu.yaml` reruns file_mounts and setup_commands), or submit the sweep with "
            "`ray job submit --working-dir . -- python sweeps/run.py ...` so Ray ships the code to every node")


# ---------------------------------------------------------------------------------------------
# Live nodes and per-node probes
# ---------------------------------------------------------------------------------------------
def live_nodes() -> list[dict[str, Any]]:
    """`ray.nodes()` entries of the nodes that are alive now (needs ray.init)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(node: dict[str, Any]) -> str:
    """`node <full id> (<ip>)`: the id tells nodes apart, the IP says where to look."""
    return f"node {node['NodeID']} ({node.get('NodeManagerAddress', '?')})"


def on_every_node(probe: Callable[..., Any], *args: Any, timeout_s: float) -> list[tuple[dict, bool, Any]]:
    """Run `probe(*args)` once on every live node (zero-CPU task, hard node affinity).

    Returns (node, answered, value or error text) per node. This module's probes travel by value,
    so a node runs them without importing the `sweeps` package (seconds per node, and a node with
    old code still answers, with its own code's hash)."""
    import ray
    import ray.cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    remote = ray.remote(num_cpus=0, max_retries=0)(probe)
    nodes = live_nodes()
    refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                           name=f"adrec-preflight-{probe.__name__}").remote(*args) for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    out = []
    for node, ref in zip(nodes, refs):
        if ref not in done:
            ray.cancel(ref, force=True)
            out.append((node, False, f"no answer within {timeout_s:g} s"))
            continue
        try:
            out.append((node, True, ray.get(ref)))
        except ray.exceptions.RayError as exc:  # the probe's task died or its node went away
            out.append((node, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
    return out


# ---------------------------------------------------------------------------------------------
# --address
# ---------------------------------------------------------------------------------------------
def parse_host_port(address: str) -> tuple[str, int]:
    """`host:port`, `ray://host:port` or `[v6]:port` -> (host, port); ValueError naming the form."""
    bare = re.sub(r"^[a-z]+://", "", address.strip()).rstrip("/")
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", bare)
    if not match:
        raise ValueError(f"--address={address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001); "
                         f"pass the head's GCS address, 'auto' on a cluster node, or leave it out for a local Ray")
    return match.group(1), int(match.group(2))


def check_address(address: str | None, timeout_s: float = 10) -> None:
    """Fail within `timeout_s` when `address` does not answer, before ray.init waits on it.

    None, "" and "local" start a local Ray (nothing to check). "auto" must find a running cluster
    on this machine (RAY_ADDRESS or the address file of the last `ray start`). A host:port gets a
    TCP connect with `timeout_s`."""
    if address in (None, "", "local"):
        return
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except ConnectionError as exc:
            raise RuntimeError(f"--address=auto found no running Ray cluster on this machine ({exc}); start "
                               f"one with `ray start --head` or `ray up cluster/gpu.yaml`, or pass the head's "
                               f"host:port") from None
    if address.startswith(("http://", "https://")):
        raise ValueError(f"--address={address!r} is a dashboard/job-server URL; the driver needs the GCS address "
                         f"(host:6379 by default): use that, or submit with `ray job submit --address {address}`")
    host, port = parse_host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise RuntimeError(f"--address={address} does not answer: TCP connect to {host}:{port} failed within "
                           f"{timeout_s:g} s ({type(exc).__name__}: {exc}); check that the head runs "
                           f"(`ray status --address {host}:{port}`), the port (the GCS listens on 6379 by default) "
                           f"and the firewall/security group, or leave --address out for a local Ray") from None


# ---------------------------------------------------------------------------------------------
# Storage every node sees
# ---------------------------------------------------------------------------------------------
def storage_uri(storage: str) -> str:
    """A URI (s3://, gs://, ...) as given; a local path made absolute, as the driver sees it."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", storage):
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


def read_marker(uri: str, marker: str, token: str) -> str:
    """On a node: "" when `marker` under `uri` holds `token`, else what went wrong."""
    import pyarrow.fs

    try:
        fs, _ = pyarrow.fs.FileSystem.from_uri(uri)
        with fs.open_input_stream(marker) as f:
            found = f.read().decode()
    except Exception as exc:  # any failure to read is the answer we report
        return f"cannot read {marker}: {type(exc).__name__}: {exc}"
    return "" if found == token else f"{marker} holds other content ({found[:40]!r})"


def check_storage_visible(storage: str, timeout_s: float = 30) -> None:
    """Write a marker into `storage` here, then read it on every live node.

    A node that cannot read it (or does not answer in `timeout_s`) is named with the fix: on more
    than one machine the storage must be an S3/GCS URI or an NFS path mounted on every node. The
    marker is removed afterwards."""
    import pyarrow.fs

    uri = storage_uri(storage)
    token = uuid.uuid4().hex
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    marker = f"{root.rstrip('/')}/.adrec-preflight-{token}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(marker) as out:
            out.write(token.encode())
    except OSError as exc:
        raise RuntimeError(f"--storage={storage}: the driver cannot write {marker} ({exc}); give a writable "
                           f"location ({SHARED_STORAGE_FIX})") from None

    try:
        results = on_every_node(read_marker, uri, marker, token, timeout_s=timeout_s)
    finally:
        try:
            fs.delete_file(marker)
        except OSError:
            logger.warning("could not remove the preflight marker %s", marker)
    problems = [f"{node_label(node)}: {value}" for node, answered, value in results if not answered or value]
    if problems:
        raise RuntimeError(f"--storage={storage} is not visible on every node ({len(problems)} of {len(results)} "
                           f"cannot read the driver's marker): " + "; ".join(problems) + f". Trials on those "
                           f"nodes would write where the driver never looks: {SHARED_STORAGE_FIX}")


# ---------------------------------------------------------------------------------------------
# Same code and versions everywhere
# ---------------------------------------------------------------------------------------------
def code_versions(packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, str]:
    """Python, Ray, the installed project version and a sha256 over the packages' *.py sources (as
    this process would import them; nothing is imported)."""
    import ray

    out = {"python": platform.python_version(), "ray": ray.__version__}
    try:
        out[DISTRIBUTION] = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        out[DISTRIBUTION] = "not installed"
    digest = hashlib.sha256()
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            out["code"] = f"package {name!r} not importable"
            return out
        root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes())
    out["code"] = digest.hexdigest()[:16]
    return out


def check_node_versions(timeout_s: float = 60) -> None:
    """Every live node imports the same `adrec`/`sweeps` source and runs the same Python, Ray and
    project version as the driver; a mismatch names the node and the differing values."""
    driver = code_versions()

    problems = []
    for node, answered, value in on_every_node(code_versions, CODE_PACKAGES, timeout_s=timeout_s):
        if not answered:
            problems.append(f"{node_label(node)}: {value}")
            continue
        diffs = [f"{key} {value.get(key)} != driver {driver[key]}" for key in driver if value.get(key) != driver[key]]
        if diffs:
            problems.append(f"{node_label(node)}: " + ", ".join(diffs))
    if problems:
        raise RuntimeError("nodes differ from the driver (code = sha256 of the adrec and sweeps sources): "
                           + "; ".join(problems) + f". {SYNC_FIX}")


# ---------------------------------------------------------------------------------------------
# A trial's resource request fits some node
# ---------------------------------------------------------------------------------------------
def autoscaler_config_path() -> Path | None:
    """The autoscaling YAML of the connected cluster's monitor, when it runs on this machine (the
    head: `ray job submit` drivers run there), else `~/ray_bootstrap_config.yaml` if present."""
    import psutil
    import ray

    gcs = ray.get_runtime_context().gcs_address
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(part.endswith("monitor.py") for part in cmd) and f"--gcs-address={gcs}" in cmd:
            for part in cmd:
                if part.startswith("--autoscaling-config="):
                    return Path(part.split("=", 1)[1]).expanduser()
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
    return bootstrap if bootstrap.is_file() else None


def node_shapes(autoscaler_config: str | Path | None = None) -> list[tuple[str, float, float]]:
    """(what, CPU, GPU) of every live node and of every worker type the autoscaler may add."""
    import yaml

    shapes = [(node_label(n), n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in live_nodes()]
    path = Path(autoscaler_config) if autoscaler_config else autoscaler_config_path()
    if path and path.is_file():
        config = yaml.safe_load(path.read_text()) or {}
        head = config.get("head_node_type")
        for name, node_type in (config.get("available_node_types") or {}).items():
            if name != head and node_type.get("max_workers", 1) > 0:
                res = node_type.get("resources") or {}
                shapes.append((f"node type {name} (autoscaler)", float(res.get("CPU", 0)), float(res.get("GPU", 0))))
    return shapes


def resource_request_error(gpus_per_trial: float, cpus_per_trial: float) -> str | None:
    """Why Ray cannot place trials asking for these resources (None if it can); needs no cluster."""
    if gpus_per_trial < 0 or cpus_per_trial < 0:
        return (f"--gpus-per-trial={gpus_per_trial:g}, --cpus-per-trial={cpus_per_trial:g}: resources cannot be "
                f"negative; use e.g. --gpus-per-trial 0.5 --cpus-per-trial 1")
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        return (f"--gpus-per-trial={gpus_per_trial:g}: Ray accepts a fraction up to 1 or a whole number of GPUs; "
                f"use e.g. 0.5 (two trials per GPU), 1 or 2")
    if gpus_per_trial == 0 and cpus_per_trial == 0:
        return ("--gpus-per-trial=0 and --cpus-per-trial=0: a trial asking for nothing is placed anywhere "
                "(the head included) without limit; ask for at least one CPU or a GPU fraction")
    return None


def check_gpu_request(gpus_per_trial: float, cpus_per_trial: float,
                      autoscaler_config: str | Path | None = None) -> None:
    """Some live node, or some node type the autoscaler can add, offers `gpus_per_trial` GPUs and
    `cpus_per_trial` CPUs at once; otherwise every trial would stay pending forever."""
    error = resource_request_error(gpus_per_trial, cpus_per_trial)
    if error:
        raise ValueError(error)
    shapes = node_shapes(autoscaler_config)
    if any(gpu >= gpus_per_trial and cpu >= cpus_per_trial for _, cpu, gpu in shapes):
        return
    listed = "; ".join(f"{what}: {cpu:g} CPU, {gpu:g} GPU" for what, cpu, gpu in shapes) or "no nodes"
    max_gpu = max((gpu for _, _, gpu in shapes), default=0)
    max_cpu = max((cpu for _, cpu, gpu in shapes if gpu >= min(gpus_per_trial, max_gpu)), default=0)
    raise RuntimeError(f"a trial asks for {gpus_per_trial:g} GPU and {cpus_per_trial:g} CPU on one node, but no "
                       f"live node or autoscaler node type offers that ({listed}); trials would stay pending "
                       f"forever: lower --gpus-per-trial to at most {max_gpu:g} and --cpus-per-trial to at most "
                       f"{max_cpu:g}, or add a node type with that many GPUs and CPUs to cluster/gpu.yaml")


def run_preflight(storage: str, gpus_per_trial: float, cpus_per_trial: float, timeout_s: float = 30) -> None:
    """The checks after ray.init, cheapest first (the driver calls check_address before ray.init)."""
    check_gpu_request(gpus_per_trial, cpus_per_trial)
    check_node_versions(timeout_s=max(timeout_s, 60))
    check_storage_visible(storage, timeout_s=timeout_s)
