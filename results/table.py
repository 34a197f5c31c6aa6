"""Reading and checking a sweep's trial table (`runs/<sweep>/trials.parquet`, one row per trial).

The contract is DESIGN.md, "The trial record". Everything here is a pure function of the table
except `load_table`. Problems a user can fix are `TableError`s whose message names what is wrong
and what to do; degenerate but usable input is a warning.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from adrec.config import METRICS, TrialConfig
from adrec.record import ERROR_STATUSES, PHASES, STATUSES, RecordError, read_table
from results.knobs import KNOB_NAMES, KNOBS, Knob, active, default_of, fmt_value

REQUIRED_COLUMNS: tuple[str, ...] = ("dataset", "trial_id", "phase", "status", "seed")
DEFAULT_METRIC = f"val_{TrialConfig().select_metric}"
__all__ = ["ERROR_STATUSES", "PHASES", "STATUSES", "TableError", "check_table", "load_table"]


class TableError(RecordError):
    """The trial table cannot be analysed; the message says why and how to fix it."""


def cost_metrics(metric: str) -> tuple[str, ...]:
    """What a choice costs, on the test split: every test metric at the objective's cut-off."""
    cutoff = metric.rsplit("@", 1)[-1] if "@" in metric else "20"
    return tuple(f"test_{m}" for m in METRICS if m.endswith(f"@{cutoff}"))


def load_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise TableError(f"no trial table at {path}; run the sweep first or pass the folder that "
                         "holds trials.parquet")
    try:
        return read_table(path)
    except RecordError as err:
        raise TableError(str(err)) from None


def check_table(table: pd.DataFrame, metric: str = DEFAULT_METRIC) -> pd.DataFrame:
    """Validate the table and return a normalised copy (config_id filled, model defaulted).

    Raises TableError for missing required columns, unknown phase/status values, no knob column
    at all, or no completed ADRec trial with a value for `metric`.
    """
    required = (*REQUIRED_COLUMNS, metric)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise TableError(
            f"trial table is missing required column(s) {', '.join(map(repr, missing))}; a report "
            f"needs {', '.join(REQUIRED_COLUMNS)} and the objective column {metric!r} "
            f"(choose another with --metric); columns present: {', '.join(map(str, table.columns))}"
        )
    if not any(name in table.columns for name in KNOB_NAMES):
        raise TableError(f"trial table has none of the knob columns {', '.join(KNOB_NAMES)}; "
                         "it must hold one column per TrialConfig field")
    for column, allowed in (("phase", PHASES), ("status", STATUSES)):
        bad = sorted(set(table[column].dropna().astype(str)) - set(allowed))
        if bad:
            raise TableError(f"{column} value(s) {', '.join(map(repr, bad))} not one of "
                             f"{', '.join(allowed)}")
    if not pd.api.types.is_numeric_dtype(table[metric]):
        raise TableError(f"objective column {metric!r} has dtype {table[metric].dtype}; "
                         "it must hold numbers (metrics as fractions)")
    out = table.copy()
    if "model" not in out:
        out["model"] = "adrec"
    out["model"] = out["model"].fillna("adrec").astype(str)
    out["dataset"] = out["dataset"].astype(str)
    if out["trial_id"].duplicated().any():
        n = int(out["trial_id"].duplicated().sum())
        warnings.warn(f"{n} duplicated trial_id row(s); keeping the last of each", stacklevel=2)
        out = out.drop_duplicates("trial_id", keep="last")
    out = with_config_id(out)
    if adrec_rows(out, metric).empty:
        counts = ", ".join(f"{k}={v}" for k, v in out["status"].value_counts().sort_index().items())
        raise TableError(
            f"no completed ADRec trial with a value for {metric!r} (rows by status: "
            f"{counts or 'none'}); a report needs at least one completed trial"
        )
    if metric.startswith("test_"):
        warnings.warn(f"objective {metric!r} is a test metric: selecting on the test split makes "
                      "the reported test numbers optimistic; prefer a val_ metric", stacklevel=2)
    return out.reset_index(drop=True)


def with_config_id(table: pd.DataFrame) -> pd.DataFrame:
    """Fill missing `config_id`s with a hash of what a config is: the model and every knob."""
    out = table.copy()
    columns = [c for c in ("model", *KNOB_NAMES) if c in out.columns]
    if "config_id" not in out:
        out["config_id"] = pd.NA
    missing = out["config_id"].isna()
    if missing.any():
        out["config_id"] = out["config_id"].astype("object")
        out.loc[missing, "config_id"] = [
            _hash_row(row) for row in out.loc[missing, columns].itertuples(index=False)
        ]
    out["config_id"] = out["config_id"].astype(str)
    return out


