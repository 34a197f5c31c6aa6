"""Where a sweep folder lives, who may drive it, and which storage failures stop it.

A sweep folder is either a local (or NFS) folder, or a folder on any filesystem pyarrow opens from a
URI (`s3://bucket/prefix`, `gs://...`): Ray Tune writes the experiments there itself, and the
driver keeps its own small files (settings, job lists, the Optuna journal, the table) in a local
working copy that it uploads after every write and downloads when a sweep resumes, so a new head
node (or another machine) finishes a sweep from the bucket alone.

Nothing here stores an absolute path in an object that Ray pickles: searchers and callbacks ask
`current()` for the live sweep folder, so a folder that was copied or moved resumes where it lies.

One driver per sweep folder: `DriverLock` holds an flock on `driver.lock` (released by the
kernel when the holder dies, so a stale lock is taken over without a race) and writes the holder's
host and pid into it for the refusal message. On a URI the lock object carries a heartbeat.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("sweeps.storage")

LOCK_FILE = "driver.lock"
# Exit codes of `python sweeps/run.py` (3 and 130 print the --resume command).
EXIT_BAD_INPUT, EXIT_STORAGE, EXIT_INTERRUPTED = 2, 3, 130
# errno values that mean "the storage cannot take writes now": full, read-only, over quota, gone.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.ENOTCONN,
                  errno.ENODEV, errno.ENXIO, errno.EACCES, errno.EPERM}
HEARTBEAT_S = 30  # a remote lock is refreshed this often ...
STALE_AFTER_S = 180  # ... and counts as abandoned when not refreshed for this long
# Experiment files the driver reads back from a URI (no model state: checkpoints stay on the bucket).
_EXPERIMENT_FILES = re.compile(r"(^|/)(experiment_state-[^/]*\.json|basic-variant-state-[^/]*\.json|tuner\.pkl|"
                               r"result\.json|progress\.csv|params\.json|params\.pkl|error\.txt|"
                               r"events\.out\.tfevents[^/]*|checkpoint_[^/]*/(fit_result|pack_results|report)\.json)$")


class StorageError(RuntimeError):
    """The sweep folder stopped taking writes (full, read-only, vanished); the sweep stops resumably."""


class SweepLocked(RuntimeError):
    """Another live driver holds the sweep folder."""


def resume_command(name: str, storage: str) -> str:
    import shlex

    return f"python sweeps/run.py --resume --name {shlex.quote(name)} --storage {shlex.quote(storage)}"


def is_uri(storage: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", storage))


_STORAGE_TEXT = re.compile(r"No space left on device|Read-only file system|Disk quota exceeded|Stale file handle")


def storage_failure(exc: BaseException | None) -> str | None:
    """One line naming the storage failure when `exc` is one (else None). Follows causes, and Ray's
    task errors (which carry the trial's exception as `cause` or only as text)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageError):
            return str(exc)
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{os.strerror(exc.errno)}{where}"
        if isinstance(exc, FileNotFoundError) and exc.filename and not Path(exc.filename).parent.exists():
            return f"the folder of {exc.filename} is gone (a removed or unmounted storage?)"
        found = _STORAGE_TEXT.search(str(exc))
        if found and type(exc).__module__.startswith(("ray", "pyarrow")):
            return found.group(0)
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


# --------------------------------------------------------------------------------------------------
# The sweep folder
# --------------------------------------------------------------------------------------------------
@dataclass
class SweepStore:
    """A sweep folder: `local` is where the driver reads and writes its own files; `uri` (None for a
    local folder) is the remote folder they are uploaded to and where Ray Tune writes the experiments."""

    local: Path
    uri: str | None = None
    failed: str | None = None  # set by a callback that met a storage failure; the driver stops
    _fs: Any = field(default=None, repr=False)
    _root: str = field(default="", repr=False)

    @classmethod
    def open(cls, storage: str, name: str, cache: str | os.PathLike | None = None) -> "SweepStore":
        if not is_uri(storage):
            return cls(Path(storage).expanduser().resolve() / name)
        uri = f"{storage.rstrip('/')}/{name}"
        digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
        base = Path(cache) if cache else Path(tempfile.gettempdir()) / "adrec-sweeps"
        return cls(base / f"{name}-{digest}", uri)

    @property
    def experiments(self) -> str:
        """What Ray Tune's storage_path and Tuner.restore get: the URI, or the local folder."""
        return self.uri or str(self.local)

    def ray_filesystem(self) -> Any:
        """Ray Tune's storage_filesystem: None for a URI (pyarrow's own, whose PUTs are atomic), the
        atomic local filesystem for a folder."""
        return None if self.uri else atomic_local_filesystem()

    def describe(self) -> str:
        return self.uri or str(self.local)

    def path(self, name: str) -> Path:
        return self.local / name

    def stage1_cache(self) -> str:
        """Local folders share the cache in the sweep folder (one writer per key, file lock); on a
        URI each node keeps its own cache on its local disk (stage 1 is recomputed once per node)."""
        if not self.uri:
            return str(self.local / "stage1_cache")
        return str(Path(tempfile.gettempdir()) / "adrec-stage1" / self.local.name)

    # --- remote side ------------------------------------------------------------------------------
    def fs(self) -> tuple[Any, str]:
        if self._fs is None:
            import pyarrow.fs

            self._fs, self._root = pyarrow.fs.FileSystem.from_uri(self.uri)
            self._root = self._root.rstrip("/")
        return self._fs, self._root

    def check_writable(self) -> None:
        """Create the folder(s) and write a probe; StorageError naming the cause otherwise."""
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            probe = self.local / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"{self.local} is not writable ({exc.strerror or exc})") from None
        if self.uri:
            fs, root = self.fs()
            probe = f"{root}/.write-probe-{socket.gethostname()}-{os.getpid()}"
            try:
                fs.create_dir(root, recursive=True)
                with fs.open_output_stream(probe) as out:
                    out.write(b"ok")
                fs.delete_file(probe)
            except Exception as exc:  # pyarrow raises OSError/ArrowException subclasses
                raise StorageError(f"{self.uri} is not writable ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:300]})") from None

    def push(self, *names: str) -> None:
        """Upload the named local files (no-op for a local folder). One PUT per file: an object is
        replaced whole or not at all, so a reader never sees half a file."""
        if not self.uri:
            return
        fs, root = self.fs()
        for name in names:
            src = self.local / name
            if not src.exists():
                continue
            try:
                with fs.open_output_stream(f"{root}/{name}") as out:
                    out.write(src.read_bytes())
            except Exception as exc:
                raise StorageError(f"cannot upload {name} to {self.uri} ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:300]})") from exc

    def pull(self) -> list[str]:
        """Download the driver's files (top level of the remote folder) into the local copy; the
        remote copy wins. Returns the names downloaded."""
        if not self.uri:
            return []
        import pyarrow.fs

        fs, root = self.fs()
        self.local.mkdir(parents=True, exist_ok=True)
        got = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
            name = info.path[len(root) + 1:]
            if info.type != pyarrow.fs.FileType.File or name == LOCK_FILE or name.startswith("."):
                continue
            with fs.open_input_stream(info.path) as src:
                _write_local(self.local / name, src.read())
            got.append(name)
        return got

    def fetch_experiments(self, phases: Iterable[str]) -> None:
        """Copy the experiments' metadata (state, results, errors, TensorBoard events, fit records;
        no model state) from the URI into the local copy, for reading trials back."""
        if not self.uri:
            return
        import pyarrow.fs

        fs, root = self.fs()
        for phase in phases:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{phase}", recursive=True,
                                                             allow_not_found=True))
            for info in infos:
                rel = info.path[len(root) + 1:]
                if info.type != pyarrow.fs.FileType.File or not _EXPERIMENT_FILES.search(rel):
                    continue
                dest = self.local / rel
                if dest.exists() and dest.stat().st_size == info.size and not rel.endswith(".json"):
                    continue  # event files and results only grow; json state is rewritten
                with fs.open_input_stream(info.path) as src:
                    _write_local(dest, src.read())

    def remote_exists(self, name: str) -> bool:
        if not self.uri:
            return self.path(name).exists()
        import pyarrow.fs

        fs, root = self.fs()
        return fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound

    def has_experiment(self, phase: str) -> bool:
        """An experiment state Ray saved for this phase (local folder or URI)."""
        if not self.uri:
            return any((self.local / phase).glob("experiment_state-*.json"))
        import pyarrow.fs

        fs, root = self.fs()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{phase}", allow_not_found=True))
        return any(Path(i.path).name.startswith("experiment_state-") for i in infos)


