"""Figures as PNG bytes (matplotlib's object API with the Agg canvas: no pyplot global state,
no display needed). Each function takes the analysis DataFrames and returns the encoded image."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: never open a window

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from results.knobs import Knob

DPI = 100
PHASE_COLOURS = {"paired": "tab:blue", "optimize": "tab:orange", "confirm": "tab:green"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def knob_plot(levels: pd.DataFrame, knob: Knob, metric: str) -> bytes:
    """Mean metric per level of one knob, one line per dataset, 95% intervals as bars.

    Datasets differ in scale, so each line is divided by its dataset's mean over the levels
    shown: the lines compare *shapes*; the tables hold the raw values.
    """
    part = levels[levels["knob"] == knob.name]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    categorical = knob.kind == "cat" or bool(part["binned"].any())
    order = list(dict.fromkeys(part.sort_values("x")["level"]))
    for dataset, cell in part.groupby("dataset", sort=True):
        cell = cell.set_index("level").reindex([lv for lv in order if lv in set(cell["level"])])
        scale = cell["mean"].mean() or 1.0
        x = [order.index(lv) for lv in cell.index] if categorical else cell["x"].to_numpy()
        y = cell["mean"].to_numpy() / scale
        err = np.vstack([y - cell["ci_low"].to_numpy() / scale,
                         cell["ci_high"].to_numpy() / scale - y])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=str(dataset))
    if categorical:
        ax.set_xticks(range(len(order)), order, rotation=20, ha="right")
    elif knob.kind == "log" and (part["x"] > 0).all():
        ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(knob.name)
    ax.set_ylabel(f"{metric} / dataset mean")
    ax.set_title(f"{metric} against {knob.name} (95% bootstrap intervals)", fontsize=9)
    ax.legend(fontsize=7, title="dataset", title_fontsize=7)
    return _png(fig)


def importance_plot(importance: pd.DataFrame) -> bytes:
    """Normalised PED-ANOVA and fANOVA importance per knob, grouped bars per dataset."""
    fig = Figure(figsize=(9, 0.35 * max(4, importance["knob"].nunique()) + 1.2))
    axes = fig.subplots(1, 2, sharey=True)
    knobs = sorted(importance["knob"].unique())
    datasets = sorted(importance["dataset"].unique())
    height = 0.8 / max(1, len(datasets))
    titles = ["PED-ANOVA", "fANOVA (conditional knobs omitted)"]
    for ax, column, title in zip(axes, ["ped_anova", "fanova"], titles):
        for i, dataset in enumerate(datasets):
            cell = importance[importance["dataset"] == dataset].set_index("knob").reindex(knobs)
            ax.barh(np.arange(len(knobs)) + i * height, cell[column].fillna(0.0), height,
                    label=str(dataset))
        ax.set_title(title)
        ax.set_xlabel("normalised importance")
    axes[0].set_yticks(np.arange(len(knobs)) + 0.4 - height / 2, knobs)
    axes[1].legend(fontsize=7, title="dataset", title_fontsize=7)
    return _png(fig)


def kendall_heatmap(matrix: pd.DataFrame) -> bytes:
    """Kendall's tau between datasets of the per-config mean metric."""
    n = len(matrix)
    fig = Figure(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    ax = fig.subplots()
    image = ax.imshow(matrix.to_numpy(float), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(n), matrix.index)
    for i in range(n):
        for j in range(n):
            value = matrix.iat[i, j]
            dark = pd.notna(value) and abs(value) > 0.6
            ax.text(j, i, "n/a" if pd.isna(value) else f"{value:.2f}", ha="center", va="center",
                    fontsize=8, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="Kendall's tau")
    ax.set_title("Rank agreement of paired configs", fontsize=9)
    return _png(fig)


def trials_plot(table: pd.DataFrame, dataset: str, metric: str) -> bytes:
    """Every ADRec trial of a dataset by phase; pruned ones as grey crosses (lower budget)."""
    part = table[(table["dataset"] == dataset) & (table["model"] == "adrec")
                 & (table["phase"] != "baseline") & table[metric].notna()].reset_index(drop=True)
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    done = part[part["status"] == "completed"]
    for phase, cell in done.groupby("phase", sort=True):
        ax.scatter(cell.index, cell[metric], s=12, color=PHASE_COLOURS.get(phase, "tab:purple"),
                   label=f"{phase} (completed)")
    pruned = part[part["status"] == "pruned"]
    if not pruned.empty:
        ax.scatter(pruned.index, pruned[metric], s=14, marker="x", color="grey",
                   label="pruned (lower budget, not ranked)")
    ax.set_xlabel("trial (table order)")
    ax.set_ylabel(metric)
    ax.set_title(f"{dataset}: every trial", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)
