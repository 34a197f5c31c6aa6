"""Across datasets: does each knob's best value agree, do configs rank alike, what does one value
for every dataset cost, and the verdict in words.

Pure DataFrame functions over the per-dataset fits (`effects.DatasetFit`) and their tables. The
*universal* value of a knob is the level with the smallest mean relative regret of its adjusted
mean over the datasets (the data-optimal default of Probst, Boulesteix & Bischl 2019); its cost on
a dataset is the best level's adjusted mean minus its own, judged with the same simultaneous
interval as the knob's effect. Tunability proper (from the authors' default) is
`effects.tunability`.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from results import model as lm
from results.effects import ALPHA, DatasetFit, _pair_family, judge
from results.failures import flagged_text
from results.knobs import KNOB_NAMES

NOT_COVERED = "not covered by this sweep"
MIN_COMMON_CONFIGS = 3  # Kendall's tau on fewer common configs is not a correlation


def best_level_agreement(effects: pd.DataFrame) -> pd.DataFrame:
    """Per knob: the best level on each dataset, where the knob matters, and whether the best
    levels agree among the datasets where it matters (NA when it matters on fewer than two)."""
    rows = []
    for knob, part in effects.groupby("knob", sort=False):
        mattering = part[part["word"] == "matters"]
        bests = set(mattering["best_level"])
        row = {"knob": knob, "matters_on": ", ".join(mattering["dataset"]),
               "agrees": pd.NA if len(mattering) < 2 else len(bests) == 1}
        row.update({f"best_{d}": b for d, b in zip(part["dataset"], part["best_level"])})
        rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty:
        out["agrees"] = out["agrees"].astype("boolean")
    return out


def kendall_matrix(units: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kendall's tau between datasets of the per-config mean metric, over their common configs.

    Returns (matrix datasets x datasets, long table with n_common and the p-value).
    """
    wide = units.pivot_table(index="config_id", columns="dataset", values=metric)
    datasets = list(wide.columns)
    matrix = pd.DataFrame(np.eye(len(datasets)), index=datasets, columns=datasets)
    rows = []
    for i, a in enumerate(datasets):
        for b in datasets[i + 1:]:
            both = wide[[a, b]].dropna()
            if len(both) < MIN_COMMON_CONFIGS:
                warnings.warn(f"datasets {a!r} and {b!r} share {len(both)} completed paired "
                              f"configs; Kendall's tau needs at least {MIN_COMMON_CONFIGS}",
                              stacklevel=2)
                tau, p = np.nan, np.nan
            else:
                res = kendalltau(both[a], both[b])
                tau, p = float(res.statistic), float(res.pvalue)
            matrix.loc[a, b] = matrix.loc[b, a] = tau
            rows.append({"dataset_a": a, "dataset_b": b, "n_common": len(both), "tau": tau,
                         "p_value": p})
    matrix.index.name = "dataset"
    return matrix, pd.DataFrame(rows, columns=["dataset_a", "dataset_b", "n_common", "tau",
                                               "p_value"])


def difference(fit: DatasetFit, knob: str, level_a: str, level_b: str) -> tuple[float, float, float]:
    """adjusted mean(a) - mean(b) with its interval from the knob's simultaneous family."""
    order = fit.levels[knob].order
    eligible = fit.eligible.get(knob, [])
    ia, ib = order.index(level_a), order.index(level_b)
    if ia == ib:
        return 0.0, 0.0, 0.0
    pairs, C, _ = _pair_family(fit, knob)
    sim = lm.simultaneous(fit.m(knob), C, ALPHA)
    for i, (x, z) in enumerate(pairs):
        if (eligible[x], eligible[z]) == (ia, ib):
            return float(sim.estimate[i]), float(sim.low[i]), float(sim.high[i])
        if (eligible[x], eligible[z]) == (ib, ia):
            return float(-sim.estimate[i]), float(-sim.high[i]), float(-sim.low[i])
    return np.nan, np.nan, np.nan


