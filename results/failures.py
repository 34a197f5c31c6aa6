"""Runs that did not finish, by knob level: a level that diverges is a finding, not a gap.

Every paired ADRec run counts here, whatever its status (the metric analysis sees only the
completed ones, so a level that often diverges is also analysed on its survivors). A level is
flagged when its diverged-or-failed rate is at least MIN_RATE, with at least MIN_BAD such runs,
and Fisher's exact test (one-sided, the level against the knob's other levels on that dataset)
rejects at 5% after Bonferroni over every level tested on the dataset; levels are flagged one at
a time, the strongest first, each round without the runs of the levels already flagged.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact

from adrec.record import ERROR_STATUSES
from results.effects import ALPHA
from results.knobs import Levels, active, by_name

MIN_RATE = 0.10
MIN_BAD = 3


def label_runs(runs: pd.DataFrame, levels: Levels) -> pd.Series:
    """The level of each run (NA where the knob is inactive), for any rows, not only units."""
    knob = by_name(levels.knob)
    on = active(runs, knob)
    out = pd.Series(pd.NA, index=runs.index, dtype="string")
    out[on] = levels.label_values(runs.loc[on, knob.name])
    return out


def _fisher(bad: np.ndarray, at: np.ndarray, on: np.ndarray) -> float:
    """One-sided Fisher p-value: more failures at the level than at the knob's other levels."""
    k, n = int(bad[at].sum()), int(at.sum())
    rest = on & ~at
    rk, rn = int(bad[rest].sum()), int(rest.sum())
    if not rn:
        return 1.0
    return float(fisher_exact([[k, n - k], [rk, rn - rk]], alternative="greater").pvalue)


def failure_rates(runs: pd.DataFrame, levels: dict[str, Levels]) -> pd.DataFrame:
    """Per (knob, dataset, level): runs, diverged, failed, their rates and the flag.

    Flags are given one at a time, the strongest first, and the runs of a flagged level are set
    aside before the next round: a knob that only co-occurs with a failing level (a Transformer
    denoiser with adaln aggregation) is not flagged for failures that level explains.
    """
    rows = []
    for dataset, part in runs.groupby("dataset", sort=True):
        bad = part["status"].isin(ERROR_STATUSES).to_numpy()
        block, cells = [], []
        for name, lev in levels.items():
            labels = label_runs(part, lev)
            on = labels.notna().to_numpy(bool)
            for level in lev.order:
                at = (labels == level).fillna(False).to_numpy(bool)
                if not at.any():
                    continue
                status = part.loc[at, "status"]
                cells.append((name, level, at, on))
                block.append({"knob": name, "dataset": dataset, "level": level,
                              "runs": int(at.sum()),
                              "completed": int((status == "completed").sum()),
                              "diverged": int((status == "diverged").sum()),
                              "failed": int((status == "failed").sum()),
                              "bad_rate": float(bad[at].mean()),
                              "p_value": _fisher(bad, at, on), "flagged": False})
        tests = max(1, len(block))
        keep = np.ones(len(part), dtype=bool)  # runs not yet explained by a flagged level
        while True:
            best, best_p = None, ALPHA / tests
            for i, (_, _, at, on) in enumerate(cells):
                if block[i]["flagged"]:
                    continue
                here = at & keep
                n_bad = int(bad[here].sum())
                if n_bad < MIN_BAD or not here.any() or bad[here].mean() < MIN_RATE:
                    continue
                p = _fisher(bad, here, on & keep)
                if p < best_p:
                    best, best_p = i, p
            if best is None:
                break
            block[best]["flagged"] = True
            keep &= ~cells[best][2]
        for row in block:
            row["diverged_rate"] = row["diverged"] / row["runs"]
            row["failed_rate"] = row["failed"] / row["runs"]
        rows += block
    columns = ["knob", "dataset", "level", "runs", "completed", "diverged", "failed",
               "diverged_rate", "failed_rate", "bad_rate", "p_value", "flagged"]
    return pd.DataFrame(rows, columns=columns)


def describe(row: pd.Series) -> str:
    """'adaln diverges in 54% of yelp runs (13 of 24)'."""
    verb = "diverges" if row["diverged"] >= row["failed"] else "fails"
    count = row["diverged"] if verb == "diverges" else row["failed"]
    return (f"{row['level']} {verb} in {count / row['runs']:.0%} of {row['dataset']} runs "
            f"({count} of {row['runs']})")


def flagged_text(rates: pd.DataFrame, knob: str) -> list[str]:
    part = rates[(rates["knob"] == knob) & rates["flagged"]]
    return [describe(r) for _, r in part.iterrows()]

