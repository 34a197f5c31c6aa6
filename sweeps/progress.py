"""Live progress: a Tune callback that records each finished trial in the table and prints a line.

Ray's own CLI reporter is silenced (verbose=0); this callback prints one line per finished trial
with the per-dataset counts (running / finished / pruned) and the best validation value so far,
replaces `trials.parquet` atomically after every finished trial, and keeps `progress.json`
(counts per phase and dataset) up to date for scripts and tests that watch a running sweep.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from sweeps.plan import write_json
from sweeps.searchers import dataset_key, read_runtime
from sweeps.spaces import BASELINES
from sweeps.table import TABLE_FILE, read_error, read_fit_result, read_table, to_frame, trial_row, write_table
from sweeps.trainable import FIT_RESULT

log = logging.getLogger("sweeps.progress")
PROGRESS_FILE = "progress.json"


class SweepProgress(tune.Callback):
    """Pickled into tuner.pkl with its phase; everything else is re-read when a run (re)starts."""

    def __init__(self, sweep_dir: str, sweep: str, phase: str, env: dict[str, str]) -> None:
        self.sweep_dir, self.sweep, self.phase, self.env = sweep_dir, sweep, phase, dict(env)
        self._reset()

    def _reset(self) -> None:
        self._rows: dict[str, dict[str, Any]] | None = None
        self._running: dict[str, str] = {}  # trial_id -> dataset
        self._quiet = False

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def table_path(self) -> Path:
        return Path(self.sweep_dir) / TABLE_FILE

    def rows(self) -> dict[str, dict[str, Any]]:
        if self._rows is None:
            df = read_table(self.table_path)
            self._rows = {r["trial_id"]: r for r in df.to_dict("records")}
            self._quiet = bool(read_runtime(self.sweep_dir).get("quiet"))
        return self._rows

    # --- Tune callback hooks -------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self.rows()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._running[trial.trial_id] = trial.config.get("dataset", "")
        self._write_progress()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "ERROR")

    # --- internals -----------------------------------------------------------------------------
    def _finish(self, trial: Any, ray_status: str) -> None:
        self._running.pop(trial.trial_id, None)
        try:
            row = trial_row(sweep=self.sweep, trial_id=trial.trial_id, config=trial.config, ray_status=ray_status,
                            history=_history(trial), fit_result=_fit_result(trial),
                            error=read_error(trial.local_path) if trial.local_path else None, env=self.env)
        except Exception:  # noqa: BLE001 - a bad row must not stop the sweep; build_rows redoes it at the end
            log.exception("could not build the table row of trial %s", trial.trial_id)
            return
        if row is None:
            return
        rows = self.rows()
        rows[trial.trial_id] = row
        write_table(to_frame(rows.values()), self.table_path)
        self._write_progress()
        if not self._quiet:
            print(self._line(row), flush=True)

    def _counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {}
        for row in self.rows().values():
            out.setdefault(str(row["dataset"]), Counter())[str(row["status"])] += 1
        for ds in self._running.values():
            out.setdefault(str(ds), Counter())["running"] += 1
        return {ds: dict(c) for ds, c in out.items()}

    def _write_progress(self) -> None:
        rows = self.rows().values()
        by_phase = Counter(str(r["phase"]) for r in rows)
        state = {"phase": self.phase, "running": len(self._running), "finished": len(self.rows()),
                 "by_phase": dict(by_phase), "by_dataset": self._counts()}
        write_json(Path(self.sweep_dir) / PROGRESS_FILE, state)

    def _line(self, row: dict[str, Any]) -> str:
        metric = f"val_{row.get('select_metric') or 'NDCG@20'}"
        ds = str(row["dataset"])
        done = [r for r in self.rows().values() if str(r["dataset"]) == ds and r["status"] == "completed"
                and isinstance(r.get(metric), float) and not math.isnan(r[metric])]
        best = max((r[metric] for r in done), default=math.nan)
        c = self._counts().get(ds, {})
        value = row.get(metric)
        shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else "-"
        return (f"[{row['phase']:>8} {dataset_key(ds):>8}] {row['trial_id']} {row['config_id']} seed={row['seed']} "
                f"{row['status']:<9} {metric}={shown} | best {best:.4f} | running {c.get('running', 0)}, "
                f"completed {c.get('completed', 0)}, pruned {c.get('pruned', 0)}, "
                f"diverged {c.get('diverged', 0)}, failed {c.get('failed', 0)}")


def _history(trial: Any) -> pd.DataFrame:
    """The trial's reported results (result.json in the driver's copy of the trial folder)."""
    path = Path(trial.local_path or "") / "result.json"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows and trial.last_result:
        rows = [trial.last_result]
    return pd.DataFrame(rows)


def _fit_result(trial: Any) -> dict[str, Any] | None:
    ckpt = trial.checkpoint
    if ckpt is None:
        return None
    try:
        with ckpt.as_directory() as d:
            path = Path(d) / FIT_RESULT
            return json.loads(path.read_text()) if path.exists() else None
    except Exception:  # noqa: BLE001 - fall back to the storage copy
        return read_fit_result(trial.path) if trial.path else None


def best_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best configuration per dataset: confirm rows when there are any (mean over seeds), else the best
    completed ADRec row; with the baselines' value beside it."""
    rows = []
    col = f"val_{metric}"
    test_col = f"test_{metric}"
    for ds, part in df.groupby("dataset", sort=True):
        done = part[part["status"] == "completed"]
        adrec = done[done["model"] == "adrec"]
        confirm = adrec[adrec["phase"] == "confirm"]
        pool = confirm if len(confirm) else adrec
        entry: dict[str, Any] = {"dataset": dataset_key(str(ds))}
        if len(pool):
            means = pool.groupby("config_id")[[col, test_col]].mean()
            best_id = means[col].idxmax()
            entry.update(config_id=best_id, seeds=int((pool["config_id"] == best_id).sum()),
                         val=float(means.loc[best_id, col]), test=float(means.loc[best_id, test_col]),
                         source="confirm" if len(confirm) else "best single run")
        for b in BASELINES:
            base = done[done["model"] == b]
            if len(base):
                entry[f"{b}_test"] = float(base[test_col].mean())
        rows.append(entry)
    return pd.DataFrame(rows)
