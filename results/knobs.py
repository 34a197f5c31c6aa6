"""The knobs the report analyses, how each is read, and how its values are grouped into levels.

Names are `TrialConfig` field names, so the table column, the sweep space and the report agree.
A knob's *levels* are what the per-level statistics and the cross-dataset comparison use: the
categories of a categorical knob, the distinct values of a numeric knob with few of them, and
otherwise quantile bins computed once over all datasets (so "bin 2" means the same values on
every dataset).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from adrec.config import TrialConfig, allowed_values, field_names

Kind = Literal["cat", "int", "float", "log"]

MAX_DISTINCT_AS_LEVELS = 6  # a numeric knob with at most this many values keeps one level per value
N_BINS = 4  # quantile bins for a numeric knob with more distinct values


@dataclass(frozen=True)
class Knob:
    name: str
    kind: Kind
    # (column, value): the knob only means something where column == value (beta_a needs 'beta').
    condition: tuple[str, str] | None = None

    def applies(self, table: pd.DataFrame) -> pd.Series:
        """Boolean mask of the rows where this knob is meaningful."""
        if self.condition is None:
            return pd.Series(True, index=table.index)
        column, value = self.condition
        if column not in table:
            return pd.Series(False, index=table.index)
        return table[column].astype("string") == value


KNOBS: tuple[Knob, ...] = (
    Knob("lambda_uncertainty", "log"),
    Knob("noise_schedule", "cat"),
    Knob("diffusion_steps", "int"),
    Knob("beta_a", "float", ("noise_schedule", "beta")),
    Knob("beta_b", "float", ("noise_schedule", "beta")),
    Knob("stage_plan", "cat"),
    Knob("stage1_epochs", "int"),
    Knob("stage2_epochs", "int"),
    Knob("stage3_epochs", "int"),
    Knob("positional_encoding", "cat"),
    Knob("aggregation", "cat"),
    Knob("noise_level", "cat"),
    Knob("denoiser", "cat"),
    Knob("mse_weight", "float"),
    Knob("lr", "log"),
)
KNOB_NAMES: tuple[str, ...] = tuple(k.name for k in KNOBS)
assert set(KNOB_NAMES) <= set(field_names()), "every analysed knob must be a TrialConfig field"


def by_name(name: str) -> Knob:
    for knob in KNOBS:
        if knob.name == name:
            return knob
    raise ValueError(f"knob {name!r} is not one of {', '.join(KNOB_NAMES)}")


def default_of(name: str) -> Any:
    return getattr(TrialConfig(), name)


def fmt_value(value: Any) -> str:
    """A knob value as the report prints it: 0.001 -> '0.001', 1e-05 -> '1e-05'."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if np.isnan(value) else f"{float(value):.4g}"
    return str(value)


@dataclass(frozen=True)
class Levels:
    """Level labels of one knob for a set of rows, in display order, with plot positions."""

    labels: pd.Series  # per row: the level label, <NA> where the knob does not apply
    order: tuple[str, ...]
    x: dict[str, float]  # plot position of each level (category index or a representative value)
    binned: bool


def make_levels(table: pd.DataFrame, knob: Knob) -> Levels:
    """Group the knob's values in `table` into levels (see the module docstring)."""
    mask = knob.applies(table) & table[knob.name].notna()
    values = table.loc[mask, knob.name]
    labels = pd.Series(pd.NA, index=table.index, dtype="string")
    if knob.kind == "cat":
        present = set(values.astype(str))
        choices = allowed_values(knob.name) or ()
        order = tuple(str(c) for c in choices if str(c) in present) + tuple(
            sorted(present - {str(c) for c in choices})
        )
        labels[mask] = values.astype(str)
        return Levels(labels, order, {lv: float(i) for i, lv in enumerate(order)}, False)
    numeric = values.astype(float)
    distinct = np.unique(numeric.to_numpy())
    if len(distinct) <= MAX_DISTINCT_AS_LEVELS:
        order = tuple(fmt_value(v) for v in distinct)
        labels[mask] = numeric.map(fmt_value)
        return Levels(labels, order, {fmt_value(v): float(v) for v in distinct}, False)
    bins = pd.qcut(numeric, N_BINS, duplicates="drop")
    order, x = [], {}
    for interval in bins.cat.categories:
        inside = numeric[bins == interval]
        if inside.empty:
            continue
        label = f"{fmt_value(inside.min())}..{fmt_value(inside.max())}"
        order.append(label)
        # The median of the values in the bin, geometric for log knobs: where the bin "is".
        geometric = knob.kind == "log" and inside.min() > 0
        x[label] = float(np.exp(np.median(np.log(inside))) if geometric else np.median(inside))
        labels[inside.index] = label
    return Levels(labels, tuple(order), x, True)
