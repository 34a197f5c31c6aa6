"""Runs that did not finish, by knob level: a level that diverges is a finding, not a gap.

Every paired ADRec run counts here, whatever its status (the metric analysis sees only the
completed ones, so a level that often diverges is also analysed on its survivors). A level is
flagged when its diverged-or-failed rate is at least MIN_RATE, with at least MIN_BAD such runs,
and Fisher's exact test (one-sided, the level against the knob's other levels on that dataset)
rejects at 5% after Bonferroni over every level tested on the dataset.
"""
from __future__ import annotations

import pandas as pd
from scipy.stats import fisher_exact

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


def failure_rates(runs: pd.DataFrame, levels: dict[str, Levels]) -> pd.DataFrame:
    """Per (knob, dataset, level): runs, diverged, failed, their rates and the flag."""
    rows = []
    for dataset, part in runs.groupby("dataset", sort=True):
        bad_all = part["status"].isin(["diverged", "failed"]).to_numpy()
        block = []
        for name, lev in levels.items():
            labels = label_runs(part, lev)
            for level in lev.order:
                at = (labels == level).fillna(False).to_numpy()
                if not at.any():
                    continue
                on = labels.notna().to_numpy()
                bad, n = int(bad_all[at].sum()), int(at.sum())
                rest_bad, rest_n = int(bad_all[on & ~at].sum()), int((on & ~at).sum())
                p = fisher_exact([[bad, n - bad], [rest_bad, rest_n - rest_bad]],
                                 alternative="greater").pvalue if rest_n else 1.0
                status = part.loc[at, "status"]
                block.append({"knob": name, "dataset": dataset, "level": level, "runs": n,
                              "completed": int((status == "completed").sum()),
                              "diverged": int((status == "diverged").sum()),
                              "failed": int((status == "failed").sum()),
                              "bad_rate": bad / n, "p_value": float(p)})
        tests = max(1, len(block))
        for row in block:
            bad = row["diverged"] + row["failed"]
            row["flagged"] = bool(row["bad_rate"] >= MIN_RATE and bad >= MIN_BAD
                                  and row["p_value"] < ALPHA / tests)
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

