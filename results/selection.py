"""What choosing a config is worth once the choice itself is accounted for.

- `config_regret`: one universal paired config against each dataset's best paired config. Both are
  picked on the same runs they are scored on (winner's curse: the best of n noisy means is too
  good). The whole selection is therefore re-run inside a parametric bootstrap of the seed noise
  (each config mean redrawn with the dataset's seed-noise sd / sqrt(seeds)):
  * under the least favourable truth, every config tied on every dataset, the regret that
    selection produces by chance (`tie_q95`): a regret counts as real only above it and above
    the seed-noise floor;
  * around the observed means, its optimism (apparent minus bootstrap-true regret of the chosen
    config), subtracted to give `regret_corrected` with a 95% interval.
- `expected_max`: expected best validation score against the number of trials (Dodge et al.,
  EMNLP 2019, "Show your work"), from the paired runs.
- `default_vs_tuned`: the authors' default config against the tuned best, per dataset, with a
  non-inferiority test (one-sided Welch, margin = the metric's seed-noise floor).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats as sps

from results.effects import ALPHA, rng_for
from results.knobs import KNOBS, active

CHUNK = 200  # bootstrap draws per vectorised block (bounds memory at 960 configs x 6 datasets)


def _select(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(universal index per draw, best index per draw and dataset) for Y of shape (B, n, D)."""
    best = Y.max(axis=1, keepdims=True)
    rel = (best - Y) / np.where(np.abs(best) > 0, np.abs(best), 1.0)
    return rel.mean(axis=2).argmin(axis=1), Y.argmax(axis=1)


def config_regret(units: pd.DataFrame, metric: str, noise: pd.DataFrame,
                  cost_metrics: list[str], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per dataset: best and universal config, observed and selection-corrected regret, what a
    tie gives, and whether the regret is within noise (module docstring)."""
    wide = units.pivot_table(index="config_id", columns="dataset", values=metric)
    seeds = units.pivot_table(index="config_id", columns="dataset", values="n_seeds")
    common = wide.dropna()
    columns = ["dataset", "best_config", "best", "universal_config", "universal", "regret",
               "regret_corrected", "ci_low", "ci_high", "tie_mean", "tie_q95", "noise_floor",
               "within_noise", *(f"cost_{m}" for m in cost_metrics)]
    if len(common) < 2:
        warnings.warn("fewer than 2 paired configs completed on every dataset: no universal "
                      "config", stacklevel=2)
        return pd.DataFrame(columns=columns)
    datasets = list(common.columns)
    Y = common.to_numpy(float)
    floors = noise.set_index("dataset")["noise_sd"].reindex(datasets).to_numpy(float)
    sd = np.where(np.isfinite(floors), floors, 0.0) / np.sqrt(seeds.loc[common.index,
                                                                        datasets].to_numpy(float))
    universal, best = _select(Y[None])
    u, b = int(universal[0]), best[0]
    regret = Y[b, np.arange(len(datasets))] - Y[u]
    rng = rng_for(seed, "config_regret")
    tie, optimism = [], []
    for start in range(0, n_boot, CHUNK):
        size = min(CHUNK, n_boot - start)
        eps = rng.standard_normal((size, *Y.shape)) * sd
        tied = Y.mean(axis=0) + eps  # every config equal on each dataset
        tu, tb = _select(tied)
        rows = np.arange(size)[:, None]
        cols = np.arange(len(datasets))[None]
        tie.append(tied[rows, tb, cols] - tied[rows, tu[:, None], cols])
        world = Y + eps  # the observed means play the truth
        wu, wb = _select(world)
        apparent = world[rows, wb, cols] - world[rows, wu[:, None], cols]
        true = Y.max(axis=0)[None] - Y[wu]
        optimism.append(apparent - true)
    tie_arr, opt_arr = np.vstack(tie), np.vstack(optimism)
    indexed = units.set_index(["dataset", "config_id"])
    rows_out = []
    for d, dataset in enumerate(datasets):
        corrected = regret[d] - opt_arr[:, d].mean()
        lo, hi = np.quantile(regret[d] - opt_arr[:, d], [ALPHA / 2, 1 - ALPHA / 2])
        q95 = float(np.quantile(tie_arr[:, d], 1 - ALPHA))
        floor = floors[d]
        real = regret[d] > q95 and (np.isnan(floor) or regret[d] > floor)
        row = {"dataset": dataset, "best_config": common.index[b[d]], "best": Y[b[d], d],
               "universal_config": common.index[u], "universal": Y[u, d], "regret": regret[d],
               "regret_corrected": max(0.0, corrected), "ci_low": max(0.0, lo),
               "ci_high": max(0.0, hi), "tie_mean": float(tie_arr[:, d].mean()), "tie_q95": q95,
               "noise_floor": floor, "within_noise": not real}
        for m in cost_metrics:
            if m in indexed:
                row[f"cost_{m}"] = float(indexed.loc[(dataset, common.index[b[d]]), m]
                                         - indexed.loc[(dataset, common.index[u]), m])
        rows_out.append(row)
    return pd.DataFrame(rows_out, columns=columns)


def expected_max(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Dodge et al.'s expected maximum validation score of k random trials (drawn with
    replacement from the paired runs), with its standard deviation, per dataset."""
    out = []
    for dataset, part in rows.groupby("dataset", sort=True):
        v = np.sort(part[metric].dropna().to_numpy(float))
        n = len(v)
        if not n:
            continue
        i = np.arange(1, n + 1)
        ks = sorted({k for k in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000, 2000, 5000)
                     if k <= n} | {n})
        for k in ks:
            p = (i / n) ** k - ((i - 1) / n) ** k
            mean = float(p @ v)
            sd = float(np.sqrt(max(0.0, p @ v ** 2 - mean ** 2)))
            out.append({"dataset": dataset, "trials": k, "expected_max": mean, "sd": sd,
                        "runs": n})
    return pd.DataFrame(out, columns=["dataset", "trials", "expected_max", "sd", "runs"])


