"""The sweep on a real multi-node Ray cluster on this machine: several raylets, declared GPUs.

Every sweep runs as its own driver process (`sweeps/run.py --address ...` or a Ray job), so this
module never calls ray.init and can share a pytest session with tests that do. The cluster
(cluster.local.LocalCluster) uses token auth like cluster/gpu.yaml: every node, every driver and
the job client get RAY_AUTH_MODE=token and the same token. Deselect with `-m "not cluster"`.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest
import yaml

from adrec.data import resolve_data_dir
from cluster.local import RAY_CLI as RAY, LocalCluster

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
FAKE_AUTOSCALER = REPO / "tests" / "fake_cluster" / "autoscaler.yaml"

# Small enough for two cores: 100 users, a 16-wide model, one stage-1 epoch, an evaluation per epoch.
TINY = {"stage1_epochs": 1, "stage2_epochs": 1, "stage3_epochs": 4, "eval_every": 1, "patience": 50,
        "hidden_size": 16, "heads": 2, "diffusion_steps": 24, "batch_size": 64, "eval_batch_size": 256}


def write_space(folder: Path, paired: int, **fixed: int) -> Path:
    """A paired-phase-only space on ml-100k: `paired` configs, one seed, no TPE, no baselines."""
    space = {"description": "cluster tests", "datasets": ["ml-100k"],
             "counts": {"paired_samples": paired, "repeats": 1, "num_samples": 0, "confirm_top": 0},
             "baselines": [], "fixed": {**TINY, **fixed},
             "params": {"lambda_uncertainty": {"low": 1e-4, "high": 1.0, "log": True}}}
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def sweep_args(space: Path, storage: Path, address: str, gpus: float) -> list[str]:
    # An explicit data dir: a job's working directory is a copy without ../shared beside it.
    return ["sweeps/run.py", "--space", str(space), "--storage", str(storage), "--name", "s", "--address", address,
            "--gpus-per-trial", str(gpus), "--cpus-per-trial", "1", "--max-users", "100", "--no-report",
            "--data-dir", str(resolve_data_dir())]


def run_sweep(cluster: LocalCluster, args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=cluster.env, capture_output=True, text=True,
                         timeout=timeout_s)
    assert out.returncode == 0, f"sweep failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def trial_results(sweep_dir: Path, phase: str = "paired") -> dict[str, list[dict]]:
    """trial_id -> every result Ray recorded for it (result.json of its trial folder)."""
    out = {}
    for path in sorted((sweep_dir / phase).glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            out[lines[0]["trial_id"]] = lines
    return out


def run_intervals(results: dict[str, list[dict]]) -> dict[str, tuple[str, float, float]]:
    """trial_id -> (node id, start, end) from Ray's per-result timestamps (s) and time_total_s."""
    out = {}
    for trial, lines in results.items():
        out[trial] = (lines[-1]["node_id"], min(r["timestamp"] - r["time_total_s"] for r in lines),
                      max(r["timestamp"] for r in lines))
    return out


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "auth_token"
    path.write_text(secrets.token_hex(32))
    return path


@pytest.fixture(scope="module")
def cluster(token):
    """CPU-0 head with the dashboard/job server; two workers with 2 CPUs and 1 declared GPU each.
    Fast failure detection (1 s health checks) so a killed node is noticed in ~3 s, not ~15 s."""
    local = LocalCluster(auth_mode="token", token_path=token,
                         env={"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    try:
        local.start_head(dashboard=True)
        local.add_worker(num_cpus=2, num_gpus=1)
        local.add_worker(num_cpus=2, num_gpus=1)
        local.ids = local.node_ids(local.wait_for_nodes(3))  # head, worker1, worker2 -> Ray node id
        yield local
    finally:
        local.stop()


# --------------------------------------------------------------------------------------------------
# A sweep submitted as a Ray job: spread over the workers, two trials per declared GPU
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job_sweep(cluster, token, tmp_path_factory):
    """`ray job submit --working-dir . -- python sweeps/run.py ... --address auto` against the head's
    job server on loopback; the client holds the token the way docs/cluster.md says (RAY_AUTH_MODE=token
    and ~/.ray/auth_token)."""
    folder = tmp_path_factory.mktemp("job")
    home = folder / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token.read_text())
    client = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_")}
    client.update(HOME=str(home), RAY_AUTH_MODE="token")
    space, storage = write_space(folder, paired=4), folder / "storage"
    submit = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO), "--",
              "python", *sweep_args(space, storage, "auto", gpus=0.5)]
    out = subprocess.run(submit, cwd=REPO, env=client, capture_output=True, text=True, timeout=400)
    return {"out": out, "sweep_dir": storage / "s", "client": client}


