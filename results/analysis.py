"""The whole analysis of one trial table, as DataFrames: no plotting, no files.

`analyse(table)` checks the table, then: units per config -> seed-noise floor -> levels -> one
level model per dataset (interaction screen, bootstrap over configs) -> adjusted effects and
verdicts, levels, variance shares and PED-ANOVA, tunability -> failures by level -> best configs,
default vs tuned, expected best score vs trials -> (two or more datasets) best-value agreement,
Kendall's tau, universal values, config regret -> the verdict.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import pandas as pd

from results import effects as fx
from results import importance, selection, sensitivity, summary
from results.failures import failure_rates
from results.knobs import Knob, make_levels
from results.table import (DEFAULT_METRIC, adrec_rows, analysed_rows, check_table, config_means,
                           cost_metrics, knob_status, noise_floor)

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    table: pd.DataFrame  # the checked table (config_id filled)
    metric: str
    cost_metrics: list[str]
    datasets: list[str]
    varying: list[Knob]
    fixed: pd.DataFrame
    units: pd.DataFrame
    noise: pd.DataFrame
    fits: list[fx.DatasetFit]
    effects: pd.DataFrame
    conditional: pd.DataFrame
    levels: pd.DataFrame
    interactions: pd.DataFrame
    heatmaps: pd.DataFrame
    shares: pd.DataFrame
    importance: pd.DataFrame
    tunability: pd.DataFrame
    failures: pd.DataFrame
    failed_trials: pd.DataFrame
    open_questions: pd.DataFrame
    status: pd.DataFrame
    best: pd.DataFrame
    best_knobs: pd.DataFrame
    comparison: pd.DataFrame
    default_vs_tuned: pd.DataFrame
    expected_max: pd.DataFrame
    verdict: pd.DataFrame
    verdict_grid: pd.DataFrame
    recommended: pd.DataFrame
    # Cross-dataset results: empty with a single dataset.
    agreement: pd.DataFrame = field(default_factory=pd.DataFrame)
    kendall: pd.DataFrame = field(default_factory=pd.DataFrame)
    kendall_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    universal: pd.DataFrame = field(default_factory=pd.DataFrame)
    config_regret: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)

    @property
    def cross_dataset(self) -> bool:
        return len(self.datasets) >= 2

    def tables(self) -> dict[str, pd.DataFrame]:
        """The summary tables the report writes as CSV and Parquet, by file stem."""
        out = {"verdict": self.verdict, "verdict_grid": self.verdict_grid, "status": self.status,
               "fixed_knobs": self.fixed, "noise_floor": self.noise, "effects": self.effects,
               "conditional_effects": self.conditional, "levels": self.levels,
               "interactions": self.interactions, "interaction_cells": self.heatmaps,
               "variance_shares": self.shares, "importance": self.importance,
               "tunability": self.tunability, "failures_by_level": self.failures,
               "failed_trials": self.failed_trials, "best_configs": self.best,
               "best_knobs": self.best_knobs, "comparison": self.comparison,
               "default_vs_tuned": self.default_vs_tuned, "expected_max": self.expected_max,
               "recommended_values": self.recommended, "open_questions": self.open_questions}
        if self.cross_dataset:
            out.update({"best_level_agreement": self.agreement,
                        "kendall_tau": self.kendall.reset_index(),
                        "kendall_pairs": self.kendall_pairs, "universal_values": self.universal,
                        "config_regret": self.config_regret})
        return out


def analyse(table: pd.DataFrame, metric: str = DEFAULT_METRIC, n_boot: int = 2000,
            seed: int = 0) -> Analysis:
    """Analyse a trial table; raises `table.TableError` when it cannot be analysed.

    Warnings raised on the way (too few trials, no repeats, ...) are re-emitted and also kept in
    `Analysis.warnings` so the report can show them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _analyse(table, metric, n_boot, seed)
    seen = []
    for w in caught:
        text = str(w.message)
        if text not in seen:
            seen.append(text)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    result.warnings = seen
    return result


def _floors(table: pd.DataFrame, metrics: list[str]) -> dict[str, pd.DataFrame]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the objective's floor has warned already
        return {m: noise_floor(adrec_rows(table, m), m) for m in metrics}


