"""A multi-node Ray cluster on one machine: a head and worker raylets started with `ray start --block`.

Each node is its own process group with the cluster's own temp dir (RAY_TMPDIR), so
`ray.init()` elsewhere on the machine never finds it, and `stop()` / `kill()` end exactly the
processes this object started (never `ray stop`, which ends every Ray on the machine). Every node
gets the same RAY_AUTH_MODE (and token file in token mode). Used by tests/test_cluster_*.py; also a
way to try the sweep on several declared-GPU nodes without a cloud:

    cluster = LocalCluster()
    cluster.start_head()                       # CPU 0: like cluster/gpu.yaml's head
    cluster.add_worker(num_cpus=1, num_gpus=1)
    subprocess.run([..., "sweeps/run.py", "--address", cluster.address], env=cluster.env)
    cluster.stop()
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RAY_CLI = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """The address Ray advertises for this machine (its interface IP, not 127.0.0.1)."""
    import ray._private.services

    return ray._private.services.get_node_ip_address()


class NodeStartError(RuntimeError):
    """A node that died (or never listened) at start-up; the message carries its own log excerpt."""


def wait_for_port(host: str, port: int, timeout_s: float, what: str, log: Path | None = None,
                  node: "Node | None" = None) -> None:
    """Block until host:port accepts TCP connections. A node whose `ray start` exits first, or that
    does not listen within `timeout_s`, raises NodeStartError with what its raylet/GCS logged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if node is not None and not node.alive:
                raise NodeStartError(f"{what} died at start-up (exit {node.process.returncode}): "
                                     f"{node_failure(node)}") from None
            time.sleep(0.3)
    detail = node_failure(node) if node is not None else (log.read_text()[-2000:] if log and log.exists() else "")
    raise NodeStartError(f"{what} did not listen on {host}:{port} within {timeout_s:g} s: {detail}")


def node_failure(node: "Node") -> str:
    """What a node's own logs say about its death: the first fatal line of its raylet/GCS/agent
    logs (its session folder under the node's temp dir), else the tail of `ray start`'s output."""
    from sweeps.local_ray import log_excerpt

    sessions = sorted(node.temp_dir.glob("session_*/logs"), key=lambda p: p.stat().st_mtime) if node.temp_dir else []
    found = log_excerpt(sessions[-1]) if sessions else ""
    where = f"; logs kept in {sessions[-1] if sessions else node.log}"
    if found:
        return found + where
    tail = node.log.read_text(errors="replace").strip().splitlines()[-5:] if node.log.exists() else []
    return (" | ".join(tail) or "no output") + where


