"""Per-level statistics and knob effects with bootstrap intervals, per dataset.

The unit of every bootstrap is one configuration on one dataset (its metric averaged over seeds,
see `table.config_means`). An effect is the difference between a knob's best and worst level.
Because both levels are picked after looking at the data, its interval is *simultaneous* over all
k(k-1)/2 level pairs (Bonferroni: the pair's interval is at level 1 - 0.05 / pairs), so a knob
with many levels is not declared to matter just because some pair looks far apart by chance.
An effect "matters" only when that interval excludes 0 AND the effect exceeds the dataset's
seed-noise floor (the standard deviation one run shows when only its seed changes); otherwise it
is "within noise".
"""
from __future__ import annotations

import warnings
import zlib

import numpy as np
import pandas as pd

from results.knobs import Knob, make_levels

ALPHA = 0.05
MIN_UNITS_PER_LEVEL = 2  # a level seen in one config has no spread: shown, never best or worst


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends on the seed and the keys only, not on the order of the loop."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of `values`: shape (n_boot,)."""
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return values[idx].mean(axis=1)


def level_stats(units: pd.DataFrame, knobs: list[Knob], metric: str, cost_metrics: list[str],
                n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean `metric` per (knob, dataset, level) with a 95% bootstrap interval over configs.

    Levels are made once over all datasets (`make_levels`), so they coincide across datasets.
    Columns: knob, dataset, level, x, binned, n_configs, mean, ci_low, ci_high, and the mean of
    each cost metric.
    """
    rows = []
    for knob in knobs:
        levels = make_levels(units, knob)
        labelled = units.assign(level=levels.labels).dropna(subset=["level"])
        for dataset, part in labelled.groupby("dataset", sort=True):
            for level in levels.order:
                cell = part[part["level"] == level]
                if cell.empty:
                    continue
                values = cell[metric].to_numpy(float)
                boots = bootstrap_means(values, n_boot, rng_for(seed, knob.name, dataset, level))
                lo, hi = np.quantile(boots, [ALPHA / 2, 1 - ALPHA / 2])
                row = {"knob": knob.name, "dataset": dataset, "level": level,
                       "x": levels.x[level], "binned": levels.binned, "n_configs": len(values),
                       "mean": values.mean(), "ci_low": lo, "ci_high": hi}
                row.update({m: cell[m].mean() for m in cost_metrics if m in cell})
                rows.append(row)
    columns = ["knob", "dataset", "level", "x", "binned", "n_configs", "mean", "ci_low",
               "ci_high", *cost_metrics]
    return pd.DataFrame(rows, columns=columns)


def level_boots(units: pd.DataFrame, knob: Knob, dataset: str, metric: str, levels: list[str],
                 labels: pd.Series, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    part = units[(units["dataset"] == dataset)]
    lab = labels.loc[part.index]
    return {lv: bootstrap_means(part.loc[lab == lv, metric].to_numpy(float), n_boot,
                                rng_for(seed, knob.name, dataset, lv)) for lv in levels}


def knob_effects(units: pd.DataFrame, knobs: list[Knob], metric: str, noise: pd.DataFrame,
                 n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (knob, dataset): best and worst level, effect = mean(best) - mean(worst), its
    simultaneous interval, the noise floor and the rule's outcome (`matters`, `reason`).

    Only levels with at least MIN_UNITS_PER_LEVEL configs compete. The same seeded resamples as
    `level_stats` are reused, so a level's interval and the effect's agree.
    """
    floors = dict(zip(noise["dataset"], noise["noise_sd"])) if len(noise) else {}
    rows = []
    for knob in knobs:
        levels = make_levels(units, knob)
        for dataset in sorted(units["dataset"].unique()):
            part = units[units["dataset"] == dataset]
            lab = levels.labels.loc[part.index]
            counts = lab.value_counts()
            eligible = [lv for lv in levels.order if counts.get(lv, 0) >= MIN_UNITS_PER_LEVEL]
            floor = floors.get(dataset, np.nan)
            row = {"knob": knob.name, "dataset": dataset, "levels": len(eligible),
                   "noise_floor": floor}
            if len(eligible) < 2:
                rows.append({**row, "matters": False,
                             "reason": f"fewer than 2 levels with >= {MIN_UNITS_PER_LEVEL} "
                                       "configs"})
                continue
            means = {lv: part.loc[lab == lv, metric].mean() for lv in eligible}
            best = max(eligible, key=lambda lv: (means[lv], -eligible.index(lv)))
            worst = min(eligible, key=lambda lv: (means[lv], eligible.index(lv)))
            boots = level_boots(units, knob, dataset, metric, [best, worst], levels.labels,
                                 n_boot, seed)
            pairs = len(eligible) * (len(eligible) - 1) // 2
            a = ALPHA / pairs
            lo, hi = np.quantile(boots[best] - boots[worst], [a / 2, 1 - a / 2])
            effect = means[best] - means[worst]
            matters, reason = decide(effect, lo, floor)
            rows.append({**row, "best_level": best, "best_mean": means[best],
                         "worst_level": worst, "worst_mean": means[worst], "effect": effect,
                         "ci_low": lo, "ci_high": hi, "ci_level": 1 - a, "matters": matters,
                         "reason": reason})
    columns = ["knob", "dataset", "levels", "best_level", "best_mean", "worst_level",
               "worst_mean", "effect", "ci_low", "ci_high", "ci_level", "noise_floor",
               "matters", "reason"]
    return pd.DataFrame(rows, columns=columns)


def decide(effect: float, ci_low: float, floor: float) -> tuple[bool, str]:
    """The report's one rule: an effect counts when its interval excludes 0 and it exceeds the
    seed-noise floor (the floor is skipped, and said so, when it is unknown)."""
    if not ci_low > 0:
        return False, "within noise: interval includes 0"
    if np.isnan(floor):
        return True, "interval excludes 0 (noise floor unknown)"
    if effect <= floor:
        return False, f"within noise: effect {effect:.4g} <= seed noise {floor:.4g}"
    return True, f"interval excludes 0 and effect {effect:.4g} > seed noise {floor:.4g}"


def contrast(units: pd.DataFrame, mask_a: pd.Series, mask_b: pd.Series, metric: str,
             floor: float, n_boot: int, rng: np.random.Generator) -> dict[str, float | str | bool]:
    """mean(A) - mean(B) over configs with a 95% bootstrap interval and the same rule.

    For two *pre-specified* groups (the authors' questions), so no multiplicity correction.
    """
    a = units.loc[mask_a, metric].to_numpy(float)
    b = units.loc[mask_b, metric].to_numpy(float)
    if len(a) < MIN_UNITS_PER_LEVEL or len(b) < MIN_UNITS_PER_LEVEL:
        return {"n_a": len(a), "n_b": len(b), "matters": False,
                "reason": f"fewer than {MIN_UNITS_PER_LEVEL} configs in a group"}
    diff = bootstrap_means(a, n_boot, rng) - bootstrap_means(b, n_boot, rng)
    lo, hi = np.quantile(diff, [ALPHA / 2, 1 - ALPHA / 2])
    est = a.mean() - b.mean()
    # The rule is about the size of a difference, whichever way it goes.
    matters, reason = decide(abs(est), lo if est >= 0 else -hi, floor)
    return {"n_a": len(a), "n_b": len(b), "mean_a": a.mean(), "mean_b": b.mean(),
            "difference": est, "ci_low": lo, "ci_high": hi, "matters": matters, "reason": reason}


def warn_if_small(units: pd.DataFrame, minimum: int, what: str) -> list[str]:
    """Datasets with fewer than `minimum` configs for `what`, each with a warning."""
    small = []
    for dataset, n in units.groupby("dataset").size().items():
        if n < minimum:
            warnings.warn(f"dataset {dataset!r} has {n} completed configs; {what} needs at least "
                          f"{minimum}, so it says little there", stacklevel=2)
            small.append(dataset)
    return small
