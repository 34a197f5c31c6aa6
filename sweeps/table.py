"""The trial record: one row per finished trial, built from Ray experiment folders.

`build_rows(experiment_dirs)` is the one function that turns Ray's folders into rows; the sweep
driver uses it at phase boundaries and at the end, the progress callback uses `trial_row` for one
trial as it finishes, and the analysis (`results`) reuses both. Columns follow DESIGN ("The trial
record"): sweep, dataset, trial_id, phase, status, seed, config_id, every TrialConfig field by
name, val_/test_ metrics of the selected model, epochs_/seconds_stage1..3, node_id, accelerator,
code_version, torch/ray/optuna versions and error.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd

from adrec.config import TrialConfig, field_names
from adrec.metrics import METRIC_NAMES
from sweeps.searchers import outcome
from sweeps.trainable import FINISHED, FIT_RESULT, META_KEYS

log = logging.getLogger("sweeps.table")

TABLE_FILE = "trials.parquet"
FINISHED_STATUSES = ("completed", "pruned", "diverged", "failed")
LEAD_COLUMNS = ["sweep", "dataset", "trial_id", "phase", "status", "seed", "config_id"]
STAGES = ("stage1", "stage2", "stage3")


def columns() -> list[str]:
    fields = [f for f in field_names() if f not in LEAD_COLUMNS]
    return (LEAD_COLUMNS + fields + [f"val_{m}" for m in METRIC_NAMES] + [f"test_{m}" for m in METRIC_NAMES]
            + [f"epochs_{s}" for s in STAGES] + [f"seconds_{s}" for s in STAGES]
            + ["node_id", "accelerator", "code_version", "torch_version", "ray_version", "optuna_version",
               "error"])


def versions() -> dict[str, str]:
    import optuna
    import ray
    import torch

    from adrec.train import code_version

    return {"code_version": code_version(), "torch_version": torch.__version__, "ray_version": ray.__version__,
            "optuna_version": optuna.__version__}


def trial_row(*, sweep: str, trial_id: str, config: Mapping[str, Any], ray_status: str,
              history: pd.DataFrame | None, fit_result: Mapping[str, Any] | None, error: str | None,
              env: Mapping[str, str]) -> dict[str, Any] | None:
    """The row of one Ray trial, or None while it is unfinished (PENDING/RUNNING/PAUSED).

    A pruned trial has no fit result: its validation metrics are those of its best reported
    evaluation (at the lower budget it reached) and its test metrics are missing.
    """
    if ray_status not in FINISHED:
        return None
    last = history.iloc[-1].to_dict() if history is not None and len(history) else {}
    status = outcome(last, ray_status == "ERROR") if fit_result is None else str(fit_result.get("status"))
    if ray_status == "ERROR":
        status = "failed"
    cfg = {k: v for k, v in config.items() if k not in META_KEYS}
    cfg = {**TrialConfig().to_dict(), **cfg}  # a config from an older code version may lack new fields
    row: dict[str, Any] = {"sweep": sweep, "trial_id": trial_id, "phase": config.get("phase"), "status": status,
                           "config_id": config.get("config_id"), **cfg}
    val = test = None
    epochs: dict[str, Any] = {}
    seconds: dict[str, Any] = {}
    run_env: dict[str, Any] = {}
    if fit_result is not None:
        val, test = fit_result.get("val"), fit_result.get("test")
        epochs, seconds, run_env = fit_result.get("epochs") or {}, fit_result.get("seconds") or {}, fit_result.get("env") or {}
        error = error or fit_result.get("error")
    elif history is not None and len(history):
        val, epochs, seconds = _best_evaluation(history, cfg)
    for m in METRIC_NAMES:
        row[f"val_{m}"] = _num((val or {}).get(m))
        row[f"test_{m}"] = _num((test or {}).get(m))
    for s in STAGES:
        row[f"epochs_{s}"] = _num(epochs.get(s))
        row[f"seconds_{s}"] = _num(seconds.get(s))
    row["node_id"] = str((fit_result or {}).get("ray", {}).get("node_id") or last.get("node_id") or "")
    row["accelerator"] = str(run_env.get("accelerator") or "")
    row["code_version"] = str(run_env.get("code_version") or env.get("code_version", ""))
    row["torch_version"] = str(run_env.get("torch") or env.get("torch_version", ""))
    row["ray_version"] = env.get("ray_version", "")
    row["optuna_version"] = env.get("optuna_version", "")
    row["error"] = error
    return row


def _best_evaluation(history: pd.DataFrame, cfg: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Validation metrics of the best evaluation a stopped trial reported, and its epoch counts."""
    col = f"val_{cfg.get('select_metric', 'NDCG@20')}"
    evals = history[history["final"].fillna(0) != 1] if "final" in history.columns else history
    if col not in evals or evals[col].dropna().empty:
        return {}, {}, {}
    best = evals.loc[evals[col].astype(float).idxmax()]
    last = evals.iloc[-1]
    val = {m: best.get(f"val_{m}") for m in METRIC_NAMES}
    epoch = int(last.get("epoch", 0) or 0)
    s2 = TrialConfig.from_dict({k: cfg[k] for k in field_names()}).stage_epochs()[1] if cfg.get("model") == "adrec" else 0
    epochs = {"stage1": math.nan, "stage2": min(epoch, s2), "stage3": max(epoch - s2, 0)}
    return val, epochs, {}


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def read_fit_result(trial_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The fit record the trainable left in the trial's last checkpoint (None for pruned/failed)."""
    found = sorted(Path(trial_dir).glob(f"checkpoint_*/{FIT_RESULT}"))
    return json.loads(found[-1].read_text()) if found else None


def read_error(trial_dir: str | os.PathLike) -> str | None:
    path = Path(trial_dir) / "error.txt"
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text(errors="replace").strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "error"


def build_rows(experiment_dirs: Iterable[str | os.PathLike], env: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per finished trial of the given Ray experiment folders (deduplicated by trial_id).

    The sweep name is the name of each experiment folder's parent (`<storage>/<sweep>/<phase>`).
    """
    from ray.tune import ExperimentAnalysis

    env = dict(env or versions())
    rows: dict[str, dict[str, Any]] = {}
    for exp in experiment_dirs:
        exp = Path(exp)
        if not exp.is_dir() or not any(exp.glob("experiment_state-*.json")):
            continue
        with quiet_analysis():
            analysis = ExperimentAnalysis(str(exp))
        frames = analysis.trial_dataframes
        for trial in analysis.trials:
            trial_dir = Path(trial.path)
            row = trial_row(sweep=exp.parent.name, trial_id=trial.trial_id, config=trial.config,
                            ray_status=trial.status, history=frames.get(trial.trial_id),
                            fit_result=read_fit_result(trial_dir), error=read_error(trial_dir), env=env)
            if row is not None:
                rows[trial.trial_id] = row
    return to_frame(rows.values())


@contextmanager
def quiet_analysis() -> Iterator[None]:
    """ExperimentAnalysis warns for every trial that has not reported yet (normal mid-sweep)."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=columns())
    order = {"paired": 0, "optimize": 1, "confirm": 2, "baseline": 3}
    if len(df):
        df = df.assign(_o=df["phase"].map(order)).sort_values(["_o", "dataset", "config_id", "seed", "trial_id"],
                                                                kind="stable").drop(columns="_o")
    return df.reset_index(drop=True)


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Replace the table atomically: write a temporary file next to it, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.exists() else to_frame([])
