"""Across datasets: do best values agree, do configs rank alike, what does one setting cost.

Pure DataFrame -> DataFrame functions over the per-config units (`table.config_means`), the
per-level statistics and the per-dataset effects (`stats`). Tunability follows Probst, Boulesteix
& Bischl (JMLR 2019, "Tunability: importance of hyperparameters of machine learning
algorithms"): the universal default is the value that is best on average over datasets, and a
knob's tunability on a dataset is what tuning that knob alone gains over the default there.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from results.knobs import KNOBS, Knob, make_levels
from results.stats import (ALPHA, MIN_UNITS_PER_LEVEL, contrast, decide, level_boots, rng_for)

NOT_COVERED = "not covered by this sweep"
MIN_COMMON_CONFIGS = 3  # Kendall's tau on fewer common configs is not a correlation


def best_level_agreement(effects: pd.DataFrame) -> pd.DataFrame:
    """Per knob: the best level on each dataset, where the knob matters, and whether the best
    levels agree among the datasets where it matters (NA when it matters on fewer than two)."""
    rows = []
    for knob, part in effects.groupby("knob", sort=False):
        mattering = part[part["matters"].astype(bool)]
        bests = set(mattering["best_level"])
        row = {"knob": knob,
               "matters_on": ", ".join(mattering["dataset"]),
               "agrees": pd.NA if len(mattering) < 2 else len(bests) == 1}
        row.update({f"best_{d}": b for d, b in zip(part["dataset"], part["best_level"])})
        rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty:
        out["agrees"] = out["agrees"].astype("boolean")
    return out


def kendall_matrix(units: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kendall's tau between datasets of the per-config mean metric, over their common configs.

    Returns (matrix datasets x datasets, long table with n_common and the p-value).
    """
    wide = units.pivot_table(index="config_id", columns="dataset", values=metric)
    datasets = list(wide.columns)
    matrix = pd.DataFrame(np.eye(len(datasets)), index=datasets, columns=datasets)
    rows = []
    for i, a in enumerate(datasets):
        for b in datasets[i + 1:]:
            both = wide[[a, b]].dropna()
            if len(both) < MIN_COMMON_CONFIGS:
                warnings.warn(f"datasets {a!r} and {b!r} share {len(both)} completed paired "
                              f"configs; Kendall's tau needs at least {MIN_COMMON_CONFIGS}",
                              stacklevel=2)
                tau, p = np.nan, np.nan
            else:
                res = kendalltau(both[a], both[b])
                tau, p = float(res.statistic), float(res.pvalue)
            matrix.loc[a, b] = matrix.loc[b, a] = tau
            rows.append({"dataset_a": a, "dataset_b": b, "n_common": len(both), "tau": tau,
                         "p_value": p})
    matrix.index.name = "dataset"
    return matrix, pd.DataFrame(rows, columns=["dataset_a", "dataset_b", "n_common", "tau",
                                               "p_value"])