def _hash_row(values: tuple) -> str:
    plain = [None if _isna(v) else (v.item() if isinstance(v, np.generic) else v) for v in values]
    return hashlib.sha1(json.dumps(plain, default=str).encode()).hexdigest()[:12]


def _isna(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def adrec_rows(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Completed ADRec (non-baseline) trials with a value for `metric`: the only rows ranked."""
    keep = ((table["status"] == "completed") & (table["model"] == "adrec")
            & (table["phase"] != "baseline") & table[metric].notna())
    return table[keep]


def analysed_rows(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows importance and cross-dataset comparisons use: completed *paired* ADRec trials.

    Paired configs ran on every dataset without early stopping, so their levels are comparable.
    Without a paired phase, fall back to every completed ADRec trial, with a warning: a sampler's
    choices are not a design, so level means are then biased towards where it searched.
    """
    rows = adrec_rows(table, metric)
    paired = rows[rows["phase"] == "paired"]
    if paired.empty:
        warnings.warn("no completed paired trial: importance and level statistics use the "
                      "optimize/confirm trials, which the sampler chose (biased towards good "
                      "regions); run a paired phase for a fair comparison", stacklevel=2)
        return rows
    return paired


def config_means(rows: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One unit per (dataset, config_id): metrics averaged over seeds, knob values, n_seeds.

    Repeats of one config are not independent draws of the design, so statistics over configs
    bootstrap these units, not the rows.
    """
    knobs = [k for k in KNOB_NAMES if k in rows.columns]
    present = [m for m in metrics if m in rows.columns]
    grouped = rows.groupby(["dataset", "config_id"], sort=True)
    units = grouped[present].mean()
    units["n_seeds"] = grouped.size()
    # first(), not a mean: a knob that is null where inactive stays null (first() skips nulls
    # only within a group, and a config's knobs are the same in every seed)
    firsts = grouped[knobs].first()
    return units.join(firsts).reset_index()


def knob_status(table: pd.DataFrame) -> tuple[list[Knob], pd.DataFrame]:
    """Split the knobs into those that vary in `table` and the fixed ones (with their value)."""
    varying, fixed = [], []
    for knob in KNOBS:
        if knob.name not in table.columns:
            fixed.append((knob.name, "not in table"))
            continue
        values = table.loc[active(table, knob), knob.name]
        distinct = values.astype(str).unique()
        if len(distinct) >= 2:
            varying.append(knob)
        elif len(distinct) == 1:
            fixed.append((knob.name, f"fixed at {fmt_value(values.iloc[0])}"))
        else:
            fixed.append((knob.name, f"never active (needs {knob.describe_when()})"))
    frame = pd.DataFrame(fixed, columns=["knob", "setting"])
    frame["default"] = [fmt_value(default_of(k)) for k in frame["knob"]]
    return varying, frame


def noise_floor(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Seed-noise floor per dataset: pooled standard deviation of `metric` over repeats.

    Repeats are completed ADRec runs of the same config_id on the same dataset with different
    seeds (any phase). sd = sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)): the spread that changing
    only the seed gives one run. NaN, with a warning, where a dataset has no repeat.
    """
    out = []
    for dataset, part in rows.groupby("dataset", sort=True):
        groups = part.groupby("config_id")
        n = groups["seed"].nunique()
        var = groups[metric].var(ddof=1)
        keep = (n >= 2) & var.notna()
        dof = float((groups.size()[keep] - 1).sum())
        sd = float(np.sqrt((var[keep] * (groups.size()[keep] - 1)).sum() / dof)) if dof else np.nan
        if not dof:
            warnings.warn(f"dataset {dataset!r} has no config repeated with different seeds: its "
                          "seed-noise floor is unknown, so effects there are judged by their "
                          "interval only", stacklevel=2)
        out.append({"dataset": dataset, "repeated_configs": int(keep.sum()),
                    "runs": int(groups.size()[keep].sum()), "dof": int(dof), "noise_sd": sd})
    return pd.DataFrame(out, columns=["dataset", "repeated_configs", "runs", "dof", "noise_sd"])
