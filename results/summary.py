"""Per-dataset summaries: trial counts, the confirmed best config, baselines, published numbers.

Only completed trials are ranked. Pruned trials stopped at a lower budget, so they are listed
apart, flagged, and never ranked with finished ones.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from results.knobs import active, by_name, fmt_value
from results.table import ERROR_STATUSES, PHASES, STATUSES

# ADRec's published test numbers (KDD 2025, Table 2) where they exist, as fractions.
PUBLISHED: dict[str, dict[str, float]] = {
    "beauty": {"test_HR@20": 0.1682, "test_NDCG@20": 0.0832},
    "sports": {"test_HR@20": 0.0816, "test_NDCG@20": 0.0364},
}


def status_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Trials per (dataset, phase) and status, every status a column."""
    counts = table.groupby(["dataset", "phase", "status"]).size().unstack("status", fill_value=0)
    counts = counts.reindex(columns=list(STATUSES), fill_value=0)
    counts = counts.reset_index()
    rank = counts["phase"].map({p: i for i, p in enumerate(PHASES)})
    counts = counts.assign(_rank=rank).sort_values(["dataset", "_rank"]).drop(columns="_rank")
    counts = counts.reset_index(drop=True)
    counts.columns.name = None
    counts["total"] = counts[list(STATUSES)].sum(axis=1)
    return counts


def best_configs(table: pd.DataFrame, metric: str, knobs: list[str],
                 cost_metrics: list[str]) -> pd.DataFrame:
    """Per dataset, the best confirmed config: mean and spread over its confirm seeds.

    Without confirm trials, the best paired/optimize config by its seed-mean is shown, marked
    `confirmed=False` (a single lucky seed is the winner's curse the confirm phase guards against).
    """
    rows = []
    done = table[(table["status"] == "completed") & (table["model"] == "adrec")
                 & (table["phase"] != "baseline") & table[metric].notna()]
    for dataset, part in done.groupby("dataset", sort=True):
        confirm = part[part["phase"] == "confirm"]
        pool, confirmed = (confirm, True) if not confirm.empty else (part, False)
        means = pool.groupby("config_id")[metric].mean()
        best_id = means.idxmax()
        runs = pool[pool["config_id"] == best_id]
        row = {"dataset": dataset, "confirmed": confirmed, "config_id": best_id,
               "seeds": int(runs["seed"].nunique()), f"{metric}_mean": runs[metric].mean(),
               f"{metric}_sd": runs[metric].std(ddof=1), f"{metric}_min": runs[metric].min(),
               f"{metric}_max": runs[metric].max()}
        for m in cost_metrics:
            if m in runs:
                row[f"{m}_mean"] = runs[m].mean()
                row[f"{m}_sd"] = runs[m].std(ddof=1)
        first = runs.iloc[[0]]
        row["knobs"] = ", ".join(f"{k}={fmt_value(first[k].iloc[0])}" for k in knobs
                                 if k in runs and active(first, by_name(k)).iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def comparison(best: pd.DataFrame, table: pd.DataFrame, metric: str,
               cost_metrics: list[str]) -> pd.DataFrame:
    """Per dataset: the confirmed best ADRec, each baseline model and the published ADRec cells.

    Values are means over seeds (± sd where there are several), test metrics as fractions.
    """
    rows = []
    base = table[(table["status"] == "completed")
                 & ((table["phase"] == "baseline") | (table["model"] != "adrec"))]
    for _, b in best.iterrows():
        label = "ADRec, confirmed best" if b["confirmed"] else "ADRec, best (not confirmed)"
        row = {"dataset": b["dataset"], "model": label, "runs": b["seeds"],
               metric: b[f"{metric}_mean"]}
        row.update({m: b.get(f"{m}_mean", np.nan) for m in cost_metrics})
        row.update({f"{m}_sd": b.get(f"{m}_sd", np.nan) for m in cost_metrics})
        rows.append(row)
        for model, runs in base[base["dataset"] == b["dataset"]].groupby("model", sort=True):
            row = {"dataset": b["dataset"], "model": model, "runs": len(runs),
                   metric: runs[metric].mean()}
            row.update({m: runs[m].mean() for m in cost_metrics if m in runs})
            row.update({f"{m}_sd": runs[m].std(ddof=1) for m in cost_metrics if m in runs})
            rows.append(row)
        published = published_for(str(b["dataset"]))
        if published:
            rows.append({"dataset": b["dataset"], "model": "ADRec, published", "runs": np.nan,
                         metric: np.nan, **{m: published.get(m, np.nan) for m in cost_metrics}})
    return pd.DataFrame(rows)


def published_for(dataset: str) -> dict[str, float] | None:
    """The published cells for a dataset name like 'beauty' or 'amazon-beauty'."""
    name = dataset.lower()
    for key, cells in PUBLISHED.items():
        if key in name:
            return cells
    return None


def top_trials(table: pd.DataFrame, dataset: str, metric: str, knobs: list[str],
               n: int = 8) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(the n best completed ADRec trials ranked, every pruned trial flagged and unranked, every
    diverged or failed trial). Callers that show fewer rows say how many they leave out."""
    part = table[(table["dataset"] == dataset) & (table["model"] == "adrec")
                 & (table["phase"] != "baseline")].copy()
    for k in knobs:  # a conditional knob's value means nothing where it is inactive
        part[k] = part[k].astype(object).where(active(part, by_name(k)), None)
    cols = ["trial_id", "phase", "seed", "status", metric, *knobs]
    cols = [c for c in dict.fromkeys(cols) if c in part]
    done = part[part["status"] == "completed"].sort_values(metric, ascending=False).head(n)
    done = done[cols].reset_index(drop=True)
    done.insert(0, "rank", range(1, len(done) + 1))
    pruned = part[part["status"] == "pruned"].sort_values(metric, ascending=False)[cols]
    pruned = pruned.assign(flag="pruned: lower budget, not ranked").reset_index(drop=True)
    bad_cols = [c for c in ("trial_id", "phase", "status", *knobs, "error") if c in part]
    bad = part[part["status"].isin(ERROR_STATUSES)][bad_cols]
    return done, pruned, bad.reset_index(drop=True)


def failed_trials(table: pd.DataFrame, knobs: list[str]) -> pd.DataFrame:
    """Every diverged or failed trial with its knobs and error (the report's full list)."""
    cols = [c for c in ("dataset", "trial_id", "phase", "model", "seed", "status", *knobs, "error")
            if c in table]
    return table[table["status"].isin(ERROR_STATUSES)][cols].reset_index(drop=True)
