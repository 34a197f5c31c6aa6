"""Faults a sweep must survive, each injected for real: a stranger's `ray start` cluster, two drivers on
one folder, Ctrl-C, a folder moved while stopped, a full file system, S3 with the head replaced, a
raylet that dies at start-up, a Ray that cannot start.

Ray: the session's private Ray (conftest.py) for drivers run with `--address`; drivers without
`--address` start their own private Ray. Real filesystems and servers throughout: a few-MB tmpfs
mounted for the full-disk test (skipped where mounting is not permitted), moto's S3 server
(`moto[server]`, a real HTTP endpoint pyarrow and Ray Tune talk to) for S3.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from sweeps.run import BUILTIN_SPACES, main
from sweeps.storage import DriverLock, SweepStore

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(REPO / "sweeps" / "run.py")]
TINY = {"hidden_size": 16, "heads": 2, "cam_blocks": 1, "adm_blocks": 1, "stage1_epochs": 1, "stage2_epochs": 1,
        "stage3_epochs": 3, "eval_every": 1, "batch_size": 64, "diffusion_steps": 24, "max_len": 20}


def write_space(folder: Path, name: str, paired: int = 2, num_samples: int = 0, **fixed) -> str:
    raw = {"description": "reliability tests", "datasets": ["ml-100k"],
           "counts": {"paired_samples": paired, "repeats": 1, "num_samples": num_samples, "confirm_top": 0},
           "baselines": [], "fixed": {**TINY, **fixed},
           "params": {"lambda_uncertainty": {"low": 1e-4, "high": 1.0, "log": True}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def sweep_cmd(space: str, storage: str | Path, *extra: str) -> list[str]:
    return [*RUN, "--space", space, "--storage", str(storage), "--max-users", "100", "--no-report", *extra]


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def progress(sweep_dir: Path) -> dict:
    try:
        return json.loads((sweep_dir / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)


def kill_machine(proc: subprocess.Popen, tmpdir: Path) -> None:
    """SIGKILL a driver's process group and every process it left in sessions of their own (Ray
    starts its workers so): all that run with TMPDIR=tmpdir, as if that machine went away; returns
    once they are gone, so nothing writes under `tmpdir` any more."""
    import psutil

    kill_group(proc)
    left = []
    for candidate in psutil.process_iter():
        try:
            if candidate.environ().get("TMPDIR") == str(tmpdir):
                candidate.kill()
                left.append(candidate)
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=60)


# ------------------------------------------------------------------------------------------------
# No Ray needed
# ------------------------------------------------------------------------------------------------
def test_help_loads_nothing_heavy_and_shows_each_default_once():
    code = ("import sys, json; sys.argv = ['run.py', '--help']\n"
            "import sweeps.run as r\n"
            "try:\n    r.build_parser().parse_args()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in ('torch', 'ray', 'optuna', 'pandas') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    text = re.sub(r"\s+", " ", out.stdout)
    assert "default: None" not in text and "(default: False)" not in text
    for block in re.split(r" (?=--[a-z])", text.split("options:")[1]):
        assert block.count("default") <= 1, block
    assert "(default: val_NDCG@20)" in text and "(default: 0.0)" in text


def test_builtin_space_names_in_help_match_the_spaces():
    from sweeps.spaces import BUILTIN

    assert set(BUILTIN_SPACES) == set(BUILTIN)


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time\nfrom sweeps.storage import DriverLock, SweepStore\n"
            f"lock = DriverLock(SweepStore.open({str(folder.parent)!r}, {folder.name!r})); lock.acquire()\n"
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_driver_is_refused_and_a_dead_drivers_lock_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "runs" / "locked"
    folder.mkdir(parents=True)
    holder = _hold_lock(folder)
    try:
        space = write_space(tmp_path, "locked")
        assert main(["--space", space, "--storage", str(tmp_path / "runs"), "--name", "locked", "--no-report"]) == 2
        captured = capsys.readouterr()
        assert re.search(rf"is in use by the driver pid {holder.pid} on host {re.escape(socket.gethostname())}",
                         captured.err), captured.err
        assert captured.err.count("\n") == 1 and "stopped" not in captured.out + captured.err
        assert not (folder / "sweep.json").exists()  # the refused driver wrote nothing
    finally:
        holder.kill()
        holder.wait(30)
    lock = DriverLock(SweepStore.open(str(tmp_path / "runs"), "locked"))
    lock.acquire()  # the holder died without releasing: its lock is taken over
    try:
        assert lock.took_over and lock.took_over["pid"] == holder.pid
        other = subprocess.run([sys.executable, "-c", "from sweeps.storage import DriverLock, SweepStore\n"
                                f"DriverLock(SweepStore.open({str(tmp_path / 'runs')!r}, 'locked')).acquire()"],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "SweepLocked" in other.stderr and f"pid {os.getpid()} " in other.stderr
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------
# Ray start-up
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.cluster  # its driver starts its own Ray
def test_a_ray_that_cannot_start_is_one_line_and_exit_2(tmp_path):
    """The GCS port is taken (RAY_GCS_SERVER_PORT names a port this test holds): no retry, one line."""
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        env = {**os.environ, "RAY_GCS_SERVER_PORT": str(busy.getsockname()[1])}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run(sweep_cmd("smoke", tmp_path), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=400)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweeps: error: could not start a local Ray (1 attempt)"), lines
    assert "Failed to start GCS" in lines[0] and "logs of the last attempt in" in lines[0]
    logs = re.search(r"logs of the last attempt in (\S+);", lines[0]).group(1)
    assert Path(logs).is_dir()  # kept for reading
    shutil.rmtree(Path(logs).parents[1], ignore_errors=True)


@pytest.mark.slow
@pytest.mark.cluster  # its driver starts its own Ray
def test_without_address_the_sweep_never_joins_a_ray_start_cluster(tmp_path):
    """A `ray start --head` cluster that `ray.init()` would find (its address file under RAY_TMPDIR):
    the sweep without --address runs its trial on a private Ray instead."""
    from cluster.local import LocalCluster

    with LocalCluster(auth_mode="disabled") as stranger:
        stranger.start_head(num_cpus=1, discoverable=True)
        # `ray start` writes its address file once the node is up, after its ports listen
        wait_for(lambda: (stranger.root / "ray" / "ray_current_cluster").exists(), 120, what="the address file")
        find = ("from ray._private.services import canonicalize_bootstrap_address\n"
                "print(canonicalize_bootstrap_address(None))")
        found = subprocess.run([sys.executable, "-c", find], env=stranger.env, capture_output=True, text=True,
                               timeout=60)
        assert found.stdout.strip().splitlines()[-1] == stranger.address  # what ray.init() would join
        stranger_nodes = {n["NodeID"] for n in stranger.live_nodes()}
        count_jobs = "print(json.dumps(len(ray._private.state.state.job_table())))"
        before = stranger.run_driver(count_jobs)
        space = write_space(tmp_path, "private", paired=1, stage3_epochs=1)
        out = subprocess.run(sweep_cmd(space, tmp_path / "runs", "--quiet"), cwd=REPO, env=stranger.env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        df = pd.read_parquet(tmp_path / "runs" / "private" / "trials.parquet")
        assert len(df) == 1 and df["node_id"][0] and df["node_id"][0] not in stranger_nodes
        assert stranger.run_driver(count_jobs) == before + 1  # only this query: the sweep never connected


# ------------------------------------------------------------------------------------------------
# Two drivers, Ctrl-C, a moved folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_drivers_race_then_ctrl_c_then_resume(tmp_path, ray_address):
    space = write_space(tmp_path, "race", paired=3, stage3_epochs=4)
    cmd = sweep_cmd(space, tmp_path, "--address", ray_address, "--max-concurrent", "1")
    sweep = tmp_path / "race"
    a = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    b = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        refused, running = None, None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and refused is None:
            for p, other in ((a, b), (b, a)):
                if p.poll() is not None:
                    refused, running = p, other
            time.sleep(0.2)
        assert refused is not None, "neither driver was refused"
        out, err = refused.communicate()
        assert refused.returncode == 2, out + err
        assert re.search(rf"is in use by the driver pid {running.pid} ", err), err
        assert "stopped" not in out + err
        wait_for(lambda: progress(sweep).get("finished", 0) >= 1, 300, running, "a finished trial")
        running.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = running.communicate(timeout=300)
    finally:
        for p in (a, b):
            kill_group(p)
    assert running.returncode == 130, out[-3000:] + err[-3000:]
    assert f"finish it with: python sweeps/run.py --resume --name race --storage {tmp_path}" in out
    assert "Tuner.restore" not in out + err
    assert re.search(r"started \| running 1 \| elapsed", out) and re.search(r"trials/h", out)

    assert main(["--resume", "--name", "race", "--storage", str(tmp_path), "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(sweep / "trials.parquet")
    assert len(df) == 3 and df["trial_id"].is_unique and sorted(df["config_id"]) == ["p000", "p001", "p002"]
    assert df["error"].isna().all()
    _check_hparams_columns_are_logged(sweep)


def _check_hparams_columns_are_logged(sweep: Path) -> None:
    """TensorBoard's HParams: the swept knobs as hyperparameters, and every declared metric a logged scalar."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    checked = 0
    for trial_dir in sorted(sweep.glob("paired/paired_*")):
        declared, hparams, scalars = set(), {}, set()
        for events in trial_dir.glob("events.out.tfevents.*"):
            acc = event_accumulator.EventAccumulator(str(events))
            acc.Reload()
            scalars |= set(acc.Tags()["scalars"])
            try:
                found = acc.PluginTagToContent("hparams")
            except KeyError:  # an event file of a run that ended before the trial did
                found = {}
            for raw in found.values():
                data = plugin_data_pb2.HParamsPluginData.FromString(raw)
                if data.HasField("experiment"):
                    declared |= {m.name.tag for m in data.experiment.metric_infos}
                if data.HasField("session_start_info"):
                    hparams = dict(data.session_start_info.hparams)
        if not declared:
            continue
        assert "ray/tune/val_NDCG_20" in declared and declared <= scalars, (declared - scalars)
        assert {"lambda_uncertainty", "dataset", "seed", "config_id", "phase"} <= set(hparams)
        assert "data_dir" not in hparams and "eval_batch_size" not in hparams  # not knobs
        assert "hidden_size" not in hparams and "aggregation" not in hparams  # knobs the space does not sweep
        checked += 1
    assert checked >= 1


