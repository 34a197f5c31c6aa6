"""Trial rows from Ray experiment folders (the row itself, the columns and the file are `adrec.record`).

`build_rows(experiment_dirs)` is the one function that turns Ray's folders into rows; the sweep
driver uses it at phase boundaries and at the end, and the progress callback uses
`record.trial_row` for one trial as it finishes.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd

from adrec.record import (FINISHED, FIT_RESULT, PACK_PROGRESS, PACK_RESULTS, TABLE_FILE, RecordError, columns, is_pack, pack_rows,
                          read_table, to_frame, trial_row, write_table)

log = logging.getLogger("sweeps.table")


def versions() -> dict[str, str]:
    import optuna
    import ray
    import torch

    from adrec.train import code_version

    return {"code_version": code_version(), "torch_version": torch.__version__, "ray_version": ray.__version__,
            "optuna_version": optuna.__version__}


def read_checkpoint_json(trial_dir: str | os.PathLike, name: str) -> Any:
    """`name` from the trial's last checkpoint, or None: FIT_RESULT (a solo trial's fit record; None
    for pruned/failed), PACK_RESULTS (a finished pack's member records, in order), PACK_PROGRESS (an
    optimise pack's state at its last report)."""
    found = sorted(Path(trial_dir).glob(f"checkpoint_*/{name}"))
    return json.loads(found[-1].read_text()) if found else None


def read_error(trial_dir: str | os.PathLike) -> str | None:
    path = Path(trial_dir) / "error.txt"
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text(errors="replace").strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "error"


def build_rows(experiment_dirs: Iterable[str | os.PathLike], env: Mapping[str, str] | None = None,
               sweep: str | None = None) -> pd.DataFrame:
    """One row per finished trial of the given Ray experiment folders (deduplicated by trial_id); a
    pack trial gives one row per member (`adrec.record.pack_rows`).

    The sweep name is `sweep`, else the name of each experiment folder's parent
    (`<storage>/<sweep>/<phase>`; a sweep on a URI reads a local mirror whose name is not the sweep's).
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
            if is_pack(trial.config):  # one row per member, each with its own id
                for row in pack_rows(sweep=sweep or exp.parent.name, trial_id=trial.trial_id, config=trial.config,
                                     ray_status=trial.status, results=read_checkpoint_json(trial_dir, PACK_RESULTS),
                                     error=read_error(trial_dir), env=env,
                                     progress=read_checkpoint_json(trial_dir, PACK_PROGRESS)):
                    rows[row["trial_id"]] = row
                continue
            row = trial_row(sweep=sweep or exp.parent.name, trial_id=trial.trial_id, config=trial.config,
                            ray_status=trial.status, history=frames.get(trial.trial_id),
                            fit_result=read_checkpoint_json(trial_dir, FIT_RESULT), error=read_error(trial_dir), env=env)
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


__all__ = ["FINISHED", "FIT_RESULT", "TABLE_FILE", "RecordError", "build_rows", "columns", "quiet_analysis", "read_error",
           "read_checkpoint_json", "read_table", "to_frame", "trial_row", "versions", "write_table"]
