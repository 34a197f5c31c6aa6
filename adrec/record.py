"""The trial record: what one trial leaves behind, and the table of them (`runs/<sweep>/trials.parquet`).

One module that the sweep (which writes rows) and the analysis (which reads them) both import, so
phases, statuses, columns and the rules for a row live in one place. Pure Python + pandas/pyarrow:
no Ray, no torch. Columns follow DESIGN ("The trial record"): sweep, dataset, trial_id, phase,
status, seed, config_id, every TrialConfig field by name (a knob that is inactive in the trial is
null), val_/test_ metrics of the selected model, epochs_/seconds_stage1..3, node_id, accelerator,
code_version, torch/ray/optuna versions, pack_id and error (only for failed or diverged trials).

A pack (`adrec.pack.fit_pack`, `--pack-size`) is one Ray trial that trains several member configs
as one model; it leaves one row per member (`pack_rows`), each exactly as the member's solo trial
would, with its own id `<ray trial id>-m<i>` and `pack_id` = the Ray trial's id (null for a solo trial).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from adrec.config import METRICS, TrialConfig, active_values, field_names

TABLE_FILE = "trials.parquet"
FIT_RESULT = "fit_result.json"  # the fit record a trial leaves in its last checkpoint
PACK_RESULTS = "pack_results.json"  # a pack trial's last checkpoint: the members' fit records, in order
PACK_PROGRESS = "pack_progress.json"  # an optimise pack's checkpoint while it trains: evaluations, finished records
PACK_KEY = "pack"  # a pack trial's Ray config: {"phase", "dataset", "job", "config_id", "pack": [member jobs]}
PHASES: tuple[str, ...] = ("paired", "optimize", "confirm", "baseline")
# completed: ran its budget or stopped by its own patience; pruned: stopped by the sweep's scheduler
# (metrics at a lower budget); diverged: NaN/exploding loss; failed: crashed after its retries.
STATUSES: tuple[str, ...] = ("completed", "pruned", "diverged", "failed")
ERROR_STATUSES: tuple[str, ...] = ("diverged", "failed")  # the only rows with an `error`
STAGES: tuple[str, ...] = ("stage1", "stage2", "stage3")
# Keys of a trial's Ray config that are not TrialConfig fields: stripped before `from_dict`.
META_KEYS: tuple[str, ...] = ("phase", "config_id", "job", PACK_KEY)
FINISHED: tuple[str, ...] = ("TERMINATED", "ERROR")  # Ray trial states after which a trial never runs again
LEAD_COLUMNS: tuple[str, ...] = ("sweep", "dataset", "trial_id", "phase", "status", "seed", "config_id")
RUN_COLUMNS: tuple[str, ...] = ("node_id", "accelerator", "code_version", "torch_version", "ray_version",
                                "optuna_version", "pack_id", "error")
assert not set(META_KEYS) & set(field_names()), "a META key shadows a TrialConfig field"


class RecordError(ValueError):
    """A trial table that cannot be read (missing, truncated or not Parquet); the message says why."""


def columns() -> list[str]:
    config = [f for f in field_names() if f not in LEAD_COLUMNS]
    return [*LEAD_COLUMNS, *config, *(f"val_{m}" for m in METRICS), *(f"test_{m}" for m in METRICS),
            *(f"epochs_{s}" for s in STAGES), *(f"seconds_{s}" for s in STAGES), *RUN_COLUMNS]


def dataset_key(dataset: str) -> str:
    """Short name for ids and folder names: the registry name, or a file's stem."""
    return Path(dataset).stem if ("/" in dataset or dataset.endswith((".pkl", ".txt"))) else dataset


def split_config(config: Mapping[str, Any]) -> tuple[TrialConfig, dict[str, Any]]:
    """A trial's flat Ray config -> (TrialConfig, the sweep's own keys)."""
    meta = {k: config[k] for k in META_KEYS if k in config}
    cfg = TrialConfig.from_dict({k: v for k, v in config.items() if k not in META_KEYS})
    return cfg, meta


def outcome(result: Mapping[str, Any] | None, error: bool) -> str:
    """completed | diverged | pruned | failed, from a Ray trial's last result."""
    if error:
        return "failed"
    if result and result.get("final"):
        return "diverged" if result.get("diverged") else "completed"
    return "pruned"


