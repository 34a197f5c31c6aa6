"""Knob importance per dataset with Optuna's PED-ANOVA and fANOVA, on the paired configs.

An in-memory study is rebuilt from the table: one trial per (dataset, config) with the metric
averaged over its seeds, so repeats do not weigh a config more. Conditional knobs (beta_a,
beta_b) appear in a trial's params only where their condition holds. fANOVA works on the knobs
present in every trial, so conditional knobs get PED-ANOVA only (NaN under fANOVA).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.importance import (FanovaImportanceEvaluator, PedAnovaImportanceEvaluator,
                               get_param_importances)
from tqdm.auto import tqdm

from results.knobs import Knob

log = logging.getLogger(__name__)
MIN_TRIALS = 10  # below this, importances are noise: warn and leave them empty


def distributions(units: pd.DataFrame, knobs: list[Knob]) -> dict[str, BaseDistribution]:
    """One Optuna distribution per knob spanning the values seen (log where the knob is log)."""
    out: dict[str, BaseDistribution] = {}
    for knob in knobs:
        values = units.loc[knob.applies(units), knob.name].dropna()
        if knob.kind == "cat":
            out[knob.name] = CategoricalDistribution(sorted(values.astype(str).unique()))
        elif knob.kind == "int":
            out[knob.name] = IntDistribution(int(values.min()), int(values.max()))
        else:
            low, high = float(values.min()), float(values.max())
            out[knob.name] = FloatDistribution(low, high, log=knob.kind == "log" and low > 0)
    return out


def _param(knob: Knob, value: Any) -> Any:
    if knob.kind == "cat":
        return str(value)
    return int(value) if knob.kind == "int" else float(value)


def build_study(units: pd.DataFrame, knobs: list[Knob], metric: str,
                dists: dict[str, BaseDistribution]) -> optuna.Study:
    """A maximising in-memory study with one completed trial per row of `units`."""
    study = optuna.create_study(direction="maximize")
    applies = {k.name: k.applies(units) for k in knobs}
    for idx, row in units.iterrows():
        params, dist = {}, {}
        for knob in knobs:
            if applies[knob.name][idx] and pd.notna(row[knob.name]):
                params[knob.name] = _param(knob, row[knob.name])
                dist[knob.name] = dists[knob.name]
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist,
                                                  value=float(row[metric])))
    return study


def importance_table(units: pd.DataFrame, knobs: list[Knob], metric: str,
                     seed: int = 0) -> pd.DataFrame:
    """Normalised PED-ANOVA and fANOVA importance per (dataset, knob), most important first.

    A dataset with fewer than MIN_TRIALS configs gets a warning and NaN importances.
    """
    columns = ["dataset", "knob", "ped_anova", "fanova", "n_configs"]
    if not knobs:
        return pd.DataFrame(columns=columns)
    dists = distributions(units, knobs)
    rows = []
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        datasets = sorted(units["dataset"].unique())
        for dataset in tqdm(datasets, desc="importance", unit="dataset", disable=None):
            part = units[units["dataset"] == dataset]
            scores: dict[str, dict[str, float]] = {"ped_anova": {}, "fanova": {}}
            if len(part) < MIN_TRIALS:
                warnings.warn(f"dataset {dataset!r} has {len(part)} completed paired configs; "
                              f"importance needs at least {MIN_TRIALS}, so it is left empty",
                              stacklevel=2)
            else:
                log.info("importance on %s (%d configs)", dataset, len(part))
                study = build_study(part, knobs, metric, dists)
                # A knob that does not vary within this dataset cannot be ranked: skip it.
                names = [k.name for k in knobs if part.loc[k.applies(part), k.name].nunique() > 1]
                trials = study.get_trials(deepcopy=False)
                everywhere = [n for n in names if all(n in t.params for t in trials)]
                evaluators = {"ped_anova": (PedAnovaImportanceEvaluator(), names),
                              "fanova": (FanovaImportanceEvaluator(seed=seed), everywhere)}
                for key, (evaluator, params) in evaluators.items():
                    if not params:
                        continue
                    try:
                        scores[key] = get_param_importances(study, evaluator=evaluator,
                                                            params=params, normalize=True)
                    except (ValueError, RuntimeError) as err:
                        warnings.warn(f"{key} importance failed on {dataset!r}: {err}",
                                      stacklevel=2)
            for knob in knobs:
                rows.append({"dataset": dataset, "knob": knob.name,
                             "ped_anova": float(scores["ped_anova"].get(knob.name, np.nan)),
                             "fanova": float(scores["fanova"].get(knob.name, np.nan)),
                             "n_configs": len(part)})
    finally:
        optuna.logging.set_verbosity(previous)
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["dataset", "ped_anova", "knob"], ascending=[True, False, True],
                             na_position="last").reset_index(drop=True)