def _write_local(path: Path, data: bytes) -> None:
    from adrec.record import write_atomic  # lazily: `run.py --help` imports this module, not pandas

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


# --- local experiments: every file Ray writes appears whole or not at all ------------------------
class _AtomicFile:
    """A file written under a temp name and renamed into place (after fsync) only when every write
    succeeded: a full disk leaves the previous version, never a truncated one."""

    def __init__(self, path: str, on_commit: Any = None) -> None:
        self.path = path
        self.on_commit = on_commit  # called with the path once the file is in place
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)  # as pyarrow's LocalFileSystem does
        self.tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        self._f = open(self.tmp, "wb")
        self._failed = False
        self.closed = False

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except BaseException:
            self._failed = True
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if not self._failed:
                self._f.flush()
                os.fsync(self._f.fileno())
        except BaseException:
            self._failed = True
            raise
        finally:
            self._f.close()
            if self._failed:
                Path(self.tmp).unlink(missing_ok=True)
            else:
                os.replace(self.tmp, self.path)
                if self.on_commit is not None:
                    self.on_commit(self.path)

    def __del__(self) -> None:  # a writer that gave up without closing (pyarrow after an error)
        if not getattr(self, "closed", True):
            self._failed = True
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass

    # what pyarrow's PythonFile asks of a writable handle
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._f.tell()


