"""The sweep runner: spaces, bad input, and real sweeps (real Ray, the real trainer on <=120-user slices).

Ray starts once per pytest session (`ray_address` in conftest.py: a private local Ray, 2 CPUs) and is
never stopped with `ray stop`; the SIGKILL test runs the driver as a subprocess that joins this
cluster, so killing its process group kills only the driver.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from adrec.config import TrialConfig
from sweeps.plan import Plan
from sweeps.run import main
from sweeps.spaces import SpaceError, load_space, parse_space
from adrec.record import columns
from conftest import sigkill_sweep_when

REPO = Path(__file__).resolve().parents[1]
# A trial small enough for tests: ~100 users, 16-d model, 1 + 1 + 2 epochs, evaluation every epoch.
TINY = {"hidden_size": 16, "heads": 2, "cam_blocks": 1, "adm_blocks": 1, "stage1_epochs": 1, "stage2_epochs": 1,
        "stage3_epochs": 2, "eval_every": 1, "batch_size": 64, "diffusion_steps": 24, "max_len": 20}
USERS = "100"


def write_space(tmp_path: Path, name: str = "tiny", **overrides) -> str:
    raw = {"description": "test space", "datasets": ["ml-100k"],
           "counts": {"paired_samples": 1, "repeats": 1, "num_samples": 0, "confirm_top": 0},
           "baselines": [], "fixed": dict(TINY),
           "params": {"lambda_uncertainty": {"low": 1e-4, "high": 1.0, "log": True},
                      "noise_schedule": {"choices": ["trunc_lin", "cosine"]}}}
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key != "params" else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def study_trials(sweep_dir: Path, dataset: str = "ml-100k") -> list[optuna.trial.FrozenTrial]:
    from sweeps.searchers import journal_storage

    storage = journal_storage(str(sweep_dir / "studies.journal"))
    return optuna.load_study(study_name=f"{sweep_dir.name}/{dataset}", storage=storage).get_trials()


def results_of(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# Spaces (no Ray)
# ------------------------------------------------------------------------------------------------
def test_builtin_spaces_sample_only_valid_configs():
    full = load_space("full")
    assert {p.field for p in full.params} >= {
        "lambda_uncertainty", "noise_schedule", "beta_a", "beta_b", "diffusion_steps", "stage_plan",
        "stage1_epochs", "stage2_epochs", "positional_encoding", "aggregation", "noise_level", "denoiser",
        "mse_weight", "lr"}
    configs = full.space_filling(64, seed=0)
    for values in configs:
        cfg = TrialConfig.from_dict({**full.fixed, **values})
        assert ("beta_a" in values) == (cfg.noise_schedule in ("beta", "beta_cdf"))
        assert not (cfg.denoiser == "mlp" and cfg.aggregation in ("cross_attention", "adaln"))
    assert full.space_filling(64, seed=0) == configs  # seeded
    assert len({v["noise_schedule"] for v in configs}) == 8

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        values = full.sample(trial)
        TrialConfig.from_dict({**full.fixed, **values})
        # conditional knobs under distinct Optuna names: aggregation_mlp only exists on the MLP branch
        assert ("aggregation_mlp" in trial.params) == (values["denoiser"] == "mlp")
        assert ("beta_b" in trial.params) == (values["noise_schedule"] in ("beta", "beta_cdf"))
        study.tell(trial, 0.0)
    smoke, paper = load_space("smoke"), load_space("paper")
    assert smoke.datasets == ("ml-100k",) and sum(Plan(
        name="s", space=smoke, datasets=smoke.datasets, baselines=smoke.baselines, metric="NDCG@20", seed=0,
        max_users=0, data_dir=".", **smoke.counts()).counts().values()) == 18  # 12 paired + 4 confirm + default + 1 baseline
    assert paper.params == () and paper.space_filling(3, 0) == [{}, {}, {}]


@pytest.mark.parametrize("params, fixed, match", [
    ({"dropout_rate": {"low": 0.0, "high": 0.5}}, {}, "unknown knob 'dropout_rate'"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, {}, r"range low=0.01 .. high=0.0001 is empty"),
    ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, {}, "log range needs low > 0"),
    ({"aggregation": {"choices": ["linear", "xattn"]}}, {}, "choice 'xattn' is not one of"),
    ({"lr": {"low": 1e-4, "high": 1e-2, "scale": "log"}}, {}, "unknown key"),
    ({"seed": {"low": 1, "high": 9}}, {}, "which the sweep sets per trial"),
    ({"noise_schedule": {"choices": ["linear", "cosine"]}, "diffusion_steps": {"low": 4, "high": 64}}, {},
     r"can sample an invalid config .*noise_schedule='linear'.*diffusion_steps=4"),
    ({"aggregation": {"choices": ["linear", "cross_attention"]}}, {"denoiser": "mlp"},
     "can sample an invalid config.*cross_attention.*MLP denoiser"),
    ({"lr": {"low": 1e-4, "high": 1e-2, "when": {"denoiser": ["mlp"]}}}, {}, "depends on 'denoiser'"),
], ids=["unknown-knob", "empty-range", "log-zero", "bad-choice", "unknown-key", "sweep-field",
        "schedule-vs-T", "mlp-cross-attention", "condition-order"])
def test_space_file_errors(params, fixed, match):
    with pytest.raises(SpaceError, match=match):
        parse_space("bad", {"params": params, "fixed": fixed})


# ------------------------------------------------------------------------------------------------
# Command line: dry run and bad input (each fails before a trial starts)
# ------------------------------------------------------------------------------------------------
def test_dry_run_prints_counts_per_phase(tmp_path, capsys):
    code = main(["--space", "full", "--datasets", "ml-100k,baby", "--num-samples", "5", "--storage",
                 str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    # per dataset: 32 paired x 3 seeds + 5 TPE + (3 confirmed + the default) x 3 seeds + 2 baselines = 115
    assert "ml-100k" in out and "baby" in out and "total trials: 230" in out
    assert "CPU-core-hours" in out and not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, match", [
    (["--space", "nope"], "unknown space 'nope'"),
    (["--space", "smoke", "--datasets", "ml-100k,netflix"], "dataset 'netflix' is neither a known dataset"),
    (["--space", "smoke", "--metric", "test_NDCG@20"], "would select on the test set"),
    (["--space", "smoke", "--metric", "val_MRR"], "is not one of val_HR@5"),
    (["--space", "smoke", "--address", "127.0.0.1:9"], "does not answer"),
    (["--space", "smoke", "--storage", "{file}/sub"], "is not writable"),
    (["--space", "{bad_yaml}"], "unknown knob 'lambda'"),
    (["--space", "smoke", "--resume", "--name", "never-ran"], "there is no sweep"),
    (["--space", "smoke", "--gpus-per-trial", "1.5"], "Ray accepts a fraction up to 1 or a whole number"),
    (["--space", "smoke", "--gpus-per-trial", "0", "--cpus-per-trial", "0"], "a trial asking for nothing"),
], ids=["space", "dataset", "test-metric", "metric", "address", "storage", "space-file", "resume-nothing",
        "gpu-fraction", "no-resources"])
def test_bad_input_fails_fast(tmp_path, capsys, argv, match):
    (tmp_path / "file").write_text("not a folder")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"params": {"lambda": {"low": 0.1, "high": 1.0}}}))
    argv = [a.format(file=tmp_path / "file", bad_yaml=bad) for a in argv]
    storage = [] if "--storage" in argv else ["--storage", str(tmp_path / "runs")]
    started = time.time()
    assert main(argv + storage + ["--no-report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweeps: error:") and err.count("\n") == 1
    assert time.time() - started < 30
    assert re.search(match, err), err
    assert not list(tmp_path.glob("runs/*/trials.parquet"))


def test_more_gpus_than_any_node_fails_fast(tmp_path, capsys, ray_address):
    assert main(["--space", "smoke", "--gpus-per-trial", "1", "--storage", str(tmp_path), "--no-report"]) == 2
    assert "a trial asks for 1 GPU and 1 CPU on one node, but no live node" in capsys.readouterr().err
    assert not (tmp_path / "smoke" / "paired").exists()


# ------------------------------------------------------------------------------------------------
# Real sweeps
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_dataset_sweep_writes_table_and_tensorboard(tmp_path, ray_address):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    space = write_space(tmp_path, datasets=["ml-100k", "baby"], baselines=["most_popular"],
                        counts={"paired_samples": 2, "num_samples": 2, "confirm_top": 1})
    assert main(["--space", space, "--max-users", USERS, "--storage", str(tmp_path), "--no-report", "--quiet"]) == 0
    sweep = tmp_path / "tiny"
    df = pd.read_parquet(sweep / "trials.parquet")
    assert list(df.columns) == columns()
    counts = df.groupby(["dataset", "phase"]).size().to_dict()
    assert counts == {(ds, ph): n for ds in ("ml-100k", "baby")
                      for ph, n in (("paired", 2), ("optimize", 2), ("confirm", 2), ("baseline", 1))}
    assert df["trial_id"].is_unique and (df["sweep"] == "tiny").all()
    # only the optimise phase stops trials early (ASHA: the second trial of a dataset may fall below the first)
    assert set(df[df["phase"] != "optimize"]["status"]) == {"completed"}
    assert set(df["status"]) <= {"completed", "pruned"}
    done = df[df["status"] == "completed"]
    assert done["test_NDCG@20"].notna().all() and df["val_NDCG@20"].between(0, 1).all()
    assert df[df["status"] == "pruned"]["test_NDCG@20"].isna().all()
    assert (df["max_users"] == int(USERS)).all() and df["ray_version"].str.startswith("2.").all()
    # paired: the same two configs on both datasets
    paired = df[df["phase"] == "paired"].set_index(["config_id", "dataset"])["lambda_uncertainty"].unstack()
    assert list(paired.index) == ["p000", "p001"] and (paired["ml-100k"] == paired["baby"]).all()
    # confirm re-runs a config of the same dataset, and the authors' default, with a fresh seed
    confirm = df[df["phase"] == "confirm"]
    assert (confirm["seed"] == 2025 + 1000).all()
    assert (confirm.groupby("dataset")["config_id"].apply(lambda ids: "default" in set(ids))).all()
    for _, row in confirm[confirm["config_id"] != "default"].iterrows():
        assert row["config_id"] in set(df[(df["dataset"] == row["dataset"]) & (df["phase"] != "confirm")]["config_id"])
    # each dataset's study holds exactly its two optimise trials, told their objective
    for ds in ("ml-100k", "baby"):
        trials = study_trials(sweep, ds)
        assert [t.state.name for t in trials][0] == "COMPLETE" and len(trials) == 2
        assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
        assert {t.user_attrs["ray_trial_id"] for t in trials} == set(
            df[(df["dataset"] == ds) & (df["phase"] == "optimize")]["trial_id"])
    # TensorBoard: per-evaluation scalars and HParams for every trial; no test metric reached Ray
    for trial_id in df["trial_id"]:
        (trial_dir,) = sweep.glob(f"*/*_{trial_id}")
        hparams, scalars = {}, set()
        for events in trial_dir.glob("events.out.tfevents.*"):
            acc = event_accumulator.EventAccumulator(str(events))
            acc.Reload()
            scalars |= set(acc.Tags()["scalars"])
            for raw in acc.PluginTagToContent("hparams").values():
                data = plugin_data_pb2.HParamsPluginData.FromString(raw)
                if data.HasField("session_start_info"):
                    hparams = dict(data.session_start_info.hparams)
        assert {"lambda_uncertainty", "noise_schedule", "dataset", "seed", "config_id"} <= set(hparams), trial_id
        assert "ray/tune/objective" in scalars
        assert not any(k.startswith("test_") for r in results_of(trial_dir) for k in r), trial_id
    # the analysis renders this real table (two datasets: per-dataset and cross-dataset sections)
    from results.cli import main as report_main

    assert report_main([str(sweep), "--n-boot", "100", "-q"]) == 0
    md = (sweep / "report" / "report.md").read_text()
    assert "## Dataset: ml-100k" in md and "## Dataset: baby" in md
    assert (sweep / "report" / "report.html").stat().st_size > 10_000 and (sweep / "report" / "hiplot.html").exists()


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_finishes_exactly(tmp_path, ray_address):
    space = write_space(tmp_path, name="killed", counts={"paired_samples": 1, "num_samples": 4},
                        fixed={"stage3_epochs": 3})
    sweep = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sweeps.run", "--space", space, "--max-users", USERS, "--storage", str(tmp_path),
           "--address", ray_address, "--no-report", "--quiet"]
    state, stderr = sigkill_sweep_when(cmd, REPO, sweep, finished=2, running=1, timeout=240)
    assert state.get("finished", 0) >= 2 and state.get("running", 0) >= 1, (state, stderr)
    before = pd.read_parquet(sweep / "trials.parquet")

    assert main(["--resume", "--name", "killed", "--storage", str(tmp_path), "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(sweep / "trials.parquet")
    assert df["trial_id"].is_unique and len(df) == 5
    assert df.groupby("phase").size().to_dict() == {"paired": 1, "optimize": 4}
    assert set(before["trial_id"]) <= set(df["trial_id"])  # finished before the kill: kept, once
    assert len(list((sweep / "optimize").glob("experiment_state-*.json"))) == 2  # restored, not restarted
    trials = study_trials(sweep)
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    assert {t.user_attrs["ray_trial_id"] for t in trials} == set(df[df["phase"] == "optimize"]["trial_id"])


@pytest.mark.slow
def test_crash_once_resumes_from_checkpoint(tmp_path, ray_address, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("ADREC_FAULT_ONCE", str(markers))
    space = write_space(tmp_path, name="crash", fixed={"stage3_epochs": 3})
    assert main(["--space", space, "--max-users", USERS, "--storage", str(tmp_path), "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(tmp_path / "crash" / "trials.parquet")
    assert df["status"].tolist() == ["completed"]
    (trial_dir,) = (tmp_path / "crash" / "paired").glob("paired_*")
    assert (markers / f"{df['trial_id'][0]}.fault").exists()
    evals = [r for r in results_of(trial_dir) if not r.get("final")]
    epochs = [r["epoch"] for r in evals]
    # crashed after the checkpoint of epoch 1; the retry continued at epoch 2, it did not restart at 1
    assert epochs == [1, 2, 3, 4] and [r["resumed_from_epoch"] for r in evals] == [0, 1, 1, 1]
    assert df["epochs_stage2"][0] == 1 and df["epochs_stage3"][0] == 3


@pytest.mark.slow
def test_diverging_config_is_recorded_and_sweep_finishes(tmp_path, ray_address):
    space = write_space(tmp_path, name="boom", fixed={"lr": 1e6}, counts={"num_samples": 1})
    assert main(["--space", space, "--max-users", USERS, "--storage", str(tmp_path), "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(tmp_path / "boom" / "trials.parquet")
    assert df["status"].tolist() == ["diverged", "diverged"] and df["error"].str.contains("loss").all()
    (trial,) = study_trials(tmp_path / "boom")
    assert trial.state.name == "FAIL" and trial.user_attrs["status"] == "diverged"