@pytest.mark.slow
def test_a_moved_sweep_folder_resumes_where_it_lies(tmp_path, ray_address, capsys):
    space = write_space(tmp_path, "moved", paired=1, num_samples=3)
    old = tmp_path / "old"
    proc = subprocess.Popen(sweep_cmd(space, old, "--address", ray_address, "--quiet"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: progress(old / "moved").get("phase") == "optimize"
                 and progress(old / "moved").get("finished", 0) >= 2, 400, proc, "an optimize trial finished")
    finally:
        kill_group(proc)
    new = tmp_path / "elsewhere" / "mount"
    new.mkdir(parents=True)
    shutil.move(str(old / "moved"), str(new / "moved"))
    shutil.rmtree(old)  # nothing may still point there
    # and the copy was taken badly: a truncated table, a writer's leftover temp file
    table = new / "moved" / "trials.parquet"
    table.write_bytes(table.read_bytes()[:100])
    (new / "moved" / ".trials.parquet.12345.tmp").write_bytes(b"PAR1 half")
    assert main(["--resume", "--name", "moved", "--storage", str(new), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"trials\.parquet is not a readable Parquet trial table .*; rebuilding it from the experiment "
                     r"folders", out), out[:2000]
    assert not list((new / "moved").glob(".*.tmp"))
    df = pd.read_parquet(new / "moved" / "trials.parquet")
    assert len(df) == 4 and df["trial_id"].is_unique
    assert df.groupby("phase").size().to_dict() == {"paired": 1, "optimize": 3}
    from sweeps.searchers import journal_storage

    study = optuna.load_study(study_name="moved/ml-100k", storage=journal_storage(str(new / "moved" / "studies.journal")))
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    assert not old.exists()


@pytest.mark.slow
def test_a_trial_that_crashed_then_completed_has_no_error(tmp_path, ray_address, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("ADREC_FAULT_ONCE", str(markers))  # each trial raises once after its first checkpoint
    space = write_space(tmp_path, "recovered", paired=1)
    assert main(["--space", space, "--storage", str(tmp_path), "--max-users", "100", "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(tmp_path / "recovered" / "trials.parquet")
    (trial_dir,) = (tmp_path / "recovered" / "paired").glob("paired_*")
    assert (trial_dir / "error.txt").exists()  # Ray kept the crash's error file
    assert df["status"].tolist() == ["completed"] and df["error"].isna().all()


# ------------------------------------------------------------------------------------------------
# A full file system
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 24 MB tmpfs (a real file system that fills up), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "none", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip()}); needs root or CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Write into `folder` until the file system is full; returns the ballast file."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass
    return ballast


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_resumably(tmp_path, ray_address, small_fs):
    space = write_space(tmp_path, "full", paired=4, stage3_epochs=6)
    sweep = small_fs / "full"
    proc = subprocess.Popen(sweep_cmd(space, small_fs, "--address", ray_address, "--max-concurrent", "1"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: progress(sweep).get("finished", 0) >= 1 and progress(sweep).get("running", 0) >= 1, 300,
                 proc, "one trial finished and the next running")
        ballast = _fill(small_fs)
        out, err = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == 3, out[-3000:] + err[-3000:]
    assert re.search(r"stopped \(storage: No space left on device.*\); free space or fix the storage, then finish "
                     rf"it with: python sweeps/run.py --resume --name full --storage {small_fs}", out), out[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert not list(sweep.rglob(".*.tmp"))
    ballast.unlink()
    assert main(["--resume", "--name", "full", "--storage", str(small_fs), "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(sweep / "trials.parquet")
    assert len(df) == 4 and df["trial_id"].is_unique and set(df["status"]) == {"completed"}


# ------------------------------------------------------------------------------------------------
# S3 (moto's server), the head replaced mid-sweep
# ------------------------------------------------------------------------------------------------
def _s3(env: dict):
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                                   secret_key="testing", region="us-east-1", scheme="http")


@pytest.mark.slow
@pytest.mark.cluster  # its driver starts its own Ray
def test_s3_sweep_resumes_from_the_bucket_on_a_new_head(tmp_path, s3_env):
    import pyarrow.fs

    space = write_space(tmp_path, "s3sweep", paired=1, num_samples=2)
    uri = "s3://sweeps/adrec"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_env)
    head1, head2 = tmp_path / "head1", tmp_path / "head2"  # each "head" has its own local disk (TMPDIR)
    head1.mkdir()
    head2.mkdir()
    digest = hashlib.sha256(f"{uri}/s3sweep".encode()).hexdigest()[:12]
    mirror1 = head1 / "adrec-sweeps" / f"s3sweep-{digest}"
    proc = subprocess.Popen(sweep_cmd(space, uri, "--max-concurrent", "1"), cwd=REPO, env={**env, "TMPDIR": str(head1)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: progress(mirror1).get("finished", 0) >= 2, 600, proc, "two trials finished on S3")
    finally:
        kill_machine(proc, head1)  # the head is gone: driver, its Ray, its disk
    shutil.rmtree(head1)
    out = subprocess.run(sweep_cmd(space, uri, "--resume", "--name", "s3sweep", "--quiet"), cwd=REPO,
                         env={**env, "TMPDIR": str(head2)}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    fs = _s3(s3_env)
    names = {Path(i.path).name for i in fs.get_file_info(pyarrow.fs.FileSelector("sweeps/adrec/s3sweep"))}
    assert {"trials.parquet", "studies.journal", "sweep.json", "paired.done", "optimize.done"} <= names
    assert "driver.lock" not in names  # released
    experiments = fs.get_file_info(pyarrow.fs.FileSelector("sweeps/adrec/s3sweep/optimize", recursive=True))
    assert any(Path(i.path).name.startswith("experiment_state-") for i in experiments)
    with fs.open_input_file("sweeps/adrec/s3sweep/trials.parquet") as f:
        df = pd.read_parquet(f)
    assert len(df) == 3 and df["trial_id"].is_unique
    assert df.groupby("phase").size().to_dict() == {"paired": 1, "optimize": 2}


# ------------------------------------------------------------------------------------------------
# cluster/local.py: a raylet that dies at start-up
# ------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_a_raylet_dying_at_start_is_reported_with_its_log_and_the_logs_stay():
    from cluster.local import LocalCluster, NodeStartError

    cluster = LocalCluster(auth_mode="disabled")
    try:
        cluster.start_head()
        with socket.socket() as busy:  # the worker's node-manager port is taken: its raylet aborts
            busy.bind(("0.0.0.0", 0))  # bound, not listening: nobody answers there but the raylet can't bind
            with pytest.raises(NodeStartError, match=r"worker1's raylet died at start-up .*raylet\.(out|err): .*"
                                                     r"(Check failed|Failed).*logs kept in"):
                cluster.add_worker(num_cpus=1, node_manager_port=busy.getsockname()[1], timeout_s=120)
        assert len(cluster.failed) == 1 and cluster.keep_logs  # not retried: a port in use is no timeout
    finally:
        cluster.stop()
    try:
        assert any(cluster.root.glob("worker1/session_*/logs/raylet.out"))
    finally:
        shutil.rmtree(cluster.root, ignore_errors=True)


def test_a_checkpoint_ray_deletes_stays_while_the_stored_experiment_state_names_it(tmp_path):
    """Ray deletes a trial's older checkpoint when it registers a newer one, before the experiment
    state naming the older one is replaced on storage; the sweep's filesystem keeps the folder
    until an uploaded state no longer names it (a SIGKILL in between once failed `--resume`)."""
    import pickle

    from sweeps.storage import atomic_local_filesystem

    fs = atomic_local_filesystem()
    trial = tmp_path / "optimize" / "optimize_ml-100k_0001"
    old, new, other = trial / "checkpoint_000000", trial / "checkpoint_000001", tmp_path / "scratch"
    for folder in (old, new, other):
        folder.mkdir(parents=True)
        (folder / "f.json").write_text("{}")

    def upload_state(name: str, checkpoint: Path) -> None:  # as Ray stores a trial: a hex pickle
        blob = pickle.dumps({"path": str(checkpoint)}).hex()
        with fs.open_output_stream(str(tmp_path / "optimize" / name)) as out:
            out.write(json.dumps({"trial_data": [blob]}).encode())

    fs.delete_dir(str(other))
    assert not other.exists()  # anything but a checkpoint goes at once
    fs.delete_dir(str(old))
    assert old.is_dir()
    upload_state("experiment_state-1.json", old)  # written before the deletion: still names it
    assert old.is_dir()
    upload_state("experiment_state-2.json", new)
    assert not old.exists() and new.is_dir()
