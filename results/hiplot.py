"""hiplot.html: every trial of a sweep as HiPlot parallel coordinates, one axis per swept knob.

Axes, left to right: dataset (with two or more), phase, model (with baselines), every knob the
sweep varied (`adrec.config.KNOBS` order, log knobs on a log axis), the objective and the cost
metrics. Lines are coloured by the objective. A knob that is inactive in a trial (λ without
linear aggregation, every knob of a baseline) is blank there: trial-table rows hold null for
inactive knobs. The file is self-contained and opens offline: HiPlot inlines its JavaScript, and
the Google font its CSS imports is replaced by an empty data: URL.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adrec.config import KNOBS, Knob

log = logging.getLogger(__name__)

_FONT_IMPORT = re.compile(r"https://fonts\.googleapis\.com/css\?family=[^\"'\\)\s]*")
_EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*['\"]?https?://", flags=re.I)
# Shown in the table and the tooltips, never as axes: they identify a trial, they do not describe it.
ID_COLUMNS = ("trial_id", "config_id", "seed", "status")


def swept_knobs(table: pd.DataFrame) -> list[Knob]:
    """Knobs with two or more distinct values among the table's ADRec trials, in KNOBS order."""
    adrec = table[table["model"].fillna("adrec") == "adrec"] if "model" in table else table
    out = []
    for name, knob in KNOBS.items():
        if name in adrec and adrec[name].dropna().astype(str).nunique() >= 2:
            out.append(knob)
    return out


def hiplot_rows(table: pd.DataFrame, metric: str, cost_metrics: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(one dict per trial, the axis order). A knob is None where it is inactive (also in a table
    written before rows held null for inactive knobs) and in baseline trials; floats are rounded
    for the table view (knobs to 4 significant digits, metrics to 5 decimals)."""
    knobs = swept_knobs(table)
    axes = [c for c in ("dataset", "phase", "model") if c in table and table[c].dropna().nunique() >= 2]
    axes += [k.name for k in knobs] + [c for c in dict.fromkeys([metric, *cost_metrics]) if c in table]
    keep = [c for c in dict.fromkeys([*axes, *ID_COLUMNS]) if c in table]
    rows = []
    for record in table.to_dict("records"):
        values = {k: _plain(v) for k, v in record.items()}
        adrec = (values.get("model") or "adrec") == "adrec"
        row = {}
        for column in keep:
            value, knob = values[column], KNOBS.get(column)
            if knob is not None:
                value = _knob_value(knob, value) if adrec and knob.is_active(values) else None
            elif isinstance(value, float):
                value = round(value, 5)
            row[column] = value
        rows.append(row)
    return rows, axes


def _knob_value(knob: Knob, value: Any) -> Any:
    if value is None:
        return None
    if knob.scale == "categorical":  # HiPlot shows strings as categories (bools included)
        return str(value).lower() if isinstance(value, bool) else str(value)
    return float(f"{value:.4g}") if knob.kind == "float" else int(value)


def experiment(table: pd.DataFrame, metric: str, cost_metrics: list[str]) -> Any:
    """The HiPlot experiment: knob axes typed by scale, coloured by `metric`, ids hidden from the plot."""
    import hiplot as hip

    rows, axes = hiplot_rows(table, metric, cost_metrics)
    exp = hip.Experiment.from_iterable(rows)
    for name in axes:
        knob = KNOBS.get(name)
        if knob is None:
            kind = hip.ValueType.NUMERIC if name in (metric, *cost_metrics) else hip.ValueType.CATEGORICAL
        elif knob.scale == "categorical":
            kind = hip.ValueType.CATEGORICAL
        else:
            kind = hip.ValueType.NUMERIC_LOG if knob.scale == "log" else hip.ValueType.NUMERIC
        exp.parameters_definition[name].type = kind
    exp.parameters_definition[metric].colormap = "interpolateTurbo"  # blue (worse) to red (better)
    exp.colorby = metric
    present = {c for row in rows for c in row} | {"uid", "from_uid"}  # HiPlot adds its own ids
    # HiPlot draws the parallel plot's `order` from right to left: reversed, the metrics end on the right.
    exp.display_data(hip.Displays.PARALLEL_PLOT).update(
        {"order": axes[::-1], "hide": sorted(present - set(axes))})
    exp.display_data(hip.Displays.TABLE).update({"order": [*axes, *(c for c in ID_COLUMNS if c in present)]})
    return exp


def write_hiplot(result: Any, path: Path) -> None:
    """Write hiplot.html for an analysis (`results.analysis.Analysis`: its table, objective and costs)."""
    table = result.table
    exp = experiment(table, result.metric, list(getattr(result, "cost_metrics", []) or []))
    path = Path(path)
    exp.to_html(str(path))
    text = _FONT_IMPORT.sub("data:text/css,", path.read_text(encoding="utf-8"))
    path.write_text(text, encoding="utf-8")
    external = _EXTERNAL_SCRIPT.findall(text)
    if external:
        log.warning("hiplot.html loads %d external script(s); it will not work offline", len(external))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python, NaN/NA -> None."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


__all__ = ["ID_COLUMNS", "experiment", "hiplot_rows", "swept_knobs", "write_hiplot"]
