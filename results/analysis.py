"""The whole analysis of one trial table, as DataFrames: no plotting, no files.

`analyse(table)` checks the table, then runs, in order: units per config -> noise floor ->
importance -> per-level statistics -> effects -> (with two or more datasets) agreement, Kendall's
tau, tunability, config regret, verdict -> the authors' open questions -> per-dataset summaries.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import pandas as pd

from results import importance, sensitivity, stats, summary
from results.knobs import Knob
from results.table import (COST_METRICS, DEFAULT_METRIC, adrec_rows, analysed_rows, check_table,
                           config_means, knob_status, noise_floor)

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
    importance: pd.DataFrame
    levels: pd.DataFrame
    effects: pd.DataFrame
    open_questions: pd.DataFrame
    status: pd.DataFrame
    best: pd.DataFrame
    comparison: pd.DataFrame
    # Cross-dataset results: empty with a single dataset.
    agreement: pd.DataFrame = field(default_factory=pd.DataFrame)
    kendall: pd.DataFrame = field(default_factory=pd.DataFrame)
    kendall_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    tunability: pd.DataFrame = field(default_factory=pd.DataFrame)
    config_regret: pd.DataFrame = field(default_factory=pd.DataFrame)
    verdict: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)

    @property
    def cross_dataset(self) -> bool:
        return len(self.datasets) >= 2

    def tables(self) -> dict[str, pd.DataFrame]:
        """The summary tables the report writes as CSV and Parquet, by file stem."""
        out = {"status": self.status, "fixed_knobs": self.fixed, "noise_floor": self.noise,
               "importance": self.importance, "levels": self.levels, "effects": self.effects,
               "best_configs": self.best, "comparison": self.comparison,
               "open_questions": self.open_questions}
        if self.cross_dataset:
            out.update({"best_level_agreement": self.agreement,
                        "kendall_tau": self.kendall.reset_index(),
                        "kendall_pairs": self.kendall_pairs, "tunability": self.tunability,
                        "config_regret": self.config_regret, "verdict": self.verdict})
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


def _analyse(table: pd.DataFrame, metric: str, n_boot: int, seed: int) -> Analysis:
    table = check_table(table, metric)
    cost = [m for m in COST_METRICS if m in table]
    if len(cost) < len(COST_METRICS):
        warnings.warn(f"cost column(s) {', '.join(sorted(set(COST_METRICS) - set(cost)))} missing: "
                      "costs are reported without them", stacklevel=2)
    rows = analysed_rows(table, metric)
    datasets = sorted(rows["dataset"].unique())
    varying, fixed = knob_status(rows)
    log.info("%d analysed trials on %d dataset(s); %d knobs vary", len(rows), len(datasets),
             len(varying))
    units = config_means(rows, list(dict.fromkeys([metric, *cost])))
    noise = noise_floor(adrec_rows(table, metric), metric)
    noise = noise[noise["dataset"].isin(datasets)].reset_index(drop=True)
    log.info("importance (PED-ANOVA, fANOVA)")
    imp = importance.importance_table(units, varying, metric, seed=seed)
    log.info("per-level statistics and effects (%d bootstrap resamples)", n_boot)
    stats.warn_if_small(units, 2 * stats.MIN_UNITS_PER_LEVEL, "a per-level comparison")
    levels = stats.level_stats(units, varying, metric, cost, n_boot=n_boot, seed=seed)
    effects = stats.knob_effects(units, varying, metric, noise, n_boot=n_boot, seed=seed)
    questions = sensitivity.open_questions(units, effects, noise, metric, n_boot=n_boot, seed=seed)
    knob_names = [k.name for k in varying]
    best = summary.best_configs(table, metric, knob_names, cost)
    result = Analysis(table=table, metric=metric, cost_metrics=cost, datasets=datasets,
                      varying=varying, fixed=fixed, units=units, noise=noise, importance=imp,
                      levels=levels, effects=effects, open_questions=questions,
                      status=summary.status_counts(table), best=best,
                      comparison=summary.comparison(best, table, metric, cost))
    if len(datasets) < 2:
        log.info("one dataset: cross-dataset sections skipped")
        return result
    log.info("cross-dataset: agreement, Kendall's tau, tunability, verdict")
    result.agreement = sensitivity.best_level_agreement(effects)
    result.kendall, result.kendall_pairs = sensitivity.kendall_matrix(units, metric)
    result.tunability = sensitivity.tunability(units, levels, varying, metric, noise, cost,
                                               n_boot=n_boot, seed=seed)
    result.config_regret = sensitivity.config_regret(units, metric, noise, cost)
    result.verdict = sensitivity.verdict(fixed, effects, result.agreement, result.tunability,
                                         cost)
    return result