def default_runs(rows: pd.DataFrame, varying: list[str]) -> pd.Series:
    """Mask of runs whose varying knobs are all at the authors' default (inactive ones null)."""
    mask = pd.Series(True, index=rows.index)
    defaults = {k.name: k.default for k in KNOBS}
    for knob in KNOBS:
        if knob.name not in varying or knob.name not in rows:
            continue
        on = active(rows, knob)
        if not knob.is_active(defaults):
            mask &= ~on
            continue
        values = rows[knob.name]
        if isinstance(knob.default, (int, float)) and not isinstance(knob.default, bool):
            same = np.isclose(pd.to_numeric(values, errors="coerce").astype(float), knob.default,
                              rtol=1e-9)
        else:
            same = values.astype(str) == str(knob.default)
        mask &= on & same
    return mask


def default_vs_tuned(table: pd.DataFrame, best: pd.DataFrame, varying: list[str],
                     metrics: list[str], noise_by_metric: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (dataset, metric): default mean, tuned mean, gap = tuned - default with a one-sided
    95% upper bound (Welch), and whether the default is non-inferior (upper bound < margin)."""
    done = table[(table["status"] == "completed") & (table["model"] == "adrec")
                 & (table["phase"] != "baseline")]
    is_default = default_runs(done, varying)
    rows = []
    for _, b in best.iterrows():
        dataset = b["dataset"]
        part = done[done["dataset"] == dataset]
        tuned = part[part["config_id"] == b["config_id"]]
        if b.get("confirmed", False):
            tuned = tuned[tuned["phase"] == "confirm"]
        base = part[is_default.loc[part.index]]
        for m in metrics:
            floors = noise_by_metric.get(m, pd.DataFrame(columns=["dataset", "noise_sd"]))
            margin = float(floors.set_index("dataset")["noise_sd"].get(dataset, np.nan))
            row = {"dataset": dataset, "metric": m, "default_runs": len(base),
                   "tuned_config": b["config_id"], "tuned_runs": len(tuned), "margin": margin}
            t, d = tuned[m].dropna().to_numpy(float), base[m].dropna().to_numpy(float)
            if len(d) == 0:
                rows.append({**row, "tuned_mean": t.mean() if len(t) else np.nan,
                             "verdict": "no run of the authors' default config (run the "
                                        "`paper` space on this dataset)"})
                continue
            gap = t.mean() - d.mean()
            upper, how = gap_upper_bound(t, d, margin)
            if np.isnan(upper) or np.isnan(margin):
                verdict = "too few runs for a test"
            elif upper < margin:
                verdict = f"default non-inferior: tuned gains at most {upper:.4g} < margin {margin:.4g}{how}"
            else:
                verdict = f"tuning helps or cannot be ruled out: gain up to {upper:.4g} >= margin {margin:.4g}{how}"
            rows.append({**row, "default_mean": d.mean(), "tuned_mean": t.mean(), "gap": gap,
                         "gap_upper": upper, "non_inferior": bool(upper < margin)
                         if np.isfinite(upper) and np.isfinite(margin) else pd.NA,
                         "verdict": verdict})
    columns = ["dataset", "metric", "default_runs", "default_mean", "tuned_config", "tuned_runs",
               "tuned_mean", "gap", "gap_upper", "margin", "non_inferior", "verdict"]
    out = pd.DataFrame(rows).reindex(columns=columns)
    out["non_inferior"] = out["non_inferior"].astype("boolean")
    return out


def gap_upper_bound(tuned: np.ndarray, default: np.ndarray, seed_sd: float) -> tuple[float, str]:
    """One-sided 95% upper bound of mean(tuned) - mean(default): Welch's t with two runs or more on
    each side; with fewer, a z bound that takes the sweep's pooled one-run seed sd as known (a
    smoke sweep confirms each config with one seed). Returns (bound, a note naming the fallback)."""
    gap = tuned.mean() - default.mean()
    vt = tuned.var(ddof=1) / len(tuned) if len(tuned) > 1 else np.nan
    vd = default.var(ddof=1) / len(default) if len(default) > 1 else np.nan
    if np.isfinite(vt) and np.isfinite(vd) and vt + vd > 0:
        dof = (vt + vd) ** 2 / (vt ** 2 / (len(tuned) - 1) + vd ** 2 / (len(default) - 1))
        return gap + sps.t.ppf(1 - ALPHA, dof) * np.sqrt(vt + vd), ""
    if not np.isfinite(seed_sd):
        return np.nan, ""
    se = seed_sd * np.sqrt(1 / len(tuned) + 1 / len(default))
    return gap + sps.norm.ppf(1 - ALPHA) * se, " (too few runs for Welch: the pooled seed sd taken as known)"


def best_knob_values(best: pd.DataFrame) -> pd.DataFrame:
    """The best configs' knob values, one column per dataset (the report's answer section)."""
    rows = {}
    for _, b in best.iterrows():
        values = dict(item.split("=", 1) for item in str(b.get("knobs", "")).split(", ") if "=" in item)
        rows[b["dataset"]] = values
    frame = pd.DataFrame(rows)
    frame.index.name = "knob"
    return frame.reset_index()

