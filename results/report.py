"""Write a sweep's report: report.md, self-contained report.html and hiplot.html, plots/*.png,
and the summary tables as tables/<name>.csv and .parquet."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from results import plots, summary
from results.analysis import Analysis, analyse
from results.hiplot import write_hiplot
from results.render import Block, Bullets, Heading, Image, Para, Table, to_html, to_markdown
from results.effects import ALPHA
from results.table import DEFAULT_METRIC

log = logging.getLogger(__name__)

WORDS = (
    "What the verdict words mean. Every comparison uses the completed trials of the paired phase "
    "(the same configs on every dataset), one unit per config with its metric averaged over "
    "seeds, and a level model per dataset: the metric as a sum of per-knob level effects (numeric "
    "knobs binned, with a linear term on their scale) plus the pairwise interactions that pass an "
    "F-test (Holm-adjusted) and exceed the seed noise, fitted by least squares; a conditional knob "
    "only on the configs where it is active. A knob's effect is the range of its adjusted level "
    "means (partial dependence), with a 95% interval simultaneous over its level pairs from a "
    "bootstrap over configs (max-|t|). "
    "MATTERS: the interval excludes 0 and the effect exceeds the seed-noise floor (the standard "
    "deviation of one run when only its seed changes). "
    "DEPENDS ON J: no such effect on average, but it matters at some level of the knob J it "
    "interacts with. "
    "SMALL: the interval excludes 0 but the effect is below the floor: real, and smaller than "
    "what reseeding one run changes. "
    "EQUIVALENT: the interval includes 0 and lies inside +/- the floor (two one-sided tests): "
    "any value tried is as good as another, within the seed noise. "
    "NOT DETECTED: none of these; the interval's upper end says how large the effect could be, so "
    "this is not a claim of no effect."
)


def build_report(table: pd.DataFrame, out_dir: Path, metric: str = DEFAULT_METRIC,
                 n_boot: int = 2000, seed: int = 0, title: str | None = None) -> Path:
    """Analyse `table` and write the report into `out_dir`; returns the path of report.html.

    Raises `table.TableError` (with the reason) when the table cannot be analysed.
    """
    result = analyse(table, metric=metric, n_boot=n_boot, seed=seed)
    return write_report(result, Path(out_dir), title or _sweep_name(table))


def write_report(result: Analysis, out_dir: Path, name: str = "sweep") -> Path:
    """Write the files of an existing analysis into `out_dir`; returns the report.html path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("rendering plots and tables")
    blocks = document(result, name)
    write_tables(result, out_dir / "tables")
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    for block in blocks:
        if isinstance(block, Image):
            (plot_dir / f"{block.name}.png").write_bytes(block.png)
    (out_dir / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(to_html(blocks, f"ADRec sensitivity: {name}"), encoding="utf-8")
    log.info("writing hiplot.html")
    write_hiplot(result, out_dir / "hiplot.html")
    log.info("report written to %s", out_dir)
    return html_path


def _sweep_name(table: pd.DataFrame) -> str:
    if "sweep" in table and table["sweep"].notna().any():
        return ", ".join(sorted(table["sweep"].dropna().astype(str).unique()))
    return "sweep"


def write_tables(result: Analysis, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, frame in result.tables().items():
        frame.to_csv(folder / f"{stem}.csv", index=False)
        _parquet_safe(frame).to_parquet(folder / f"{stem}.parquet", index=False)


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing types (a level label next to a number) become strings."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            kinds = {type(v) for v in out[column].dropna()}
            if len(kinds) > 1:
                out[column] = out[column].map(lambda v: None if pd.isna(v) else str(v))
    return out


# --- the document ---------------------------------------------------------------------------

MAX_ROWS = 8  # rows of a long list shown in the report; the rest is counted and in tables/


def _head(frame: pd.DataFrame, caption: str, n: int = MAX_ROWS) -> list[Block]:
    """The first n rows, and a line saying how many more there are (never a silent cut)."""
    blocks: list[Block] = [Table(frame.head(n), caption)]
    if len(frame) > n:
        blocks.append(Para(f"... and {len(frame) - n} more (all in the tables/ folder)."))
    return blocks


def document(result: Analysis, name: str) -> list[Block]:
    m = result.metric
    blocks: list[Block] = [
        Heading(1, f"ADRec sensitivity report: {name}"),
        Para(f"Objective (selection and importance): {m}. Costs and published comparisons: "
             f"{', '.join(result.cost_metrics) or 'none'}. Datasets: "
             f"{', '.join(result.datasets)}. Trials in the table: {len(result.table)}."),
    ]
    blocks += _answer(result)
    blocks += _plots(result)
    blocks += [Heading(2, "Detail"), Heading(3, "How to read"), Para(WORDS)]
    if result.warnings:
        blocks += [Heading(3, "Warnings"), Bullets(tuple(result.warnings))]
    blocks += [Heading(3, "Knobs"),
               Para("Analysed (they vary in the paired trials): "
                    + (", ".join(k.name for k in result.varying) or "none") + ".")]
    if not result.fixed.empty:
        blocks.append(Table(result.fixed, "Not analysed (the authors' default beside it)"))
    blocks += _effects(result)
    blocks += _cross_dataset(result)
    blocks += _open_questions(result)
    for dataset in result.datasets:
        blocks += _dataset_section(result, dataset)
    return blocks


def _answer(result: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading(2, "The answer")]
    analysed = result.verdict[result.verdict["analysed"].astype(bool)]
    blocks.append(Table(result.verdict_grid, "Verdict per knob and dataset (words defined under "
                                             "'How to read'; effects adjusted for the other knobs)"))
    blocks.append(Bullets(tuple(f"{k}: {v}" for k, v in zip(analysed["knob"],
                                                             analysed["verdict"]))))
    if not result.best_knobs.empty:
        best = result.best.set_index("dataset")
        score = {d: f"{best.loc[d, f'{result.metric}_mean']:.4f} over {_seeds(best.loc[d, 'seeds'])}"
                 + ("" if best.loc[d, "confirmed"] else " (not confirmed)") for d in best.index}
        frame = pd.concat([pd.DataFrame([{"knob": result.metric, **score}]), result.best_knobs],
                          ignore_index=True)
        blocks.append(Table(frame, "Best config per dataset (confirmed with fresh seeds where a "
                                   "confirm phase ran) and its knob values"))
    if not result.default_vs_tuned.empty:
        blocks.append(Table(result.default_vs_tuned, "The authors' default against the tuned "
                                                     "best: gap = tuned - default, one-sided "
                                                     "95% upper bound (Welch); non-inferior when "
                                                     "it is below the margin (the metric's seed "
                                                     "noise)"))
    if not result.recommended.empty:
        blocks.append(Table(result.recommended, "Recommended values: levels not beaten by the "
                                                "best level by an effect that matters"))
    return blocks


def _plots(result: Analysis) -> list[Block]:
    m = result.metric
    blocks: list[Block] = [Heading(2, "Plots")]
    if not result.shares.empty:
        blocks.append(Image("variance_shares", plots.variance_plot(result.shares),
                            "variance shares per dataset"))
    for knob in tqdm(result.varying, desc="plots", unit="knob", disable=None):
        if (result.levels["knob"] == knob.name).any():
            blocks.append(Image(f"knob_{knob.name}",
                                plots.marginal_plot(result.levels, knob, m), knob.name))
    cells = result.heatmaps
    if not cells.empty:
        for (dataset, a, b), part in cells.groupby(["dataset", "knob_a", "knob_b"], sort=False):
            blocks.append(Image(f"interaction_{_slug(str(dataset))}_{a}_{b}",
                                plots.heatmap_plot(part, m), f"{a} x {b} on {dataset}"))
    else:
        blocks.append(Para("No interaction between two knobs passed the screen on any dataset."))
    if not result.expected_max.empty:
        blocks.append(Image("expected_max", plots.expected_max_plot(result.expected_max, m),
                            "expected best score vs trials"))
    if result.cross_dataset:
        blocks.append(Image("kendall_tau", plots.kendall_heatmap(result.kendall),
                            "Kendall tau heatmap"))
    return blocks


def _effects(result: Analysis) -> list[Block]:
    cols = ["knob", "dataset", "n_configs", "levels", "best_level", "worst_level", "effect",
            "ci_low", "ci_high", "noise_floor", "word", "depends_on", "reason"]
    eff = result.effects[result.effects["word"] != "not varied"]
    blocks: list[Block] = [
        Heading(3, "Seed-noise floor per dataset"),
        Table(result.noise.rename(columns={"noise_sd": f"noise_sd ({result.metric})"}),
              "pooled standard deviation over configs repeated with different seeds"),
        Heading(3, "Effects, adjusted for the other knobs"),
        Table(eff[cols], f"effect = range of adjusted level means; {1 - ALPHA:.0%} interval "
                         "simultaneous over level pairs (bootstrap max-|t| over configs)")]
    if not result.conditional.empty:
        blocks += [Heading(3, "Conditional effects (where a knob interacts)"),
                   Table(result.conditional.drop(columns="reason"),
                         "a knob's effect at each level of its interaction partner")]
    inter = result.interactions
    kept = inter[inter["kept"].astype(bool)] if len(inter) else inter
    blocks += [Heading(3, "Interactions"),
               Para("Every pair of knobs is screened per dataset by the F-test of adding its "
                    "interaction block to the additive model (Holm over all pairs); a pair is "
                    "kept when significant and its largest difference-in-differences (did) "
                    "exceeds the seed noise, then the rest are re-screened (forward selection, "
                    "at most 3 per dataset). share = variance explained, unnormalised."),
               Table(kept, "kept interactions") if len(kept) else
               Para("No interaction kept on any dataset.")]
    blocks += [Heading(3, "Importance"),
               Para("anova_main / anova_interactions: the knob's share of the variance of the "
                    "config means in the level model's functional ANOVA (its main effect; the "
                    "kept interactions it is part of), unnormalised, sorted by their sum. The "
                    "rest is seed noise and the remainder (see variance_shares). PED-ANOVA "
                    "(Optuna) on the configs where the knob is active, with gamma' chosen so "
                    "the top set holds >= 10 configs (blank where it cannot)."),
               Table(result.importance, "importance per dataset"),
               Table(result.shares, "variance shares (functional ANOVA of the level model)")]
    blocks += [Heading(3, "Tunability (Probst, Boulesteix & Bischl 2019)"),
               Para("Gain from tuning one knob with every other knob at the authors' default, "
                    "from the level model of each dataset; interval = bootstrap percentile."),
               Table(result.tunability)]
    fails = result.failures
    shown = fails[(fails["diverged"] + fails["failed"]) > 0] if len(fails) else fails
    blocks += [Heading(3, "Failures by level"),
               Para("Diverged and failed paired runs per knob level (flagged: rate >= 10%, "
                    ">= 3 runs, Fisher's exact test against the knob's other levels, "
                    "Bonferroni over the dataset's levels).")]
    blocks += (_head(shown.sort_values("bad_rate", ascending=False), "levels with failures", 20)
               if len(shown) else [Para("No paired run diverged or failed.")])
    return blocks


def _cross_dataset(result: Analysis) -> list[Block]:
    m = result.metric
    blocks: list[Block] = [Heading(3, "Across datasets")]
    if not result.cross_dataset:
        blocks.append(Para(f"Note: only one dataset ({', '.join(result.datasets)}) has completed "
                           "analysed trials, so the cross-dataset sections (best-level agreement, "
                           "rank agreement, universal values, config regret) are skipped. Run "
                           "the sweep on two or more datasets to get them."))
        return blocks
    blocks += [Table(result.agreement, "best level per dataset; agrees: same best level on every "
                                       "dataset where the knob matters"),
               Table(result.kendall_pairs, "Kendall's tau between datasets over paired configs"),
               Para("Universal value of each knob: the level with the smallest mean relative "
                    f"regret of its adjusted {m} over datasets; regret = what it costs against "
                    "each dataset's best level (interval from the knob's simultaneous family); "
                    "cost_ columns are the same difference on the test metrics."),
               Table(result.universal),
               Para("Whole config: one paired config for every dataset against each dataset's "
                    "best paired config. Both are chosen on the runs they are scored on, so the "
                    "whole selection is re-run in a parametric bootstrap of the seed noise: "
                    "regret_corrected subtracts its optimism (with a 95% interval), tie_q95 is "
                    "the regret a pure tie produces 95% of the time; the regret is within noise "
                    "unless it exceeds tie_q95 and the seed noise."),
               Table(result.config_regret)]
    return blocks


def _open_questions(result: Analysis) -> list[Block]:
    q = result.open_questions
    blocks: list[Block] = [Heading(3, "The authors' open questions")]
    for question, part in q.groupby("question", sort=False):
        blocks.append(Para(str(question)))
        blocks.append(Bullets(tuple(f"{d}: {a}" if d else a
                                    for d, a in zip(part["dataset"], part["answer"]))))
    return blocks


def _dataset_section(result: Analysis, dataset: str) -> list[Block]:
    m, cost = result.metric, result.cost_metrics
    knobs = [k.name for k in result.varying]
    blocks: list[Block] = [Heading(2, f"Dataset: {dataset}")]
    status = result.status[result.status["dataset"] == dataset].drop(columns="dataset")
    blocks += [Heading(3, "Trials"), Table(status, "trials per phase and status")]
    lev = result.levels[result.levels["dataset"] == dataset]
    lev = lev.assign(**{"95% CI": [f"[{lo:.4g}, {hi:.4g}]" for lo, hi in
                                   zip(lev["ci_low"], lev["ci_high"])]})
    lev = lev[["knob", "level", "n_configs", "raw_mean", "mean", "95% CI", "recommended",
               *cost, "runs", "diverged_rate", "failed_rate"]].rename(
        columns={"mean": f"adjusted {m}", "raw_mean": f"raw {m}", "runs": "paired runs"})
    blocks += [Heading(3, "Metric per level"), Table(lev, "adjusted = the level model's partial "
                                                          "dependence; raw = plain level mean")]
    best = result.best[result.best["dataset"] == dataset].drop(columns="dataset")
    comp = result.comparison[result.comparison["dataset"] == dataset].drop(columns="dataset")
    blocks += [Heading(3, "Best configuration, baselines and published numbers"),
               Table(best, "mean and spread over the confirm seeds"), Table(comp)]
    done, pruned, bad = summary.top_trials(result.table, dataset, m, knobs)
    blocks += [Heading(3, "Top completed trials"), Table(done)]
    if not pruned.empty:
        blocks += _head(pruned, "pruned trials: stopped early at a lower budget, not ranked")
    if not bad.empty:
        blocks += _head(bad, "diverged or failed trials")
    blocks.append(Image(f"trials_{_slug(dataset)}", plots.trials_plot(result.table, dataset, m),
                        f"trials on {dataset}"))
    return blocks


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"