def test_job_submission_needs_the_clusters_token(cluster, job_sweep):
    wrong = {**job_sweep["client"], "RAY_AUTH_TOKEN": "not-the-token"}
    out = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard_url], env=wrong, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "authentication token is invalid" in (out.stdout + out.stderr)


def test_job_runs_the_sweep_on_the_workers_only(cluster, job_sweep):
    out = job_sweep["out"]
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "finished: 4 trials" in out.stdout
    df = pd.read_parquet(job_sweep["sweep_dir"] / "trials.parquet")
    ids = cluster.ids
    assert len(df) == 4 and df["trial_id"].is_unique and set(df["status"]) == {"completed"}
    assert set(df["node_id"]) <= {ids["worker1"], ids["worker2"]}  # the head (CPU 0) runs no trial
    assert df["node_id"].nunique() == 2


def test_half_a_gpu_per_trial_puts_two_trials_on_one_gpu(job_sweep):
    intervals = run_intervals(trial_results(job_sweep["sweep_dir"]))
    assert len(intervals) == 4

    def together(a: str, b: str) -> float:
        """Seconds two trials ran at once on one node (0 on different nodes)."""
        (na, sa, ea), (nb, sb, eb) = intervals[a], intervals[b]
        return max(0.0, min(ea, eb) - max(sa, sb)) if na == nb else 0.0

    # Two trials shared the node's one declared GPU for most of their run, not just a hand-over.
    shared = [(a, b) for a, b in combinations(intervals, 2)
              if together(a, b) >= 0.5 * min(intervals[a][2] - intervals[a][1], intervals[b][2] - intervals[b][1])]
    assert shared, f"no two trials ran at once on one node: {intervals}"
    for node in {n for n, _, _ in intervals.values()}:  # never more than 1 GPU / 0.5 = 2 at once
        spans = [(s, e) for n, s, e in intervals.values() if n == node]
        assert all(sum(s <= t < e for s, e in spans) <= 2 for t, _ in spans)


# --------------------------------------------------------------------------------------------------
# A worker node lost mid-sweep
# --------------------------------------------------------------------------------------------------
def running_trial_past(sweep_dir: Path, epoch: int) -> tuple[str, str] | None:
    """(trial id, node id) of a trial still running whose last result (with a checkpoint) is at
    `epoch` or later, from the result.json files Ray writes into the storage as it goes."""
    for trial, lines in trial_results(sweep_dir).items():
        last = lines[-1]
        if last.get("epoch", 0) >= epoch and "final" not in last and last.get("checkpoint_dir_name"):
            return trial, last["node_id"]
    return None


def test_a_killed_worker_raylet_trial_resumes_on_another_node(cluster, tmp_path):
    space = write_space(tmp_path, paired=2, stage3_epochs=8)
    sweep_dir = tmp_path / "storage" / "s"
    driver = subprocess.Popen([sys.executable, *sweep_args(space, tmp_path / "storage", cluster.address, gpus=1)],
                              cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, running = time.monotonic() + 180, None
        while time.monotonic() < deadline and not running:  # a trial past its 2nd evaluation, still running
            running = running_trial_past(sweep_dir, epoch=2)
            assert driver.poll() is None, driver.stdout.read()
            time.sleep(0.3)
        assert running, "no trial reached its second checkpoint while running"
        trial, killed = running
        victim = next(n for n in cluster.nodes if cluster.ids.get(n.name) == killed)
        cluster.kill(victim)  # SIGKILL of the node's raylet and its trial process: a lost machine
        cluster.add_worker(num_cpus=2, num_gpus=1)  # the autoscaler's replacement
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-5000:]
    df = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(df) == 2 and df["trial_id"].is_unique and set(df["status"]) == {"completed"}
    results = trial_results(sweep_dir)
    assert set(results) == set(df["trial_id"])  # every trial accounted for, once
    history = results[trial]
    after = [r for r in history if r["node_id"] != killed and "epoch" in r]  # evaluations after the kill
    assert after, [(r["node_id"][:8], r.get("epoch")) for r in history]
    assert min(r["resumed_from_epoch"] for r in after) >= 2  # resumed from its checkpoint, not from epoch 0
    assert df.set_index("trial_id").loc[trial, "node_id"] != killed  # finished on another node
    assert max(r.get("epoch", 0) for r in history) == 1 + 8  # ran its whole budget (stage 2 + 3)


