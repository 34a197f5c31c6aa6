"""Packs in the sweep (`--pack-size K`): the paired and confirm phases' jobs grouped into pack trials
(one Ray trial trains K members with `adrec.pack.fit_pack`), one table row per member.

The grouping tests need no Ray. The sweeps run real Ray (the session's private Ray, conftest.py) and
the real trainer on 100-user slices of ml-100k; the SIGKILL test runs the driver as a subprocess that
joins that Ray, so killing its process group kills only the driver.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from adrec.config import METRICS, TrialConfig
from adrec.pack import PACK_FIELDS
from adrec.record import FINISHED, PACK_KEY, columns, member_jobs, pack_rows
from sweeps.plan import Plan, SweepError, pack_jobs
from sweeps.run import main
from sweeps.spaces import parse_space
from conftest import sigkill_sweep_when

REPO = Path(__file__).resolve().parents[1]
# A trial small enough for tests: 100 users, 16-d model, 1 + 1 + 2 epochs, evaluation every epoch.
TINY = {"hidden_size": 16, "heads": 2, "cam_blocks": 1, "adm_blocks": 1, "stage1_epochs": 1, "stage2_epochs": 1,
        "stage3_epochs": 2, "eval_every": 1, "batch_size": 64, "diffusion_steps": 24, "max_len": 20}
USERS = "100"
PARAMS = {"lambda_uncertainty": {"low": 1e-4, "high": 1.0, "log": True},
          "noise_schedule": {"choices": ["trunc_lin", "cosine"]}}


def write_space(folder: Path, name: str, counts: dict, baselines: list[str] | None = None, **fixed) -> str:
    raw = {"description": "pack tests", "datasets": ["ml-100k"],
           "counts": {"paired_samples": 1, "repeats": 1, "num_samples": 0, "confirm_top": 0, **counts},
           "baselines": baselines or [], "fixed": {**TINY, **fixed}, "params": PARAMS}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def make_plan(params: dict, datasets=("ml-100k",), paired=6, repeats=3, baselines=("most_popular",)) -> Plan:
    space = parse_space("packs", {"params": params, "fixed": dict(TINY)})
    return Plan(name="packs", space=space, datasets=tuple(datasets), paired_samples=paired, repeats=repeats,
                num_samples=0, confirm_top=0, baselines=tuple(baselines), metric="NDCG@20", seed=7, max_users=100,
                data_dir=".")


def members(job: dict) -> list[dict]:
    """The member jobs of a pack job, or the job itself."""
    return job["config"][PACK_KEY] if PACK_KEY in job["config"] else [job]


# ------------------------------------------------------------------------------------------------
# Grouping (no Ray)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, repeats", [(3, 3), (6, 3), (4, 3), (2, 3), (5, 1), (1, 3)],
                         ids=["k3-r3", "k6-r3", "k4-r3", "k2-r3", "k5-r1", "k1"])
def test_packs_share_dataset_and_architecture_and_keep_a_configs_seeds_together(size, repeats):
    # aggregation and positional encoding are PACK_FIELDS: configs that differ in them never share a pack
    params = {"aggregation": {"choices": ["linear", "adaln"]}, "positional_encoding": {"choices": ["none", "learned"]},
              "lambda_uncertainty": {"low": 1e-4, "high": 1.0, "log": True}}
    plan = make_plan(params, datasets=("ml-100k", "baby"), paired=12, repeats=repeats)
    jobs = plan.paired_jobs(plan.paired_configs()) + plan.baseline_jobs()
    packed = pack_jobs(jobs, size)
    assert pack_jobs(jobs, size) == packed  # deterministic
    # every job exactly once, in a pack or alone; nothing invented
    flat = [m["job"] for job in packed for m in members(job)]
    assert sorted(flat) == sorted(j["job"] for j in jobs) and len(set(flat)) == len(flat)
    by_job = {j["job"]: j["config"] for j in jobs}
    groups: dict[tuple, list[list[dict]]] = {}  # PACK_FIELDS values -> its Ray trials' members, in order
    for job in packed:
        group = [by_job[m["job"]] for m in members(job)]
        assert 1 <= len(group) <= size
        for field in PACK_FIELDS:
            assert len({repr(c[field]) for c in group}) == 1, (field, job["job"])
        if PACK_KEY in job["config"]:
            assert len(group) >= 2 and job["config"]["phase"] == "paired"
            assert member_jobs(job["config"]) == [m["job"] for m in job["config"][PACK_KEY]]
        if group[0]["model"] == "adrec":
            groups.setdefault(tuple(repr(group[0][f]) for f in PACK_FIELDS), []).append(group)
    assert len(groups) == 8  # 2 datasets x 2 aggregations x 2 positional encodings
    # baselines are never packed, and stay in the list as they were
    assert [j for j in packed if j["config"]["model"] != "adrec"] == plan.baseline_jobs()
    for trials in groups.values():
        ids = [[c["config_id"] for c in t] for t in trials]
        if repeats <= size:  # a config's seeds share one Ray trial; a new one starts only when the next config
            where: dict[str, set[int]] = {}  # does not fit
            for n, config_ids in enumerate(ids):
                for c in config_ids:
                    where.setdefault(c, set()).add(n)
            assert all(len(v) == 1 for v in where.values())
            assert all(len(prev) + repeats > size for prev in ids[:-1])
        else:  # more seeds than fit: chunks of `size`, then the rest
            chunks = [size] * (repeats // size) + ([repeats % size] if repeats % size else [])
            assert [len(t) for t in trials] == chunks * len({c for i in ids for c in i})
        if size % repeats == 0:  # full packs, then what is left
            assert all(len(t) == size for t in trials[:-1])


def test_pack_size_one_is_the_job_list_and_a_bad_size_is_refused():
    plan = make_plan(dict(PARAMS))
    jobs = plan.paired_jobs(plan.paired_configs())
    assert pack_jobs(jobs, 1) == jobs
    with pytest.raises(SweepError, match=r"--pack-size=0 must be >= 1"):
        pack_jobs(jobs, 0)


def test_pack_rows_give_each_member_its_own_row():
    plan = make_plan(dict(PARAMS), paired=2, repeats=1)
    (job,) = pack_jobs(plan.paired_jobs(plan.paired_configs()), 2)
    fits = [{"status": s, "val": {m: v for m in METRICS}, "test": {m: v / 2 for m in METRICS},
             "epochs": {"stage1": 1, "stage2": 1, "stage3": 2}, "seconds": {}, "env": {},
             "error": "loss is nan" if s == "diverged" else None}
            for s, v in (("completed", 0.2), ("diverged", 0.1))]
    env = {"code_version": "c", "torch_version": "t", "ray_version": "r", "optuna_version": "o"}
    rows = pack_rows(sweep="s", trial_id="abc_00001", config=job["config"], ray_status="TERMINATED", results=fits,
                     error=None, env=env)
    assert [r["trial_id"] for r in rows] == ["abc_00001-m0", "abc_00001-m1"]
    assert [r["config_id"] for r in rows] == ["p000", "p001"] and {r["pack_id"] for r in rows} == {"abc_00001"}
    assert [r["status"] for r in rows] == ["completed", "diverged"] and rows[1]["error"] == "loss is nan"
    assert rows[0]["test_NDCG@20"] == 0.1 and rows[1]["val_HR@5"] == 0.1
    assert [r["lambda_uncertainty"] for r in rows] == [m["config"]["lambda_uncertainty"]
                                                       for m in job["config"][PACK_KEY]]
    failed = pack_rows(sweep="s", trial_id="x", config=job["config"], ray_status="ERROR", results=None,
                       error="RuntimeError: boom", env=env)
    assert [r["status"] for r in failed] == ["failed", "failed"] and failed[0]["error"] == "RuntimeError: boom"
    assert math.isnan(failed[0]["val_NDCG@20"])
    assert pack_rows(sweep="s", trial_id="x", config=job["config"], ray_status="RUNNING", results=None, error=None,
                     env=env) == []


def test_dry_run_counts_pack_trials_per_phase(tmp_path, capsys):
    space = write_space(tmp_path, "dry", {"paired_samples": 4, "repeats": 3, "num_samples": 5, "confirm_top": 2},
                        baselines=["most_popular"])
    assert main(["--space", space, "--pack-size", "6", "--storage", str(tmp_path / "runs"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "paired: 12 trials in 2 Ray trials (2 packs)" in out
    assert "optimize: 5 trials in 1 Ray trials" in out and "baseline: 1 single trials" in out
    assert "confirm: 9 trials in 2..3 Ray trials" in out  # the top 2 and the authors' default, 3 seeds each
    for bad in ("0", "-2", "many"):
        assert main(["--space", space, "--pack-size", bad, "--storage", str(tmp_path / "runs"), "--dry-run"]) == 2
        assert f"--pack-size={bad} must be a whole number >= 1" in capsys.readouterr().err
    # auto: measured before the sweep; the default with GPU trials, not on CPU
    for argv in (["--pack-size", "auto"], ["--gpus-per-trial", "0.5"]):
        assert main(["--space", space, *argv, "--storage", str(tmp_path / "runs"), "--dry-run"]) == 0
        assert "measured on a trial's node before the sweep (--pack-size auto)" in capsys.readouterr().out
    assert main(["--space", space, "--storage", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert "--pack-size auto" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Real sweeps
# ------------------------------------------------------------------------------------------------
def sigkill_packed_sweep(space: str, storage: Path, ray_address: str, sweep: Path, trials: int) -> pd.DataFrame:
    """Run a sweep of `trials` member-trials with packs of 2 as a driver subprocess on the session's
    Ray, SIGKILL it once two are done and two are running (conftest.sigkill_sweep_when) and return
    its table at the kill."""
    cmd = [sys.executable, "-m", "sweeps.run", "--space", space, "--max-users", USERS, "--storage", str(storage),
           "--address", ray_address, "--pack-size", "2", "--no-report", "--quiet"]
    state, stderr = sigkill_sweep_when(cmd, REPO, sweep, finished=2, running=2, timeout=300)
    assert state.get("finished", 0) >= 2 and state.get("running", 0) >= 2, (state, stderr)
    before = pd.read_parquet(sweep / "trials.parquet")
    assert len(before) < trials
    return before


def _jobs(sweep: Path, phase: str) -> dict[str, dict]:
    return {j["job"]: j["config"] for j in json.loads((sweep / f"{phase}_jobs.json").read_text())["jobs"]}


def _expected_jobs(sweep: Path, phases=("paired", "confirm", "baseline")) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for phase in phases:
        if (sweep / f"{phase}_jobs.json").exists():
            out.update(_jobs(sweep, phase))
    return out


def tensorboard_run(folder: Path) -> tuple[dict, dict[str, list[float]]]:
    """The HParams and the scalar series of the TensorBoard run in `folder` (not its subfolders)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams: dict = {}
    scalars: dict[str, list[float]] = {}
    for events in folder.glob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
        try:
            contents = acc.PluginTagToContent("hparams").values()
        except KeyError:  # no HParams in this file
            contents = []
        for raw in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if data.HasField("session_start_info"):
                hparams = dict(data.session_start_info.hparams)
    return hparams, scalars