def universal_levels(fits: list[DatasetFit], levels: pd.DataFrame,
                     cost_metrics: list[str]) -> pd.DataFrame:
    """Per (knob, dataset): best level, the universal level and what it costs (module doc)."""
    by_dataset = {f.dataset: f for f in fits if f.model is not None}
    datasets = sorted(by_dataset)
    rows = []
    for knob, part in levels[levels["ranked"].astype(bool)].groupby("knob", sort=False):
        wide = part.pivot_table(index="level", columns="dataset", values="mean")
        wide = wide.reindex(columns=datasets)
        common = wide.dropna()
        if common.empty or len(datasets) < 2:
            continue
        best = wide.max()
        rel = (best - common) / best.abs().replace(0, np.nan)
        universal = rel.mean(axis=1).idxmin()
        for dataset in datasets:
            if wide[dataset].isna().all():
                continue
            fit = by_dataset[dataset]
            best_level = wide[dataset].idxmax()
            est, low, _ = difference(fit, knob, best_level, universal)
            word, _ = judge(abs(est), max(low, 0.0), np.inf, fit.floor)
            row = {"knob": knob, "dataset": dataset, "best_level": best_level,
                   "universal": universal, "regret": est, "ci_low": low,
                   "noise_floor": fit.floor, "within_noise": word != "matters"}
            cell = part[part["dataset"] == dataset].set_index("level")
            for m in cost_metrics:
                if m in cell:
                    row[f"cost_{m}"] = float(cell.loc[best_level, m] - cell.loc[universal, m])
            rows.append(row)
    columns = ["knob", "dataset", "best_level", "universal", "regret", "ci_low", "noise_floor",
               "within_noise", *(f"cost_{m}" for m in cost_metrics)]
    return pd.DataFrame(rows).reindex(columns=columns)


def cell_text(row: pd.Series) -> str:
    """One verdict cell: the word and what it rests on."""
    word = row["word"]
    if word == "matters":
        text = f"matters (best {row['best_level']})"
    elif word == "depends":
        text = f"depends on {row['depends_on']}"
    elif word == "not detected" and pd.notna(row.get("ci_high")):
        text = f"not detected (<= {row['ci_high']:.2g})"
    else:
        text = str(word)
    if word == "matters" and isinstance(row.get("depends_on"), str) and row["depends_on"]:
        text += f"; interacts with {row['depends_on']}"
    return text