# --------------------------------------------------------------------------------------------------
# The autoscaler adds GPU nodes for pending trials (Ray's fake multi-node provider)
# --------------------------------------------------------------------------------------------------
def test_fake_autoscaler_adds_gpu_nodes_for_pending_trials(tmp_path):
    config = yaml.safe_load(FAKE_AUTOSCALER.read_text())
    config["available_node_types"]["gpu1x"]["min_workers"] = 1  # one GPU node from the start
    config_path = tmp_path / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with LocalCluster(auth_mode="disabled") as local:
        local.start_head(autoscaling_config=config_path)
        # Once the min_workers gpu1x node is up, a driver on the head finds the autoscaler's node
        # types: a 2-GPU request fits the gpu2x type only, no live node.
        found = local.run_driver(
            "import time\nend = time.time() + 60\n"
            "while time.time() < end and sum(n['Alive'] for n in ray.nodes()) < 2: time.sleep(0.5)\n"
            "from sweeps.preflight import autoscaler_config_path, check_gpu_request\n"
            "check_gpu_request(2, 1)\n"
            "print(json.dumps([str(autoscaler_config_path()), sum(n['Alive'] for n in ray.nodes())]))")
        assert found == [str(local.root / "autoscaler.yaml"), 2]
        # Two one-GPU trials, one GPU node: the second trial waits, and the autoscaler adds a node.
        space = write_space(tmp_path, paired=2, stage3_epochs=3)
        run_sweep(local, sweep_args(space, tmp_path / "storage", local.address, gpus=1))
        df = pd.read_parquet(tmp_path / "storage" / "s" / "trials.parquet")
        nodes = set(df["node_id"])
        # Fake node ids: ...00000 is the head, ...00001 the min_workers node, higher ones were added.
        assert len(df) == 2 and set(df["status"]) == {"completed"}
        assert all(n.startswith("fffff") and not n.endswith("00000") for n in nodes)
        assert max(int(n[-5:]) for n in nodes) >= 2, nodes


# --------------------------------------------------------------------------------------------------
# README's cluster command, as printed, on the fake multi-node provider with a local S3 bucket
# --------------------------------------------------------------------------------------------------
def readme_cluster_command() -> str:
    """The `ray job submit ...` line of the README's "Running on a GPU cluster" section."""
    section = (REPO / "README.md").read_text().split("## Running on a GPU cluster", 1)[1].split("\n## ", 1)[0]
    (line,) = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("ray job submit")]
    return line


def test_readme_cluster_command_runs_on_the_fake_provider_with_s3(tmp_path, token, s3_env):
    """Only two substitutions: the job server's address (the fake head's, on a free port) and the
    space (`--space full` is hundreds of CPU-hours; a tiny space file instead); BUCKET is the local
    S3 server's bucket. The head has no CPU, so every trial waits for a fake GPU node the
    autoscaler launches."""
    import shlex

    import pyarrow.fs

    command = readme_cluster_command()
    assert "--storage s3://BUCKET/adrec" in command and "--address auto" in command and "--working-dir ." in command
    space = write_space(tmp_path, paired=2, stage3_epochs=2)
    argv = shlex.split(command.replace("http://127.0.0.1:8265", "{dashboard}").replace("s3://BUCKET/", "s3://sweeps/")
                       .replace("--space full", f"--space {space}"))
    assert argv[:3] == ["ray", "job", "submit"] and "{dashboard}" in argv
    env = {**s3_env, "ADREC_DATA_DIR": str(resolve_data_dir())}
    # One fake node at most (a gpu2x holds both trials): the provider starts every fake node with
    # the same temp dir, and two of them cleaning one runtime_resources/ delete the job's working
    # directory under its driver (a fake-provider artifact; cloud nodes have their own disks).
    config = yaml.safe_load(FAKE_AUTOSCALER.read_text())
    config["available_node_types"]["gpu1x"]["max_workers"] = 0
    config_path = tmp_path / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with LocalCluster(auth_mode="token", token_path=token, env=env) as local:
        local.start_head(dashboard=True, autoscaling_config=config_path)
        home = tmp_path / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(token.read_text())
        client = {k: v for k, v in local.env.items() if not k.startswith("RAY_")}
        client.update(HOME=str(home), RAY_AUTH_MODE="token")  # as README says: export RAY_AUTH_MODE=token
        argv = [RAY if a == "ray" and i == 0 else a.replace("{dashboard}", local.dashboard_url)
                for i, a in enumerate(argv)] + ["--max-users", "100", "--no-report"]
        out = subprocess.run(argv, cwd=REPO, env=client, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "finished: 2 trials in s3://sweeps/adrec/space/trials.parquet" in out.stdout
    fs = pyarrow.fs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], access_key="testing",
                                 secret_key="testing", region="us-east-1", scheme="http")
    with fs.open_input_file("sweeps/adrec/space/trials.parquet") as f:
        df = pd.read_parquet(f)
    assert len(df) == 2 and set(df["status"]) == {"completed"}
    nodes = set(df["node_id"])  # fake node ids: ...00000 is the head, higher ones were launched for the trials
    assert all(n.startswith("fffff") and not n.endswith("00000") for n in nodes), nodes