def _analyse(table: pd.DataFrame, metric: str, n_boot: int, seed: int) -> Analysis:
    table = check_table(table, metric)
    wanted = list(cost_metrics(metric))
    cost = [m for m in wanted if m in table]
    if len(cost) < len(wanted):
        warnings.warn(f"cost column(s) {', '.join(sorted(set(wanted) - set(cost)))} missing: "
                      "costs are reported without them", stacklevel=2)
    rows = analysed_rows(table, metric)
    datasets = sorted(rows["dataset"].unique())
    varying, fixed = knob_status(rows)
    names = [k.name for k in varying]
    log.info("%d analysed trials on %d dataset(s); %d knobs vary", len(rows), len(datasets),
             len(varying))
    units = config_means(rows, list(dict.fromkeys([metric, *cost])))
    noise = noise_floor(adrec_rows(table, metric), metric)
    noise = noise[noise["dataset"].isin(datasets)].reset_index(drop=True)
    floors = dict(zip(noise["dataset"], noise["noise_sd"]))
    levels = {k.name: make_levels(units, k) for k in varying}
    log.info("level models (%d bootstrap resamples per dataset)", n_boot)
    fits = [fx.fit_dataset(d, units, levels, metric, cost, floors.get(d, float("nan")), n_boot,
                           seed) for d in datasets]
    effects, conditional = fx.effects_table(fits, names)
    level_tab = fx.level_table(fits, effects, cost)
    shares = fx.variance_shares(fits)
    log.info("PED-ANOVA")
    imp = importance.importance_table(shares, importance.ped_anova(units, varying, metric), names)
    interactions = pd.concat([f.pairs.assign(dataset=f.dataset) for f in fits if len(f.pairs)],
                             ignore_index=True) if any(len(f.pairs) for f in fits) else \
        pd.DataFrame(columns=["dataset", "knob_a", "knob_b", "share", "p_holm", "did", "kept"])
    cells = [fx.heatmap(f, a, b) for f in fits if f.model is not None for a, b in f.model.pairs]
    heatmaps = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(
        columns=["dataset", "knob_a", "level_a", "knob_b", "level_b", "mean", "n_configs"])
    paired = table[(table["model"] == "adrec") & (table["phase"] == "paired")]
    if paired.empty:
        paired = table[(table["model"] == "adrec") & (table["phase"] != "baseline")]
    failures = failure_rates(paired, levels)
    rates = failures[["knob", "dataset", "level", "runs", "diverged_rate", "failed_rate"]]
    level_tab = level_tab.merge(rates, on=["knob", "dataset", "level"], how="left")  # beside it
    best = summary.best_configs(table, metric, names, cost)
    tune = fx.tunability(fits)
    result = Analysis(
        table=table, metric=metric, cost_metrics=cost, datasets=datasets, varying=varying,
        fixed=fixed, units=units, noise=noise, fits=fits, effects=effects,
        conditional=conditional, levels=level_tab, interactions=interactions, heatmaps=heatmaps,
        shares=shares, importance=imp, tunability=tune, failures=failures,
        failed_trials=summary.failed_trials(table, names),
        open_questions=sensitivity.open_questions(fits, effects, n_boot, seed),
        status=summary.status_counts(table), best=best,
        best_knobs=selection.best_knob_values(best),
        comparison=summary.comparison(best, table, metric, cost),
        default_vs_tuned=selection.default_vs_tuned(table, best, names, [metric, *cost],
                                                    _floors(table, [metric, *cost])),
        expected_max=selection.expected_max(rows, metric),
        verdict=pd.DataFrame(), verdict_grid=pd.DataFrame(),
        recommended=sensitivity.recommended_values(level_tab, datasets))
    if len(datasets) >= 2:
        log.info("cross-dataset: agreement, Kendall's tau, universal values, config regret")
        result.agreement = sensitivity.best_level_agreement(effects)
        result.kendall, result.kendall_pairs = sensitivity.kendall_matrix(units, metric)
        result.universal = sensitivity.universal_levels(fits, level_tab, cost)
        result.config_regret = selection.config_regret(units, metric, noise, cost, n_boot, seed)
    agreement = result.agreement if len(result.agreement) else pd.DataFrame(
        columns=["knob", "agrees"])
    universal = result.universal if len(result.universal) else pd.DataFrame(
        columns=["knob", "universal", "within_noise"])
    result.verdict, result.verdict_grid = sensitivity.verdict(
        fixed, effects, agreement, universal, tune, failures, datasets, cost)
    return result
