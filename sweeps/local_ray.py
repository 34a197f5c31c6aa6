"""A private local Ray for a sweep started without --address.

`ray.init()` without an address joins whatever cluster the last `ray start` on the machine left
behind (its address file under /tmp/ray); a sweep without --address must never do that. This starts
a new Ray (`address="local"`) in a temp dir of its own (short, under /tmp: Ray's unix socket paths
must stay under 108 bytes) with no fixed ports a neighbour could hold, and waits out a busy machine:

- worker processes that import torch on a loaded 2-core machine get minutes to register, not 60 s;
- Ray 2.60's raylet waits a fixed 30 s for the dashboard agent to write its port file, and the
  Python side waits a fixed 30 s for the raylet to register; neither is configurable, so a start-up
  that misses them is retried in a fresh temp dir (the second start imports from a warm page cache).

Any failure ends in `LocalRayError`: one line with the cause (read from the raylet's and the
agent's logs) and the fix; the logs of the failed attempt are kept and named.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

# Read by every Ray process we start (RayConfig reads RAY_<name>): generous start-up timeouts, and
# a GCS that waits 30 s (not 10) for a starved raylet's health-check answer before counting a miss
# (a node killed outright still refuses at once and is marked dead as fast as before).
STARTUP_ENV = {
    "RAY_worker_register_timeout_seconds": "600",
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
    "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300",
    "RAY_health_check_timeout_ms": "30000",
}
ATTEMPTS = 3
FIX = ("free memory or CPU (another process may be starving Ray's start-up), remove stale temp space, or join "
       "a running cluster with --address HOST:PORT")


class LocalRayError(RuntimeError):
    """A local Ray that would not start; the message is one line with the cause and the fix."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def short_temp_root() -> str:
    """/tmp where it exists (macOS's TMPDIR is too long for Ray's socket paths)."""
    return "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else tempfile.gettempdir()


def start(*, num_cpus: int | None = None, num_gpus: int | None = None, log_to_driver: bool = False,
          attempts: int = ATTEMPTS) -> str:
    """Start and join a new private Ray; returns its temp dir (remove it with `cleanup` after
    `ray.shutdown()`). Raises LocalRayError after `attempts` failed starts."""
    import ray

    for key, value in STARTUP_ENV.items():
        os.environ.setdefault(key, value)
    cause, temp_dir = "", ""
    for attempt in range(1, attempts + 1):
        temp_dir = tempfile.mkdtemp(prefix="adrec-ray-", dir=short_temp_root())
        kwargs: dict[str, Any] = {"address": "local", "_temp_dir": temp_dir, "include_dashboard": False,
                                  "dashboard_port": free_port(), "_metrics_export_port": free_port(),
                                  "log_to_driver": log_to_driver, "logging_level": logging.WARNING}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        try:
            with _stderr_to(Path(temp_dir) / "driver-startup.err"):  # Ray's C++ client logs each retry
                ray.init(**kwargs)
            return temp_dir
        except Exception as exc:  # noqa: BLE001 - every start-up failure becomes one line
            cause = startup_cause(exc, Path(temp_dir))
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            if not _TRANSIENT.search(cause):  # a port in use, a bad setting: the same again next time
                attempts = attempt
                break
            logging.getLogger("sweeps.local_ray").warning("local Ray start %d of %d failed: %s", attempt,
                                                          attempts, cause)
    tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
    raise LocalRayError(f"could not start a local Ray ({tries}): {cause}; logs of the last attempt in "
                        f"{temp_dir}/session_latest/logs; {FIX}")


def cleanup(temp_dir: str | None) -> None:
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (where Ray's C++ code logs) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def startup_cause(exc: BaseException, temp_dir: Path) -> str:
    """The exception's first sentence, plus what the GCS, the raylet or the dashboard agent logged
    when it died."""
    first = re.split(r"(?<=\.)\s+Last \d+ lines|\n", str(exc).strip() or type(exc).__name__)[0][:200]
    found = log_excerpt(temp_dir / "session_latest" / "logs")
    return f"{type(exc).__name__}: {first}" + (f" ({found})" if found else "")


_TRANSIENT = re.compile(r"timed? ?out|TimeoutError", re.IGNORECASE)
_BOILERPLATE = re.compile(r"An unexpected system state has occurred\..*?(fix it|to fix this)\.?\s*", re.DOTALL)
_FATAL = re.compile(r"(Check failed|Timed out waiting for file|FATAL|Failed to|address already in use|"
                    r"No space left|Permission denied|Too many open files)", re.IGNORECASE)


def log_excerpt(log_dir: Path, files: tuple[str, ...] = ("raylet.out", "raylet.err", "gcs_server.out",
                                                          "dashboard_agent.log")) -> str:
    """The first fatal-looking line of a node's start-up logs, with the file it came from ('' if none)."""
    for name in files:
        path = log_dir / name
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if _FATAL.search(line) and "WARNING" not in line[:60] and " W " not in line[:40]:
                text = _BOILERPLATE.sub("", re.sub(r"^\[[^\]]*\]\s*", "", line.strip()))
                return f"{name}: {text[:300]}"
    return ""