# --- checkpoints Ray deletes: kept while the experiment state on storage still names them --------
# Ray deletes a trial's older checkpoint the moment it registers a newer one (num_to_keep=1), but
# the experiment state on storage names the older one until its next upload: a driver killed in
# between leaves a state whose checkpoint is gone, and `--resume` fails that trial ("Could not
# recover from checkpoint as it does not exist on storage anymore"). So a checkpoint folder Ray
# deletes is only put aside, and removed once an uploaded experiment state no longer names it (the
# state holds each trial's checkpoint path inside hex-encoded pickles). One list per driver process.
CHECKPOINT_DIR = re.compile(r"checkpoint_\d{6}$")
EXPERIMENT_STATE = re.compile(r"experiment_state-.*\.json$")
_put_aside: set[str] = set()
_put_aside_lock = threading.Lock()


def _named_in(state: str, checkpoint: str) -> bool:
    """Whether an experiment state's text names `checkpoint` (as `<trial dir>/checkpoint_NNNNNN`,
    plain or hex-encoded)."""
    name = "/".join(Path(checkpoint).parts[-2:])
    return name in state or name.encode().hex() in state


def _release_checkpoints(state_path: str) -> None:
    """Delete the put-aside checkpoints the just-written experiment state no longer names."""
    with _put_aside_lock:
        if not _put_aside:
            return
    try:
        state = Path(state_path).read_text(errors="replace")
    except OSError as exc:  # keep them: the next state upload tries again
        log.warning("could not read back %s (%s); older checkpoints kept for now", state_path, exc)
        return
    with _put_aside_lock:
        done = {c for c in _put_aside if not _named_in(state, c)}
        _put_aside.difference_update(done)
    for checkpoint in done:
        shutil.rmtree(checkpoint, ignore_errors=True)


def _atomic_handler_class() -> type:
    import pyarrow
    import pyarrow.fs

    class AtomicLocalHandler(pyarrow.fs.FileSystemHandler):
        """pyarrow's LocalFileSystem, except that output files are written atomically."""

        def __init__(self) -> None:
            self.fs = pyarrow.fs.LocalFileSystem()

        def __reduce__(self) -> tuple:  # travels to trial workers inside Ray's storage context
            return (_new_atomic_handler, ())

        def __eq__(self, other: object) -> bool:
            return type(other).__name__ == "AtomicLocalHandler"

        def __ne__(self, other: object) -> bool:
            return not self == other

        def get_type_name(self) -> str:
            return "adrec-atomic-local"

        def normalize_path(self, path: str) -> str:
            return self.fs.normalize_path(path)

        def get_file_info(self, paths: list) -> list:
            return self.fs.get_file_info(paths)

        def get_file_info_selector(self, selector: Any) -> list:
            return self.fs.get_file_info(selector)

        def create_dir(self, path: str, recursive: bool) -> None:
            self.fs.create_dir(path, recursive=recursive)

        def delete_dir(self, path: str) -> None:
            if CHECKPOINT_DIR.search(path.rstrip("/")):
                with _put_aside_lock:
                    _put_aside.add(path.rstrip("/"))
                return
            self.fs.delete_dir(path)

        def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
            self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self) -> None:
            raise OSError("refusing to delete the contents of /")

        def delete_file(self, path: str) -> None:
            self.fs.delete_file(path)

        def move(self, src: str, dest: str) -> None:
            self.fs.move(src, dest)

        def copy_file(self, src: str, dest: str) -> None:
            with self.fs.open_input_stream(src) as source:
                out = _AtomicFile(dest)
                try:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                except BaseException:
                    out._failed = True
                    out.close()
                    raise
                out.close()

        def open_input_stream(self, path: str) -> Any:
            return self.fs.open_input_stream(path)

        def open_input_file(self, path: str) -> Any:
            return self.fs.open_input_file(path)

        def open_output_stream(self, path: str, metadata: Any = None) -> Any:
            on_commit = _release_checkpoints if EXPERIMENT_STATE.search(path) else None
            return pyarrow.PythonFile(_AtomicFile(path, on_commit), mode="w")

        def open_append_stream(self, path: str, metadata: Any = None) -> Any:
            return self.fs.open_append_stream(path)

    return AtomicLocalHandler


