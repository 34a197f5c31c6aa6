"""The knobs the report analyses, when each is active, and how its values become levels.

Everything about a knob (its scale, choices, default and the condition under which it is active)
comes from the one knob vocabulary, `adrec.config.KNOBS`; this module only adds what the analysis
needs on top: a boolean *activity mask* over table rows, and *levels*.

A knob's levels are what the per-level statistics, the level model and the cross-dataset
comparison use: the categories of a categorical knob, the distinct values of a numeric knob with
few of them, and otherwise quantile bins computed once over all datasets (so "bin 2" means the
same values on every dataset). Quantile bins do not depend on the scale; a log knob's bins are
placed (plots, labels) at the geometric median of their values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from adrec.config import KNOBS as VOCABULARY
from adrec.config import Knob

MAX_DISTINCT_AS_LEVELS = 6  # a numeric knob with at most this many values keeps one level per value
MIN_BINS, MAX_BINS = 3, 5  # quantile bins of a numeric knob: more configs, more bins
CONFIGS_PER_BIN = 40  # ... one more bin per this many configs (a bin costs the model one parameter)

KNOBS: tuple[Knob, ...] = tuple(VOCABULARY.values())
KNOB_NAMES: tuple[str, ...] = tuple(VOCABULARY)


def by_name(name: str) -> Knob:
    try:
        return VOCABULARY[name]
    except KeyError:
        raise ValueError(f"knob {name!r} is not one of {', '.join(KNOB_NAMES)}") from None


def default_of(name: str) -> Any:
    return by_name(name).default


def is_log(knob: Knob) -> bool:
    return knob.scale == "log"


def is_categorical(knob: Knob) -> bool:
    return knob.scale == "categorical"


def active(table: pd.DataFrame, knob: Knob) -> pd.Series:
    """Boolean mask of the rows where `knob` is active: its `when` holds and its value is set.

    Rows written before inactive knobs were stored as null still carry a value there, so the
    condition is checked on the table as well as the null.
    """
    mask = table[knob.name].notna() if knob.name in table else pd.Series(False, index=table.index)
    for field, allowed in knob.when:
        if field in table:
            mask &= table[field].astype("string").isin([str(a) for a in allowed]).fillna(False)
        elif not knob.is_active({}):  # a condition column absent from the table: its default
            return pd.Series(False, index=table.index)
    return mask.astype(bool)


def fmt_value(value: Any) -> str:
    """A knob value as the report prints it: 0.001 -> '0.001', 1e-05 -> '1e-05'."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "nan"
        return str(int(value)) if float(value).is_integer() and abs(value) < 1e6 else f"{float(value):.3g}"
    return str(value)


@dataclass(frozen=True)
class Levels:
    """Level labels of one knob for a set of rows, in display order, with plot positions."""

    knob: str
    labels: pd.Series  # per row: the level label, <NA> where the knob is inactive
    order: tuple[str, ...]
    x: dict[str, float]  # plot position of each level (category index or a representative value)
    binned: bool
    low: dict[str, float]  # smallest value in each numeric level (ranges), empty for categories
    high: dict[str, float]

    def codes(self, index: pd.Index | None = None) -> np.ndarray:
        """Level index per row (-1 where inactive), in `order`."""
        labels = self.labels if index is None else self.labels.loc[index]
        lookup = {lv: i for i, lv in enumerate(self.order)}
        return np.array([lookup.get(v, -1) if isinstance(v, str) else -1 for v in labels],
                        dtype=np.int64)

    def level_of(self, value: Any) -> str | None:
        """The level a single value falls in (the default's level), None if none does."""
        if value is None:
            return None
        if not self.low:
            return str(value) if str(value) in self.order else None
        v = float(value)
        for lv in self.order:
            if self.low[lv] <= v <= self.high[lv]:
                return lv
        # between two bins (values not seen): the nearest bin
        return min(self.order, key=lambda lv: min(abs(v - self.low[lv]), abs(v - self.high[lv])))


    def label_values(self, values: pd.Series) -> pd.Series:
        """The level of each value (vectorised `level_of`); NA for a category not in `order`."""
        if not self.low:
            labels = values.astype(str)
            return labels.where(labels.isin(self.order), pd.NA).astype("string")
        v = pd.to_numeric(values, errors="coerce").to_numpy(float)
        lows = np.array([self.low[lv] for lv in self.order])
        highs = np.array([self.high[lv] for lv in self.order])
        # a value between two levels goes to the nearer one: cut at the midpoints
        cuts = (highs[:-1] + lows[1:]) / 2
        idx = np.searchsorted(cuts, v, side="right")
        out = pd.Series(np.array(self.order, dtype=object)[idx], index=values.index,
                        dtype="string")
        return out.where(~np.isnan(v), pd.NA)


def n_bins(n_configs: int) -> int:
    return int(np.clip(n_configs // CONFIGS_PER_BIN, MIN_BINS, MAX_BINS))


def make_levels(table: pd.DataFrame, knob: Knob, bins: int | None = None) -> Levels:
    """Group the knob's active values in `table` into levels (see the module docstring).

    `bins` defaults to `n_bins` of the smallest per-dataset count of active rows.
    """
    mask = active(table, knob)
    values = table.loc[mask, knob.name]
    labels = pd.Series(pd.NA, index=table.index, dtype="string")
    if is_categorical(knob) or knob.kind in ("bool", "categorical"):
        present = set(values.astype(str))
        choices = tuple(str(c) for c in (knob.choices or ()))
        order = tuple(c for c in choices if c in present) + tuple(sorted(present - set(choices)))
        labels[mask] = values.astype(str)
        return Levels(knob.name, labels, order, {lv: float(i) for i, lv in enumerate(order)},
                      False, {}, {})
    numeric = values.astype(float)
    distinct = np.unique(numeric.to_numpy())
    if len(distinct) <= MAX_DISTINCT_AS_LEVELS:
        order = tuple(fmt_value(v) for v in distinct)
        labels[mask] = numeric.map(fmt_value)
        return Levels(knob.name, labels, order, {fmt_value(v): float(v) for v in distinct}, False,
                      {fmt_value(v): float(v) for v in distinct},
                      {fmt_value(v): float(v) for v in distinct})
    if bins is None:
        per_dataset = mask.groupby(table["dataset"]).sum() if "dataset" in table else [mask.sum()]
        bins = n_bins(int(min(per_dataset)))
    cut = pd.qcut(numeric, bins, duplicates="drop")
    order, x, low, high = [], {}, {}, {}
    for interval in cut.cat.categories:
        inside = numeric[cut == interval]
        if inside.empty:
            continue
        label = f"{fmt_value(inside.min())}..{fmt_value(inside.max())}"
        order.append(label)
        geometric = is_log(knob) and inside.min() > 0
        x[label] = float(np.exp(np.median(np.log(inside))) if geometric else np.median(inside))
        low[label], high[label] = float(inside.min()), float(inside.max())
        labels[inside.index] = label
    return Levels(knob.name, labels, tuple(order), x, True, low, high)