def trial_row(*, sweep: str, trial_id: str, config: Mapping[str, Any], ray_status: str,
              history: pd.DataFrame | None, fit_result: Mapping[str, Any] | None, error: str | None,
              env: Mapping[str, str], pack_id: str | None = None) -> dict[str, Any] | None:
    """The row of one Ray trial, or None while it is unfinished (PENDING/RUNNING/PAUSED).

    A pruned trial has no fit result: its validation metrics are those of its best reported
    evaluation (at the lower budget it reached) and its test metrics are missing. `error` is kept
    only when the final status is failed or diverged (a trial that crashed, was retried from its
    checkpoint and then completed has no error).
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
                           "config_id": config.get("config_id"), **active_values(cfg)}
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
    for m in METRICS:
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
    row["pack_id"] = pack_id
    row["error"] = (error or f"{status} (no message)") if status in ERROR_STATUSES else None
    return row


def is_pack(config: Mapping[str, Any]) -> bool:
    return PACK_KEY in config


def member_id(pack_id: str, index: int) -> str:
    """The trial id of a pack's member: its row's `trial_id`."""
    return f"{pack_id}-m{index}"


def member_jobs(config: Mapping[str, Any]) -> list[Any]:
    """The job keys a Ray trial runs: its members' for a pack, else its own."""
    if is_pack(config):
        return [m["job"] for m in config[PACK_KEY]]
    return [config.get("job")]


def pack_rows(*, sweep: str, trial_id: str, config: Mapping[str, Any], ray_status: str,
              results: list[Mapping[str, Any]] | None, error: str | None,
              env: Mapping[str, str], progress: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows of one pack trial: one per member, as its solo trial's row would be (none while the
    pack is unfinished). `results` are the members' fit records from the pack's final checkpoint.
    Without them, `progress` (an optimise pack's last `PACK_PROGRESS`) gives what the pack had
    done when it stopped: the records of the members that had finished, and for the others their
    evaluations so far (pruned when the scheduler stopped the pack, failed when it crashed). With
    neither, every member of a finished pack is `failed` with the pack's error."""
    members = config[PACK_KEY]
    assert results is None or len(results) == len(members), f"pack trial {trial_id}: one result per member"
    finished = {int(i): r for i, r in ((progress or {}).get("finished") or {}).items()}
    evaluations = (progress or {}).get("evaluations") or [[] for _ in members]
    if results is None and progress is None and ray_status in FINISHED:  # no records to show: every member failed
        ray_status, error = "ERROR", error or "the pack ended without its members' results"
    rows = []
    for i, member in enumerate(members):
        record = results[i] if results is not None else finished.get(i)
        history = None if record is not None or not evaluations[i] else pd.DataFrame(evaluations[i])
        status = "TERMINATED" if record is not None and ray_status in FINISHED else ray_status
        row = trial_row(sweep=sweep, trial_id=member_id(trial_id, i), config=member["config"], ray_status=status,
                        history=history, fit_result=record, error=error if record is None else None,
                        env=env, pack_id=trial_id)
        if row is not None:
            rows.append(row)
    return rows


def _best_evaluation(history: pd.DataFrame, cfg: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Validation metrics of the best evaluation a stopped trial reported, and its epoch counts."""
    col = f"val_{cfg.get('select_metric', 'NDCG@20')}"
    evals = history[history["final"].fillna(0) != 1] if "final" in history.columns else history
    if col not in evals or evals[col].dropna().empty:
        return {}, {}, {}
    best = evals.loc[evals[col].astype(float).idxmax()]
    last = evals.iloc[-1]
    val = {m: best.get(f"val_{m}") for m in METRICS}
    epoch = int(last.get("epoch", 0) or 0)
    s2 = TrialConfig.from_dict({k: cfg[k] for k in field_names()}).stage_epochs()[1] if cfg.get("model") == "adrec" else 0
    epochs = {"stage1": math.nan, "stage2": min(epoch, s2), "stage3": max(epoch - s2, 0)}
    return val, epochs, {}


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows -> the table, in the record's column order, sorted by phase, dataset, config, seed."""
    df = pd.DataFrame(list(rows), columns=columns())
    order = {p: i for i, p in enumerate(PHASES)}
    if len(df):
        df = df.assign(_o=df["phase"].map(order)).sort_values(["_o", "dataset", "config_id", "seed", "trial_id"],
                                                                kind="stable").drop(columns="_o")
    return df.reset_index(drop=True)


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Replace the table atomically and durably: temp file, fsync, os.replace, fsync the folder."""
    write_atomic(Path(path), lambda tmp: df.to_parquet(tmp, index=False))


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """The table at `path` (an empty one when there is no file); RecordError if it cannot be read."""
    path = Path(path)
    if not path.exists():
        return to_frame([])
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for truncated or foreign files
        raise RecordError(f"{path} is not a readable Parquet trial table ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it may be truncated by a "
                          "crash or a full disk: the sweep rebuilds it from its experiment folders "
                          "(`python sweeps/run.py --resume --name NAME`)") from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically and durably (never a half-written file under the final name)."""
    text = json.dumps(data, indent=1, default=str)
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_atomic(path: Path, write: Any) -> None:
    """`write(tmp_path)` then fsync and rename over `path`; the temp file is removed on any error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