@dataclass
class Node:
    """One `ray start --block` process group."""

    name: str
    process: subprocess.Popen
    node_manager_port: int
    log: Path
    temp_dir: Path | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """Head + workers on this machine; see the module docstring."""

    def __init__(self, root: str | Path | None = None, *, auth_mode: str | None = None,
                 token_path: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        # A short root: Ray's unix socket paths (root/<node>/session_.../sockets/...) must stay < 108 bytes.
        self._own_root = root is None  # a temp dir we made goes away in stop()
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.auth_mode = auth_mode or os.environ.get("RAY_AUTH_MODE") or "disabled"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env.update(RAY_TMPDIR=str(self.root), RAY_AUTH_MODE=self.auth_mode, **(env or {}))
        from sweeps.local_ray import STARTUP_ENV  # generous start-up timeouts for a busy machine

        for key, value in STARTUP_ENV.items():
            self.env.setdefault(key, value)
        # `python` in a job's entrypoint is this interpreter (on a cloud node: the venv of gpu.yaml).
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        if token_path:
            self.env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        self.nodes: list[Node] = []
        self.failed: list[Node] = []  # nodes that died at start-up (their logs are kept)
        self.keep_logs = False  # set when a node failed: stop() leaves the temp dir for reading
        self.ip = node_ip()
        self.address: str | None = None
        self.dashboard_url: str | None = None

    # ----------------------------------------------------------------------------------- start
    def _spawn(self, name: str, args: list[str], node_manager_port: int, wrap: list[str] | None = None,
               env: dict[str, str] | None = None, own_temp_dir: bool = True) -> Node:
        log = self.root / f"{name}.log"
        args = args + [f"--node-manager-port={node_manager_port}"]
        # A temp dir per node, as on separate machines: nodes that share one would share
        # runtime_resources/, and one node's cleanup of a job's working_dir removes it under the others.
        temp_dir = self.root / name if own_temp_dir else self.root / "ray"
        if own_temp_dir:
            args = args + [f"--temp-dir={temp_dir}"]
        # Ports other Rays on this machine may hold by default (agents 52365, metrics, client 10001).
        args = args + [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                       f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        process = subprocess.Popen((wrap or []) + [RAY_CLI, "start", *args, "--block", "--disable-usage-stats"],
                                   env={**self.env, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        node = Node(name, process, node_manager_port, log, temp_dir)
        self.nodes.append(node)
        return node

    def start_head(self, *, num_cpus: int = 0, num_gpus: int = 0, dashboard: bool = False,
                   autoscaling_config: str | Path | None = None, timeout_s: float = 90,
                   discoverable: bool = False) -> str:
        """Start the head (CPU 0 by default: it runs no trials); returns the GCS address `ip:port`.
        `autoscaling_config`: a fake_multinode YAML (tests/fake_cluster/autoscaler.yaml); its
        provider.gcs_address is set to this head, and RAY_FAKE_CLUSTER=1 is set for the autoscaler.
        `discoverable`: the head keeps Ray's default temp dir under RAY_TMPDIR, so it leaves the
        address file `ray.init()` / `--address auto` look for, as a plain `ray start --head` does."""
        if self.address:
            raise RuntimeError(f"this LocalCluster already has a head at {self.address}")
        port, nm_port = free_port(), free_port()
        args = ["--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                f"--include-dashboard={str(dashboard).lower()}"]
        env = {}
        # The dashboard process runs even with --include-dashboard=false: never leave it on 8265.
        dash = free_port()
        args += [f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}"]
        if dashboard:
            self.dashboard_url = f"http://127.0.0.1:{dash}"
        if autoscaling_config:
            config = yaml.safe_load(Path(autoscaling_config).read_text())
            config["provider"]["gcs_address"] = f"{self.ip}:{port}"
            path = self.root / "autoscaler.yaml"
            path.write_text(yaml.safe_dump(config))
            args.append(f"--autoscaling-config={path}")
            env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        head = self._spawn("head", args, nm_port, env=env, own_temp_dir=not discoverable)
        try:
            wait_for_port(self.ip, port, timeout_s, "the Ray head's GCS", head.log, head)
            wait_for_port(self.ip, nm_port, timeout_s, "the Ray head's raylet", head.log, head)
            if dashboard:
                wait_for_port("127.0.0.1", dash, timeout_s, "the Ray dashboard", head.log, head)
        except NodeStartError:
            self.keep_logs = True
            raise
        self.address = f"{self.ip}:{port}"
        return self.address

    def add_worker(self, *, num_cpus: int = 1, num_gpus: int = 0, wrap: list[str] | None = None,
                   env: dict[str, str] | None = None, timeout_s: float = 90, attempts: int = 2,
                   node_manager_port: int | None = None) -> Node:
        """A worker raylet joined to the head. `wrap` prefixes the command (e.g. `unshare -m ...`);
        `env` adds variables for this node only (its raylet and its worker processes).

        On a busy machine a raylet can abort at start-up (Ray 2.60 waits a fixed 30 s for its
        dashboard agent); such a start is retried as a new node, `attempts` times in all. A node
        that died raises NodeStartError with its own log excerpt; its logs stay (see `stop`)."""
        if not self.address:
            raise RuntimeError("start_head() first: a worker needs the head's address")
        for attempt in range(1, attempts + 1):
            nm_port = node_manager_port or free_port()
            args = [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
            node = self._spawn(f"worker{len(self.nodes)}", args, nm_port, wrap=wrap, env=env)
            try:
                wait_for_port(self.ip, nm_port, timeout_s, f"worker {node.name}'s raylet", node.log, node)
                return node
            except NodeStartError:
                self.keep_logs = True
                self._end(node)
                if attempt == attempts or not _transient(node):
                    raise
        raise AssertionError("unreachable")

    def _end(self, node: Node) -> None:
        """Kill a node that failed at start-up and drop it from the cluster's node list."""
        _kill_all(self.processes(node))
        if node.process.poll() is None:
            node.process.wait(timeout=30)
        self.nodes.remove(node)
        self.failed.append(node)

    # ----------------------------------------------------------------------------------- query
    def run_driver(self, code: str, timeout_s: float = 120) -> Any:
        """Run `code` in a fresh driver connected to this cluster; it must print one JSON line last."""
        prelude = f"import json, ray\nray.init(address={self.address!r}, log_to_driver=False)\n"
        out = subprocess.run([sys.executable, "-c", prelude + code], env=self.env, capture_output=True,
                             text=True, timeout=timeout_s)
        lines = out.stdout.strip().splitlines()
        try:
            if out.returncode == 0 and lines:
                return json.loads(lines[-1])
        except ValueError:
            pass
        dead = self.dead_nodes()
        raise RuntimeError(f"driver on {self.address} failed (exit {out.returncode}, last line "
                           f"{(lines or ['(none)'])[-1][:200]!r})" + (f"; dead nodes: {dead}" if dead else "")
                           + f"\n{out.stderr[-3000:]}")

    def dead_nodes(self) -> str:
        """`name: what its logs say; ...` for each node of this cluster that died ("" when none)."""
        return "; ".join(f"{n.name}: {node_failure(n)}" for n in self.nodes if not n.alive)

    def live_nodes(self) -> list[dict[str, Any]]:
        """`ray.nodes()` of the live nodes, each with NodeID, NodeManagerPort and Resources."""
        return self.run_driver("print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))")

    def node_ids(self, live: list[dict[str, Any]] | None = None) -> dict[str, str]:
        """Our node name (head, worker1, ...) -> Ray node id, for the live nodes (`live`: a
        `live_nodes()`/`wait_for_nodes()` answer already at hand)."""
        by_port = {n.node_manager_port: n.name for n in self.nodes}
        return {by_port[n["NodeManagerPort"]]: n["NodeID"] for n in (live if live is not None else self.live_nodes())
                if n["NodeManagerPort"] in by_port}

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Block until `count` nodes are alive (one driver connection)."""
        code = (f"import time\nend = time.time() + {timeout_s}\n"
                f"while time.time() < end and sum(n['Alive'] for n in ray.nodes()) < {count}: time.sleep(0.5)\n"
                "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))")
        nodes = self.run_driver(code, timeout_s=timeout_s + 60)
        if len(nodes) < count:
            raise TimeoutError(f"{len(nodes)} of {count} nodes alive after {timeout_s:g} s; logs in {self.root}")
        return nodes

    # ----------------------------------------------------------------------------------- stop
    def processes(self, node: Node) -> list:
        """The node's live processes: `ray start`, its raylet and helpers, and the worker processes
        (Ray starts those in sessions of their own, so they are outside the node's process group)."""
        import psutil

        try:
            root = psutil.Process(node.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """End one node (SIGKILL: a real raylet crash with its trial processes, as a lost cloud node)."""
        if sig == signal.SIGKILL:
            _kill_all(self.processes(node))
        elif node.alive:
            os.killpg(node.process.pid, sig)
        node.process.wait(timeout=30)

    def stop(self, grace_s: float = 2) -> None:
        """End every process this cluster started (workers first, then the head); remove the temp
        dir (node logs included) when this object made it and no node failed (then the logs stay
        and their folder is logged)."""
        procs = [p for node in self.nodes for p in self.processes(node)]
        for node in reversed(self.nodes):
            if node.alive:
                try:
                    os.killpg(node.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for node in reversed(self.nodes):
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _kill_all(procs)  # `ray start --block` may outlive SIGTERM; workers are in other groups
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.wait(timeout=30)
        self._kill_leftovers()
        if self._own_root and not self.keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.keep_logs:
            print(f"cluster.local: a node failed; its logs are kept in {self.root}", file=sys.stderr)

    def _kill_leftovers(self) -> None:
        """Kill processes outside the node groups (e.g. job drivers, which Ray starts in their own
        session) that carry this cluster's RAY_TMPDIR or name its temp dir; never this process or
        its parents."""
        import psutil

        me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        root = str(self.root)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] in me:
                continue
            try:
                ours = (any(root in part for part in proc.info["cmdline"] or [])
                        or proc.environ().get("RAY_TMPDIR") == root)
                if ours:
                    proc.kill()
            except psutil.Error:
                pass

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _transient(node: Node) -> bool:
    """A start-up death a retry may cure (a timeout on a busy machine), not a bad setting."""
    return bool(re.search(r"timed? ?out", node_failure(node), re.IGNORECASE))


def _kill_all(procs: list) -> None:
    """SIGKILL each psutil process, skipping those already gone."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