def verdict(fixed: pd.DataFrame, effects: pd.DataFrame, agreement: pd.DataFrame,
            universal: pd.DataFrame, tune: pd.DataFrame, failures: pd.DataFrame,
            datasets: list[str], cost_metrics: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per knob with the verdict in words, the knob x dataset table of verdict cells)."""
    rows, cells = [], []
    fixed_setting = dict(zip(fixed["knob"], fixed["setting"]))
    for name in KNOB_NAMES:
        if name in fixed_setting:
            rows.append({"knob": name, "analysed": False, "matters_on": "",
                         "verdict": f"{fixed_setting[name]}; not analysed"})
            continue
        eff = effects[effects["knob"] == name]
        if eff.empty:
            continue
        fails = flagged_text(failures, name)
        cell = {"knob": name}
        for _, e in eff.iterrows():
            text = cell_text(e)
            flag = [f for f in fails if f" of {e['dataset']} runs" in f]
            cell[e["dataset"]] = text + ("; " + "; ".join(flag) if flag else "")
        cells.append(cell)
        agree = agreement[agreement["knob"] == name]
        uni = universal[universal["knob"] == name]
        tun = tune[tune["knob"] == name]
        row = {"knob": name, "analysed": True,
               "matters_on": ", ".join(eff.loc[eff["word"].isin(["matters", "depends"]),
                                               "dataset"]),
               "best_agrees": agree["agrees"].iloc[0] if len(agree) else pd.NA,
               "universal": uni["universal"].iloc[0] if len(uni) else pd.NA,
               "tunability": float(tun["gain"].max()) if len(tun) and tun["gain"].notna().any()
               else np.nan}
        for m in cost_metrics:
            col = f"cost_{m}"
            row[col] = float(uni[col].max()) if len(uni) and col in uni else np.nan
        row["verdict"] = sentence(eff, row, uni, tun, fails, cost_metrics)
        rows.append(row)
    out = pd.DataFrame(rows, columns=["knob", "analysed", "matters_on", "best_agrees", "universal",
                                      "tunability", *(f"cost_{m}" for m in cost_metrics),
                                      "verdict"])
    out["best_agrees"] = out["best_agrees"].astype("boolean")
    out = out.sort_values("analysed", ascending=False, kind="stable").reset_index(drop=True)
    grid = pd.DataFrame(cells).reindex(columns=["knob", *datasets])
    return out, grid


def _grouped(datasets: list[str], labels: list[str]) -> str:
    """'d1, d2 (best a); d3 (best b)' with datasets sharing a label grouped."""
    groups: dict[str, list[str]] = {}
    for d, b in zip(datasets, labels):
        groups.setdefault(str(b), []).append(d)
    return "; ".join(f"{', '.join(ds)} (best {b})" for b, ds in groups.items())


def sentence(eff: pd.DataFrame, row: dict, uni: pd.DataFrame, tun: pd.DataFrame,
             fails: list[str], cost_metrics: list[str]) -> str:
    parts = []
    for word, label in (("matters", "Matters on"), ("depends", "Depends on another knob on"),
                        ("small", "Real but below the seed noise on"),
                        ("equivalent", "Equivalent (within +/- seed noise) on"),
                        ("not detected", "No effect detected on"),
                        ("not varied", "Not varied on")):
        part = eff[eff["word"] == word]
        if part.empty:
            continue
        if word == "matters":
            parts.append(f"{label} {_grouped(list(part['dataset']), list(part['best_level']))}")
            continue
        if word == "depends":
            items = [f"{d} ({r.split(';')[0]})" for d, r in zip(part["dataset"], part["reason"])]
        elif word == "not detected":
            items = [f"{d} (could be up to {h:.2g})" if pd.notna(h) else d
                     for d, h in zip(part["dataset"], part["ci_high"])]
        else:
            items = list(part["dataset"])
        parts.append(f"{label} {', '.join(items)}")
    text = ". ".join(parts) + "."
    partner = eff["depends_on"].astype(object).where(eff["depends_on"].notna(), "").astype(str)
    inter = eff.assign(depends_on=partner)[partner != ""]
    for partner, part in inter.groupby("depends_on", sort=False):
        text += f" Interacts with {partner} on {', '.join(part['dataset'])}."
    if pd.notna(row.get("best_agrees")):
        text += (" The best value agrees across the datasets where it matters." if
                 row["best_agrees"] else " The best value differs between datasets.")
    gains = tun[tun["word"] == "matters"] if len(tun) else tun
    if len(gains):
        top = gains.loc[gains["gain"].idxmax()]
        text += (f" Tuning it alone from the authors' default ({top['default_level']}) gains up "
                 f"to {top['gain']:.2g} ({top['dataset']}, with {top['tuned_level']}).")
    elif len(tun) and tun["gain"].notna().any():
        text += " Tuning it alone from the authors' default gains nothing beyond the seed noise."
    if len(uni):
        costs = " and ".join(f"{row[f'cost_{m}']:.2g} {m.split('_', 1)[-1]}" for m in cost_metrics
                             if pd.notna(row.get(f"cost_{m}")))
        text += f" One value for all ({row['universal']}) costs at most {costs or 'n/a'}"
        text += " (within noise everywhere)." if uni["within_noise"].all() else "."
    if fails:
        joined = "; ".join(fails)
        text += " " + joined[0].upper() + joined[1:] + "."
    return text


def open_questions(fits: list[DatasetFit], effects: pd.DataFrame, n_boot: int,
                   seed: int) -> pd.DataFrame:
    """The authors' open questions, per dataset, from the level model where the sweep covers
    them: two pre-specified contrasts of adjusted means (95% percentile intervals, no
    multiplicity correction) and the effects of lambda and the stage plan."""
    rows = []
    contrasts = [
        ("positional encoding: on vs off", "positional_encoding",
         lambda o: [lv for lv in o if lv != "none"], lambda o: ["none"], "on - off"),
        ("aggregation: cross_attention vs linear", "aggregation",
         lambda o: ["cross_attention"], lambda o: ["linear"], "cross_attention - linear"),
    ]
    for question, knob, group_a, group_b, label in contrasts:
        covered = [f for f in fits if f.model is not None and knob in f.knobs]
        if not covered:
            rows.append({"question": question, "dataset": "", "answer": NOT_COVERED})
            continue
        for fit in covered:
            order = fit.levels[knob].order
            eligible = [order[i] for i in fit.eligible.get(knob, [])]
            a = [lv for lv in group_a(order) if lv in eligible]
            b = [lv for lv in group_b(order) if lv in eligible]
            if not a or not b:
                rows.append({"question": question, "dataset": fit.dataset,
                             "answer": "not covered: a group has too few configs"})
                continue
            model = fit.m(knob)
            mean_of = lambda lvs: np.mean([model.pd_vector({knob: order.index(lv)})  # noqa
                                           for lv in lvs], axis=0)
            c = mean_of(a) - mean_of(b)
            est = float(c @ model.beta)
            boots = model.resamples(c)[:, 0]
            lo, hi = np.nanquantile(boots, [ALPHA / 2, 1 - ALPHA / 2])
            size_lo = lo if est >= 0 else -hi
            word, reason = judge(abs(est), max(size_lo, 0.0), max(abs(lo), abs(hi)), fit.floor)
            rows.append({"question": question, "dataset": fit.dataset,
                         "answer": f"{label} = {est:+.4f} [{lo:+.4f}, {hi:+.4f}]; {word}: "
                                   f"{reason}", "matters": word == "matters", "difference": est,
                         "ci_low": lo, "ci_high": hi, "reason": reason})
    for question, name in (("lambda (weight of x_t + t_emb)", "lambda_uncertainty"),
                           ("stage plan", "stage_plan")):
        eff = effects[(effects["knob"] == name) & (effects["word"] != "not varied")]
        if eff.empty:
            rows.append({"question": question, "dataset": "", "answer": NOT_COVERED})
            continue
        for _, e in eff.iterrows():
            answer = (f"{e['word']}: best {e['best_level']}, worst {e['worst_level']}, adjusted "
                      f"difference {e['effect']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]; "
                      + e["reason"]) if pd.notna(e.get("effect")) else f"not covered: {e['reason']}"
            rows.append({"question": question, "dataset": e["dataset"], "answer": answer,
                         "matters": e["word"] == "matters", "reason": e["reason"]})
    keep = ["question", "dataset", "answer", "matters", "difference", "ci_low", "ci_high", "reason"]
    return pd.DataFrame(rows).reindex(columns=keep)


def _merge_ranges(labels: list[str], order: list[str]) -> str:
    """Adjacent numeric bins 'a..b', 'c..d' -> 'a..d'; categories listed as they are."""
    if not labels:
        return "none"
    if not all(".." in lv for lv in labels):
        return ", ".join(labels)
    idx = sorted(order.index(lv) for lv in labels)
    runs, start = [], idx[0]
    for prev, cur in zip(idx, idx[1:] + [None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{order[start].split('..')[0]}..{order[prev].split('..')[1]}")
            start = cur
    return ", ".join(runs)


def recommended_values(levels: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Per knob: the recommended levels on each dataset (ranked levels not beaten by the best
    one by an effect that matters) and those recommended on every dataset."""
    rows = []
    for knob, part in levels.groupby("knob", sort=False):
        order = list(dict.fromkeys(part.sort_values("x")["level"]))
        row = {"knob": knob}
        common = None
        for dataset in datasets:
            cell = part[(part["dataset"] == dataset) & part["recommended"].fillna(False)
                        .astype(bool)]
            labels = [lv for lv in order if lv in set(cell["level"])]
            row[dataset] = _merge_ranges(labels, order) if len(cell) or dataset in set(
                part["dataset"]) else ""
            if dataset in set(part["dataset"]):
                common = set(labels) if common is None else common & set(labels)
        row["every dataset"] = _merge_ranges([lv for lv in order if lv in (common or set())],
                                             order)
        rows.append(row)
    return pd.DataFrame(rows, columns=["knob", *datasets, "every dataset"])