def remove_temp_files(folder: Path) -> int:
    """Remove the `.<name>.<pid>.tmp` files killed or failed writers left under `folder` (never read;
    call it only while holding the sweep's lock). Returns how many."""
    count = 0
    for tmp in folder.rglob(".*.tmp"):
        try:
            tmp.unlink()
            count += 1
        except OSError:
            pass
    return count


def _new_atomic_handler() -> Any:
    return _atomic_handler_class()()


def atomic_local_filesystem() -> Any:
    """A pyarrow filesystem for Ray Tune's `storage_filesystem` on a local/NFS sweep folder: Ray writes
    its experiment state with a plain open("w") and copies it into the storage, so a full disk left
    a truncated experiment_state-*.json that no restore could read; through this filesystem each
    file Ray writes appears complete or not at all."""
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(_new_atomic_handler())


# --- the live sweep folder of this driver process (searchers and callbacks ask for it) ----------
_CURRENT: SweepStore | None = None


def activate(store: SweepStore) -> None:
    global _CURRENT
    _CURRENT = store


def current() -> SweepStore:
    if _CURRENT is None:
        raise RuntimeError("no sweep folder is active in this process (sweeps.storage.activate was not called)")
    return _CURRENT


# --------------------------------------------------------------------------------------------------
# One driver per sweep folder
# --------------------------------------------------------------------------------------------------
def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def describe_holder(info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} (since {since})"


class DriverLock:
    """Held for the driver's whole run; see the module docstring."""

    def __init__(self, store: SweepStore) -> None:
        self.store = store
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder whose lock we took
        self._started = time.time()

    def acquire(self) -> None:
        path = self.store.path(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                holder = _read_fd(fd)
                os.close(fd)
                raise SweepLocked(self._refusal(holder)) from None
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            # A filesystem without POSIX locks: judge the holder by its pid (this host only).
            holder = _read_fd(fd)
            if holder and holder.get("pid") != os.getpid() and not self._stale(holder):
                os.close(fd)
                raise SweepLocked(self._refusal(holder)) from None
        previous = _read_fd(fd)
        if previous and previous.get("pid") and (previous.get("host"), previous.get("pid")) != (
                socket.gethostname(), os.getpid()):
            self.took_over = previous
        self._fd = fd
        self._started = time.time()
        _rewrite(fd, json.dumps({**_holder(), "started": self._started}).encode())
        if self.store.uri:
            self._acquire_remote()

    def _refusal(self, holder: dict[str, Any] | None) -> str:
        who = describe_holder(holder) if holder else "another process"
        return (f"sweep folder {self.store.describe()} is in use by the driver {who}; wait for it to finish, or "
                f"stop that driver and resume with --resume (one driver per sweep folder)")

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid") or 0))
        return time.time() - float(holder.get("heartbeat") or 0) > STALE_AFTER_S

    # --- the lock object on a URI (another head may drive the same bucket folder) ---------------
    def _acquire_remote(self) -> None:
        fs, root = self.store.fs()
        key = f"{root}/{LOCK_FILE}"
        holder = _read_remote_json(fs, key)
        mine = (socket.gethostname(), os.getpid())
        if holder and (holder.get("host"), holder.get("pid")) != mine:
            if not self._stale(holder):
                self.release()
                raise SweepLocked(self._refusal(holder) + f" (a lock refreshed every {HEARTBEAT_S} s; it counts as "
                                  f"abandoned {STALE_AFTER_S} s after its last refresh)")
            self.took_over = holder
        self._write_remote(fs, key)
        self._thread = threading.Thread(target=self._beat, args=(fs, key), name="sweep-lock-heartbeat", daemon=True)
        self._thread.start()

    def _write_remote(self, fs: Any, key: str) -> None:
        info = {**_holder(), "started": self._started}
        with fs.open_output_stream(key) as out:
            out.write(json.dumps(info).encode())

    def _beat(self, fs: Any, key: str) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write_remote(fs, key)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the sweep reports storage errors
                log.warning("could not refresh the sweep lock %s (%s)", key, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                fs, root = self.store.fs()
                key = f"{root}/{LOCK_FILE}"
                holder = _read_remote_json(fs, key)
                if holder and (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
                    fs.delete_file(key)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not remove the sweep lock on %s (%s)", self.store.uri, exc)
        if self._fd is not None:
            try:
                _rewrite(self._fd, b"")  # never unlink a lock file: a waiter may hold it open
            except OSError:
                pass
            os.close(self._fd)  # closing releases the POSIX lock
            self._fd = None

    def __enter__(self) -> "DriverLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_fd(fd: int) -> dict[str, Any] | None:
    """The lock file's content through our descriptor (opening the file again would drop a POSIX
    lock on filesystems that emulate flock with one, e.g. NFS)."""
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _read_remote_json(fs: Any, key: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(key) as src:
            return json.loads(src.read().decode() or "null")
    except (OSError, ValueError):
        return None
