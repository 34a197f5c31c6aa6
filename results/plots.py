"""Figures as PNG bytes (matplotlib's object API with the Agg canvas: no pyplot global state,
no display needed). Each function takes the analysis DataFrames and returns the encoded image."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: never open a window

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from adrec.record import PHASES
from results.knobs import Knob, is_categorical, is_log

DPI = 100
PHASE_COLOURS = dict(zip(PHASES, ("tab:blue", "tab:orange", "tab:green", "tab:grey")))


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def marginal_plot(levels: pd.DataFrame, knob: Knob, metric: str) -> bytes:
    """Adjusted mean per level of one knob (partial dependence of the level model, 95% bootstrap
    intervals), one panel per dataset; raw level means as hollow markers, recommended levels
    filled."""
    part = levels[levels["knob"] == knob.name]
    datasets = sorted(part["dataset"].unique())
    fig = Figure(figsize=(min(3.0 * len(datasets), 15), 2.9))
    axes = np.atleast_1d(fig.subplots(1, len(datasets), squeeze=False)[0])
    categorical = is_categorical(knob) or bool(part["binned"].any())
    order = list(dict.fromkeys(part.sort_values("x")["level"]))
    for ax, dataset in zip(axes, datasets):
        cell = part[part["dataset"] == dataset].set_index("level")
        cell = cell.reindex([lv for lv in order if lv in cell.index])
        x = np.array([order.index(lv) for lv in cell.index]) if categorical else \
            cell["x"].to_numpy(float)
        y = cell["mean"].to_numpy(float)
        err = np.vstack([y - cell["ci_low"].to_numpy(float), cell["ci_high"].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=np.clip(err, 0, None), color="tab:blue", lw=1, capsize=3,
                    label="adjusted (95% CI)")
        rec = cell["recommended"].fillna(False).astype(bool).to_numpy()
        ax.scatter(x[rec], y[rec], color="tab:blue", zorder=3, s=22, label="recommended")
        ax.scatter(x, cell["raw_mean"].to_numpy(float), facecolors="none", edgecolors="grey",
                   s=22, zorder=2, label="raw mean")
        if categorical:
            ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=7)
        elif is_log(knob) and (cell["x"] > 0).all():
            ax.set_xscale("log")
        ax.set_title(str(dataset), fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel(metric, fontsize=8)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{metric} against {knob.name} (adjusted for the other knobs)", fontsize=9)
    return _png(fig)


def variance_plot(shares: pd.DataFrame, top: int = 6) -> bytes:
    """Unnormalised variance shares per dataset: the largest main effects, the interactions,
    the seed noise and the remainder, as stacked bars (the rest of the knobs as 'other knobs')."""
    datasets = sorted(shares["dataset"].unique())
    mains = shares[shares["kind"] == "main"].groupby("component")["share"].max()
    keep = list(mains.sort_values(ascending=False).head(top).index)
    fig = Figure(figsize=(8, 0.5 * len(datasets) + 1.6))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20"]
    labels = [*keep, "other knobs", "interactions", "seed noise",
              "other interactions and lack of fit"]
    left = np.zeros(len(datasets))
    for i, label in enumerate(labels):
        values = []
        for dataset in datasets:
            part = shares[shares["dataset"] == dataset]
            if label == "other knobs":
                v = part[(part["kind"] == "main") & ~part["component"].isin(keep)]["share"].sum()
            elif label == "interactions":
                v = part[part["kind"] == "interaction"]["share"].sum()
            elif label in ("seed noise", "other interactions and lack of fit"):
                v = part[part["component"] == label]["share"].sum()
            else:
                v = part[(part["kind"] == "main") & (part["component"] == label)]["share"].sum()
            values.append(float(np.nan_to_num(v)))
        ax.barh(datasets, values, left=left, color=colours(i % 20), label=label)
        left += np.array(values)
    ax.set_xlabel("share of the variance of the config means (unnormalised)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("What explains the metric: functional ANOVA of the level model", fontsize=9)
    return _png(fig)


def heatmap_plot(cells: pd.DataFrame, metric: str) -> bytes:
    """Adjusted mean of each (level of a, level of b) cell of one interacting pair."""
    a, b = cells["knob_a"].iloc[0], cells["knob_b"].iloc[0]
    grid = cells.pivot_table(index="level_a", columns="level_b", values="mean", sort=False)
    counts = cells.pivot_table(index="level_a", columns="level_b", values="n_configs", sort=False)
    fig = Figure(figsize=(1.1 * grid.shape[1] + 2.5, 0.6 * grid.shape[0] + 1.8))
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    middle = np.nanmean([np.nanmin(grid.to_numpy(float)), np.nanmax(grid.to_numpy(float))])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value, n = grid.iat[i, j], counts.iat[i, j]
            if pd.notna(value):  # dark text on the bright end of viridis
                ax.text(j, i, f"{value:.4f}\nn={int(n) if pd.notna(n) else 0}", ha="center",
                        va="center", fontsize=6, color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label=f"adjusted {metric}")
    ax.set_title(f"{cells['dataset'].iloc[0]}: {a} x {b}", fontsize=9)
    return _png(fig)


def expected_max_plot(curves: pd.DataFrame, metric: str) -> bytes:
    """Expected best validation score of k random trials (Dodge et al. 2019), +/- 1 sd."""
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for dataset, part in curves.groupby("dataset", sort=True):
        k, m, sd = (part[c].to_numpy(float) for c in ("trials", "expected_max", "sd"))
        ax.plot(k, m, marker=".", label=str(dataset))
        ax.fill_between(k, m - sd, m + sd, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("trials (random paired configs)")
    ax.set_ylabel(f"expected best {metric}")
    ax.set_title("Expected best validation score vs number of trials", fontsize=9)
    ax.legend(fontsize=7)
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