def tunability(units: pd.DataFrame, levels: pd.DataFrame, knobs: list[Knob], metric: str,
               noise: pd.DataFrame, cost_metrics: list[str], n_boot: int = 2000,
               seed: int = 0) -> pd.DataFrame:
    """Per (knob, dataset): the dataset's best level, the universal level and what it costs.

    The universal level is, among the levels seen (in >= MIN_UNITS_PER_LEVEL configs) on every
    dataset, the one with the smallest mean *relative* regret (best - level) / best over datasets,
    so a dataset with larger metric values does not dictate it. `regret` is on the objective,
    with the simultaneous interval of `stats.knob_effects`; `cost_<m>` is the same difference on
    each cost metric (test split: levels were chosen on the objective).
    """
    floors = dict(zip(noise["dataset"], noise["noise_sd"]))
    datasets = sorted(units["dataset"].unique())
    rows = []
    for knob in knobs:
        part = levels[(levels["knob"] == knob.name) & (levels["n_configs"] >= MIN_UNITS_PER_LEVEL)]
        wide = part.pivot_table(index="level", columns="dataset", values="mean")
        wide = wide.reindex(columns=datasets)
        common = wide.dropna()
        if common.empty:
            continue
        best = wide.max()
        rel = (best - common) / best.abs().replace(0, np.nan)
        universal = rel.mean(axis=1).idxmin()
        labels = make_levels(units, knob).labels
        for dataset in datasets:
            k = int(wide[dataset].notna().sum())
            a = ALPHA / max(1, k * (k - 1) // 2)  # as in stats.knob_effects
            best_level = wide[dataset].idxmax()
            regret = float(best[dataset] - wide.loc[universal, dataset])
            if best_level == universal:
                lo = hi = 0.0
            else:
                boots = level_boots(units, knob, dataset, metric, [best_level, universal], labels,
                                    n_boot, seed)
                lo, hi = np.quantile(boots[best_level] - boots[universal], [a / 2, 1 - a / 2])
            matters, _ = decide(regret, lo, floors.get(dataset, np.nan))
            row = {"knob": knob.name, "dataset": dataset, "best_level": best_level,
                   "universal": universal, "regret": regret, "ci_low": lo, "ci_high": hi,
                   "within_noise": not matters}
            cell = part[part["dataset"] == dataset].set_index("level")
            for m in cost_metrics:
                if m in cell:
                    row[f"cost_{m}"] = float(cell.loc[best_level, m] - cell.loc[universal, m])
            rows.append(row)
    columns = ["knob", "dataset", "best_level", "universal", "regret", "ci_low", "ci_high",
               "within_noise", *(f"cost_{m}" for m in cost_metrics)]
    return pd.DataFrame(rows, columns=columns)


def config_regret(units: pd.DataFrame, metric: str, noise: pd.DataFrame,
                  cost_metrics: list[str]) -> pd.DataFrame:
    """One universal paired config against each dataset's best paired config.

    Universal = the config, among those completed on every dataset, with the smallest mean
    relative regret. Per dataset: both configs, the regret on the objective, whether it is within
    the seed noise, and the cost on each cost metric.
    """
    wide = units.pivot_table(index="config_id", columns="dataset", values=metric)
    common = wide.dropna()
    columns = ["dataset", "best_config", "best", "universal_config", "universal", "regret",
               "relative_regret", "noise_floor", "within_noise",
               *(f"cost_{m}" for m in cost_metrics)]
    if common.empty:
        warnings.warn("no paired config completed on every dataset: no universal config",
                      stacklevel=2)
        return pd.DataFrame(columns=columns)
    best = common.max()
    universal = ((best - common) / best.abs().replace(0, np.nan)).mean(axis=1).idxmin()
    floors = dict(zip(noise["dataset"], noise["noise_sd"]))
    indexed = units.set_index(["dataset", "config_id"])
    rows = []
    for dataset in common.columns:
        best_id = common[dataset].idxmax()
        regret = float(common.loc[best_id, dataset] - common.loc[universal, dataset])
        floor = floors.get(dataset, np.nan)
        row = {"dataset": dataset, "best_config": best_id, "best": common.loc[best_id, dataset],
               "universal_config": universal, "universal": common.loc[universal, dataset],
               "regret": regret, "relative_regret": regret / abs(best[dataset]) if best[dataset]
               else np.nan, "noise_floor": floor,
               "within_noise": bool(regret <= floor) if not np.isnan(floor) else pd.NA}
        for m in cost_metrics:
            if m in indexed:
                row[f"cost_{m}"] = float(indexed.loc[(dataset, best_id), m]
                                         - indexed.loc[(dataset, universal), m])
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def verdict(fixed: pd.DataFrame, effects: pd.DataFrame, agreement: pd.DataFrame,
            tune: pd.DataFrame, cost_metrics: list[str]) -> pd.DataFrame:
    """One row per knob in plain words: where it matters, whether its best value agrees across
    datasets, and what one universal value costs (largest cost over datasets)."""
    rows = []
    fixed_setting = dict(zip(fixed["knob"], fixed["setting"]))
    for knob in KNOBS:
        name = knob.name
        if name in fixed_setting:
            rows.append({"knob": name, "analysed": False, "matters_on": "",
                         "best_agrees": pd.NA, "verdict": f"{fixed_setting[name]}; not analysed"})
            continue
        eff = effects[effects["knob"] == name]
        agree = agreement[agreement["knob"] == name].iloc[0]
        tun = tune[tune["knob"] == name]
        mattering = eff[eff["matters"].astype(bool)]
        quiet = eff[~eff["matters"].astype(bool)]["dataset"].tolist()
        best_text = "; ".join(f"{d}: {b}" for d, b in zip(eff["dataset"], eff["best_level"])
                              if isinstance(b, str))
        row = {"knob": name, "analysed": True, "matters_on": ", ".join(mattering["dataset"]),
               "within_noise_on": ", ".join(quiet), "best_per_dataset": best_text,
               "best_agrees": agree["agrees"],
               "universal": tun["universal"].iloc[0] if len(tun) else pd.NA,
               "tunability": float(tun["regret"].mean()) if len(tun) else np.nan}
        for m in cost_metrics:
            col = f"cost_{m}"
            row[col] = float(tun[col].max()) if len(tun) and col in tun else np.nan
        row["verdict"] = _sentence(row, mattering, quiet, tun, cost_metrics)
        rows.append(row)
    out = pd.DataFrame(rows, columns=["knob", "analysed", "matters_on", "within_noise_on",
                                      "best_per_dataset", "best_agrees", "universal",
                                      "tunability", *(f"cost_{m}" for m in cost_metrics),
                                      "verdict"])
    out["best_agrees"] = out["best_agrees"].astype("boolean")
    # analysed knobs first (in KNOBS order), then the fixed ones
    return out.sort_values("analysed", ascending=False, kind="stable").reset_index(drop=True)


def _sentence(row: dict, mattering: pd.DataFrame, quiet: list[str], tun: pd.DataFrame,
              cost_metrics: list[str]) -> str:
    if mattering.empty:
        text = "Within noise on every dataset: any value tried is as good as another here."
    else:
        where = ", ".join(f"{d} (best {b})" for d, b in zip(mattering["dataset"],
                                                          mattering["best_level"]))
        only = "only " if len(mattering) == 1 and quiet else ""
        text = f"Matters {only}on {where}"
        text += f"; within noise on {', '.join(quiet)}." if quiet else "."
        if pd.notna(row["best_agrees"]):
            text += (" The best value agrees across those datasets." if row["best_agrees"]
                     else " The best value differs between datasets.")
    if len(tun):
        costs = " and ".join(f"{row[f'cost_{m}']:.4f} {m.split('_', 1)[-1]}" for m in cost_metrics
                             if pd.notna(row.get(f"cost_{m}")))
        noisy = tun["within_noise"].all()
        text += f" One value for all ({row['universal']}) costs at most {costs or 'n/a'}"
        text += " (within noise)." if noisy else "."
    return text


def open_questions(units: pd.DataFrame, effects: pd.DataFrame, noise: pd.DataFrame,
                   metric: str, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The authors' open questions, per dataset, where the sweep covers them.

    Positional encoding on (any encoding) vs off ('none'), and cross_attention vs linear
    aggregation (Transformer denoiser only, since an MLP denoiser cannot cross-attend) are two-group
    contrasts; lambda and stage_plan are answered by their best level and effect.
    """
    floors = dict(zip(noise["dataset"], noise["noise_sd"]))
    rows = []
    contrasts = [
        ("positional encoding: on vs off", "positional_encoding",
         lambda u: u["positional_encoding"].astype(str) != "none",
         lambda u: u["positional_encoding"].astype(str) == "none", "on - off"),
        ("aggregation: cross_attention vs linear", "aggregation",
         lambda u: u["aggregation"].astype(str) == "cross_attention",
         lambda u: u["aggregation"].astype(str) == "linear", "cross_attention - linear"),
    ]
    for question, column, group_a, group_b, label in contrasts:
        if column not in units or units[column].nunique() < 2:
            rows.append({"question": question, "dataset": "", "answer": NOT_COVERED})
            continue
        scope = units
        if column == "aggregation" and "denoiser" in units:
            scope = units[units["denoiser"].astype(str) == "transformer"]
        for dataset in sorted(units["dataset"].unique()):
            part = scope[scope["dataset"] == dataset]
            res = contrast(part, group_a(part), group_b(part), metric,
                           floors.get(dataset, np.nan), n_boot, rng_for(seed, question, dataset))
            if "difference" not in res:
                answer = f"not covered: {res['reason']}"
            else:
                answer = (f"{label} = {res['difference']:+.4f} [{res['ci_low']:+.4f}, "
                          f"{res['ci_high']:+.4f}]; " + res["reason"])
            rows.append({"question": question, "dataset": dataset, "answer": answer, **res})
    for question, name in (("lambda (weight of x_t + t_emb)", "lambda_uncertainty"),
                           ("stage plan", "stage_plan")):
        eff = effects[effects["knob"] == name]
        if eff.empty:
            rows.append({"question": question, "dataset": "", "answer": NOT_COVERED})
            continue
        for _, e in eff.iterrows():
            if pd.isna(e.get("effect")):
                answer = f"not covered: {e['reason']}"
            else:
                answer = (f"best {e['best_level']}, worst {e['worst_level']}, difference "
                          f"{e['effect']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]; "
                          + e["reason"])
            rows.append({"question": question, "dataset": e["dataset"], "answer": answer,
                         "matters": bool(e["matters"]), "reason": e["reason"]})
    out = pd.DataFrame(rows)
    keep = ["question", "dataset", "answer", "matters", "difference", "ci_low", "ci_high",
            "n_a", "n_b", "reason"]
    return out.reindex(columns=keep)