def _row_job(row: pd.Series) -> str:
    return f"{row['phase']}/ml-100k/{row['config_id']}/s{row['seed']}"


@pytest.mark.slow
def test_packed_sweep_rows_equal_solo_fits_and_the_report_runs(tmp_path, ray_address, capsys):
    from adrec.train import fit
    from results.cli import main as report_main

    space = write_space(tmp_path, "packed", {"paired_samples": 3, "repeats": 1, "confirm_top": 2},
                        baselines=["most_popular"])
    assert main(["--space", space, "--max-users", USERS, "--storage", str(tmp_path), "--pack-size", "3",
                 "--no-report"]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "packed"
    df = pd.read_parquet(sweep / "trials.parquet")
    assert list(df.columns) == columns()
    assert df.groupby("phase").size().to_dict() == {"paired": 3, "confirm": 3, "baseline": 1}  # top 2 + default
    assert df["trial_id"].is_unique and (df["status"] == "completed").all()
    # one row per member job, each exactly once
    expected = _expected_jobs(sweep)
    assert sorted(df.apply(_row_job, axis=1)) == sorted(expected)
    adrec = df[df["model"] == "adrec"]
    assert adrec["trial_id"].str.fullmatch(r".+-m\d").all()
    assert all(t.startswith(f"{p}-m") for t, p in zip(adrec["trial_id"], adrec["pack_id"]))
    assert adrec.groupby("phase")["pack_id"].nunique().to_dict() == {"paired": 1, "confirm": 1}
    assert df[df["model"] != "adrec"]["pack_id"].isna().all()
    # the progress lines name the pack's members and give each member its line
    assert re.search(r"pack of 3: p000/s2025 p001/s2025 p002/s2025 started", out), out
    for trial_id in adrec["trial_id"]:
        assert f"] {trial_id} " in out
    # the pack trial reported validation metrics only, and once
    for trial_dir in (sweep / "paired").glob("paired_*"):
        results = [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines() if x.strip()]
        assert len(results) == 1 and results[0]["pack_size"] == 3 and "objective" in results[0]
        assert not any(k.startswith("test_") for k in results[0])
    # TensorBoard: each member is a run of its own (curves and HParams, in the pack's final checkpoint);
    # the pack trial's own run has no HParams session
    for _, row in adrec.iterrows():
        (run,) = sweep.glob(f"{row['phase']}/*_{row['pack_id']}/checkpoint_*/{row['trial_id']}")
        hparams, scalars = tensorboard_run(run)
        assert {"lambda_uncertainty", "noise_schedule", "dataset", "seed", "config_id"} <= set(hparams)
        assert hparams["config_id"].string_value == row["config_id"]
        assert hparams["seed"].number_value == row["seed"]
        assert len(scalars["ray/tune/objective"]) == row["epochs_stage2"] + row["epochs_stage3"] + 1  # evals + final
        assert scalars["ray/tune/val_NDCG_20"][-1] == pytest.approx(row["val_NDCG@20"], abs=1e-6)
    for pack_dir in sweep.glob("*/*_*"):
        if pack_dir.is_dir() and pack_dir.name.split("_")[-1] in set(adrec["pack_id"]):
            hparams, scalars = tensorboard_run(pack_dir)
            assert not hparams and "ray/tune/objective" in scalars
    # each member equals its config trained alone by `fit`
    cache = tmp_path / "solo_stage1"
    for _, row in adrec.iterrows():
        cfg = TrialConfig.from_dict({k: v for k, v in expected[_row_job(row)].items()
                                     if k not in ("phase", "config_id", "job")})
        solo = fit(cfg, stage1_cache=cache)
        for m in METRICS:
            assert row[f"val_{m}"] == pytest.approx(solo["val"][m], abs=1e-5), (row["trial_id"], m)
            assert row[f"test_{m}"] == pytest.approx(solo["test"][m], abs=1e-5), (row["trial_id"], m)
        assert [row[f"epochs_stage{i}"] for i in (1, 2, 3)] == [solo["epochs"][f"stage{i}"] for i in (1, 2, 3)]
    # the analysis reads a packed sweep as any other
    assert report_main([str(sweep), "--n-boot", "100", "-q"]) == 0
    assert (sweep / "report" / "report.html").exists()


@pytest.mark.slow
def test_a_crashed_pack_trains_again_and_records_each_member_once(tmp_path, ray_address, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("ADREC_FAULT_ONCE", str(markers))
    space = write_space(tmp_path, "crash", {"paired_samples": 1, "repeats": 2})
    assert main(["--space", space, "--max-users", USERS, "--storage", str(tmp_path), "--pack-size", "2",
                 "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(tmp_path / "crash" / "trials.parquet")
    assert len(df) == 2 and df["trial_id"].is_unique and (df["status"] == "completed").all()
    assert df["error"].isna().all()
    (pack_id,) = set(df["pack_id"])
    assert (markers / f"{pack_id}.fault").exists()  # it did crash once; the retry trained it again


@pytest.mark.slow
def test_sigkill_mid_packed_sweep_then_resume_runs_each_member_once(tmp_path, ray_address):
    space = write_space(tmp_path, "killed", {"paired_samples": 3, "repeats": 2}, stage3_epochs=3)
    sweep = tmp_path / "killed"
    before = sigkill_packed_sweep(space, tmp_path, ray_address, sweep, trials=6)  # a pack done, one running
    from sweeps.driver import known_trials

    unfinished = [t for t, info in known_trials(sweep / "paired").items() if info["status"] not in FINISHED]
    assert unfinished  # Ray had saved the running pack (it snapshots after every checkpoint)

    # no --pack-size: the resume keeps the one the sweep ran with
    assert main(["--resume", "--name", "killed", "--storage", str(tmp_path), "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(sweep / "trials.parquet")
    assert len(df) == 6 and df["trial_id"].is_unique and (df["status"] == "completed").all()
    jobs = df.apply(_row_job, axis=1)
    assert sorted(jobs) == sorted(_jobs(sweep, "paired")) and jobs.is_unique
    assert set(before["trial_id"]) <= set(df["trial_id"])  # finished before the kill: kept, once
    assert df.groupby("pack_id").size().tolist() == [2, 2, 2]
    assert set(unfinished) <= set(df["pack_id"])  # a pack the kill interrupted trained again, as the same trial
    assert len(list((sweep / "paired").glob("experiment_state-*.json"))) == 2  # restored, not restarted
    assert json.loads((sweep / "runtime.json").read_text())["pack_size"] == 2


@pytest.mark.slow
@pytest.mark.cluster  # its driver starts its own Ray
def test_packed_sweep_on_s3_keeps_every_members_record(tmp_path, s3_env):
    """The driver reads trials back from its local mirror of the bucket: pack records must be copied,
    and the rows name the sweep, not the mirror folder."""
    import pyarrow.fs

    space = write_space(tmp_path, "s3packs", {"paired_samples": 1, "repeats": 2})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray that sees the bucket
    (tmp_path / "head").mkdir()
    env.update(s3_env, TMPDIR=str(tmp_path / "head"))
    out = subprocess.run([sys.executable, "-m", "sweeps.run", "--space", space, "--max-users", USERS, "--storage",
                          "s3://sweeps/packs", "--pack-size", "2", "--no-report", "--quiet"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    fs = pyarrow.fs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], access_key="testing",
                                 secret_key="testing", region="us-east-1", scheme="http")
    with fs.open_input_file("sweeps/packs/s3packs/trials.parquet") as f:
        df = pd.read_parquet(f)
    assert len(df) == 2 and df["pack_id"].nunique() == 1 and (df["status"] == "completed").all()
    assert df["test_NDCG@20"].notna().all() and df["seed"].tolist() == [2025, 2026]
    assert (df["sweep"] == "s3packs").all()  # the sweep's name, not its local mirror's
