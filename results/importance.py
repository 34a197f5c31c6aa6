"""Knob importance per dataset: functional-ANOVA variance shares of the level model (the sort key)
and Optuna's PED-ANOVA beside them, both with the number of configs they rest on.

The variance shares (`effects.variance_shares`) are unnormalised: a knob's main-effect share and
its share of the kept interactions are fractions of the variance of the seed-averaged metric
over the paired configs, next to the seed noise and the remainder (other interactions, lack of
fit), so an interaction never vanishes into a renormalisation.

PED-ANOVA (Watanabe et al., IJCAI 2023) compares the distribution of a knob's values among the
top-gamma' configs with all of them. Its top set must hold at least MIN_TOP configs to mean
anything, so gamma' = max(0.1, MIN_TOP / n); where that would exceed MAX_QUANTILE (fewer than 40
configs where the knob is active) it is not computed. A conditional knob is scored on the configs
where it is active only, on its own scale (log knobs on a log axis).
"""
from __future__ import annotations

import warnings

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

from results.knobs import Knob, active, is_categorical, is_log

MIN_TOP = 10
BASE_QUANTILE = 0.1
MAX_QUANTILE = 0.25


def quantile_for(n: int) -> float | None:
    """PED-ANOVA's gamma' for n configs: the top set holds >= MIN_TOP, or None."""
    gamma = max(BASE_QUANTILE, MIN_TOP / max(n, 1))
    return gamma if gamma <= MAX_QUANTILE else None


def distribution(knob: Knob, values: pd.Series) -> BaseDistribution:
    if is_categorical(knob):
        return CategoricalDistribution(sorted(values.astype(str).unique()))
    low, high = float(values.min()), float(values.max())
    if knob.kind == "int":
        return IntDistribution(int(low), int(high), log=is_log(knob) and low >= 1)
    return FloatDistribution(low, high, log=is_log(knob) and low > 0)


def _param(knob: Knob, value: object) -> object:
    if is_categorical(knob):
        return str(value)
    return int(value) if knob.kind == "int" else float(value)


def ped_anova(units: pd.DataFrame, knobs: list[Knob], metric: str) -> pd.DataFrame:
    """PED-ANOVA per (dataset, knob) on the configs where the knob is active (module docstring).

    Knobs sharing one activity pattern share one in-memory study (building trials is the cost).
    """
    rows = []
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        for dataset, part in units.groupby("dataset", sort=True):
            masks: dict[bytes, list[Knob]] = {}
            for knob in knobs:
                on = active(part, knob)
                if part.loc[on, knob.name].astype(str).nunique() >= 2:
                    masks.setdefault(on.to_numpy().tobytes(), []).append(knob)
            for key, group in masks.items():
                on = np.frombuffer(key, dtype=bool)
                sub = part[on]
                gamma = quantile_for(len(sub))
                scores = _scores(sub, group, metric, gamma) if gamma else {}
                for knob in group:
                    rows.append({"dataset": dataset, "knob": knob.name,
                                 "ped_anova": scores.get(knob.name, np.nan),
                                 "ped_quantile": gamma, "ped_top_n":
                                 int(np.floor(gamma * len(sub))) if gamma else 0,
                                 "ped_n": len(sub)})
    finally:
        optuna.logging.set_verbosity(previous)
    return pd.DataFrame(rows, columns=["dataset", "knob", "ped_anova", "ped_quantile",
                                       "ped_top_n", "ped_n"])


def _scores(sub: pd.DataFrame, knobs: list[Knob], metric: str, gamma: float) -> dict[str, float]:
    dists = {k.name: distribution(k, sub[k.name]) for k in knobs}
    study = optuna.create_study(direction="maximize")
    values = sub[metric].to_numpy(float)
    columns = {k.name: sub[k.name].tolist() for k in knobs}
    study.add_trials([
        optuna.trial.create_trial(
            params={k.name: _param(k, columns[k.name][i]) for k in knobs},
            distributions=dists, value=float(values[i]))
        for i in range(len(sub))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # normalize=False is "experimental" in Optuna 5
        return get_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(target_quantile=gamma),
            params=[k.name for k in knobs], normalize=False)


def importance_table(shares: pd.DataFrame, ped: pd.DataFrame, knobs: list[str]) -> pd.DataFrame:
    """One row per (dataset, knob): main-effect share, share of the kept interactions it is in,
    their sum (the sort key), n, and PED-ANOVA with its gamma' and top-set size."""
    rows = []
    for dataset in sorted(set(shares["dataset"]) | set(ped["dataset"])):
        part = shares[shares["dataset"] == dataset]
        main = part[part["kind"] == "main"].set_index("component")
        inter = part[part["kind"] == "interaction"]
        for knob in knobs:
            pair_share = float(sum(s for c, s in zip(inter["component"], inter["share"])
                                   if knob in c.split(" x ")))
            rows.append({"dataset": dataset, "knob": knob,
                         "anova_main": main["share"].get(knob, np.nan),
                         "anova_interactions": pair_share if knob in main.index else np.nan,
                         "n_configs": main["n_configs"].get(knob, np.nan)})
    out = pd.DataFrame(rows, columns=["dataset", "knob", "anova_main", "anova_interactions",
                                      "n_configs"])
    out["anova_total"] = out["anova_main"] + out["anova_interactions"]
    out = out.merge(ped, on=["dataset", "knob"], how="left")
    return out.sort_values(["dataset", "anova_total", "knob"], ascending=[True, False, True],
                           na_position="last").reset_index(drop=True)
