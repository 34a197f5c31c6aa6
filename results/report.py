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
from results.stats import ALPHA
from results.table import DEFAULT_METRIC

log = logging.getLogger(__name__)

HOW_TO_READ = (
    "How to read: every comparison uses completed trials of the paired phase (the same configs "
    "on every dataset, no early stopping), one unit per config with its metric averaged over "
    "seeds. A knob's effect on a dataset is its best level's mean minus its worst level's; its "
    "interval is a bootstrap over configs, simultaneous over all level pairs (Bonferroni). An "
    "effect counts only when that interval excludes 0 AND the effect exceeds the dataset's "
    "seed-noise floor (the standard deviation of one run when only its seed changes); otherwise "
    "it is 'within noise'. Numeric knobs are grouped into quantile bins shared by all datasets. "
    "Levels are compared marginally (averaged over the other knobs), so a level that is only "
    "compatible with some other values (an MLP denoiser cannot cross-attend) carries that "
    "imbalance. Costs are test-split differences between levels chosen on the objective. Each "
    "(knob, dataset) cell is judged at 5%: among many cells with few configs each, a flagged "
    "one can still be chance; check n_configs in the tables."
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

def document(result: Analysis, name: str) -> list[Block]:
    m = result.metric
    blocks: list[Block] = [
        Heading(1, f"ADRec sensitivity report: {name}"),
        Para(f"Objective (selection and importance): {m}. Costs and published comparisons: "
             f"{', '.join(result.cost_metrics) or 'none'}. Datasets: "
             f"{', '.join(result.datasets)}. Trials in the table: {len(result.table)}."),
        Para(HOW_TO_READ),
    ]
    if result.warnings:
        blocks += [Heading(2, "Warnings"), Bullets(tuple(result.warnings))]
    blocks += [Heading(2, "Knobs"),
               Para("Analysed (they vary in the paired trials): "
                    + (", ".join(k.name for k in result.varying) or "none") + ".")]
    if not result.fixed.empty:
        blocks.append(Table(result.fixed, "Not analysed (the authors' default beside it)"))
    blocks += _cross_dataset(result)
    blocks += _open_questions(result)
    blocks += _knob_plots(result)
    for dataset in result.datasets:
        blocks += _dataset_section(result, dataset)
    return blocks


def _cross_dataset(result: Analysis) -> list[Block]:
    m = result.metric
    blocks: list[Block] = [Heading(2, "Across datasets")]
    blocks.append(Table(result.noise.rename(columns={"noise_sd": f"noise_sd ({m})"}),
                        "Seed-noise floor per dataset (pooled sd over repeated configs)"))
    if not result.cross_dataset:
        blocks.append(Para(f"Note: only one dataset ({', '.join(result.datasets)}) has completed "
                           "analysed trials, so the cross-dataset sections (best-level agreement, "
                           "rank agreement, universal setting and tunability, verdict) are "
                           "skipped. Run the sweep on two or more datasets to get them."))
        return blocks
    cost_cols = [f"cost_{c}" for c in result.cost_metrics]
    verdict = result.verdict[["knob", "matters_on", "best_agrees", "universal", *cost_cols,
                              "verdict"]]
    blocks += [Heading(3, "Verdict, one row per knob"),
               Table(verdict, f"'matters' = simultaneous {1 - ALPHA:.0%} interval excludes 0 and "
                              "effect > seed noise; costs = largest over datasets")]
    blocks += [Heading(3, "Best level per dataset"),
               Table(result.agreement, "agrees: same best level on every dataset where the knob "
                                       "matters (blank when it matters on fewer than two)")]
    blocks += [Heading(3, "Rank agreement of paired configs (Kendall's tau)"),
               Image("kendall_tau", plots.kendall_heatmap(result.kendall), "Kendall tau heatmap"),
               Table(result.kendall_pairs)]
    blocks += [Heading(3, "Universal setting vs each dataset's best"),
               Para("Per knob (tunability, Probst, Boulesteix & Bischl 2019): the universal value "
                    "is the one with the smallest mean relative regret over datasets; regret is "
                    f"what tuning that knob on one dataset gains in {m}; cost_ columns are the "
                    "same difference on the test metrics."),
               Table(result.tunability),
               Para("Whole config: one paired config for every dataset against each dataset's "
                    "best paired config. Both are picked on the same runs they are scored on, "
                    "so with many configs this regret is optimistic for the best (winner's "
                    "curse); the confirm phase re-runs the best with fresh seeds."),
               Table(result.config_regret)]
    return blocks


def _open_questions(result: Analysis) -> list[Block]:
    q = result.open_questions
    blocks: list[Block] = [Heading(2, "The authors' open questions")]
    for question, part in q.groupby("question", sort=False):
        blocks.append(Heading(3, str(question)))
        blocks.append(Bullets(tuple(f"{d}: {a}" if d else a
                                    for d, a in zip(part["dataset"], part["answer"]))))
    return blocks


def _knob_plots(result: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"{result.metric} against each knob")]
    if not result.importance.dropna(subset=["ped_anova"]).empty:
        blocks.append(Image("importance", plots.importance_plot(result.importance),
                            "importance per knob"))
    for knob in tqdm(result.varying, desc="plots", unit="knob", disable=None):
        if (result.levels["knob"] == knob.name).any():
            blocks.append(Image(f"knob_{knob.name}",
                                plots.knob_plot(result.levels, knob, result.metric), knob.name))
    return blocks


def _dataset_section(result: Analysis, dataset: str) -> list[Block]:
    m, cost = result.metric, result.cost_metrics
    knobs = [k.name for k in result.varying]
    blocks: list[Block] = [Heading(2, f"Dataset: {dataset}")]
    status = result.status[result.status["dataset"] == dataset].drop(columns="dataset")
    blocks += [Heading(3, "Trials"), Table(status, "trials per phase and status")]
    imp = result.importance[result.importance["dataset"] == dataset].drop(columns="dataset")
    blocks += [Heading(3, "Importance on the paired trials"),
               Table(imp, "normalised; fANOVA blank for conditional knobs (beta_a, beta_b)")]
    eff = result.effects[result.effects["dataset"] == dataset].drop(columns="dataset")
    blocks += [Heading(3, "Effect of each knob"), Table(eff)]
    lev = result.levels[result.levels["dataset"] == dataset]
    lev = lev.assign(**{"95% CI": [f"[{lo:.4g}, {hi:.4g}]" for lo, hi in
                                   zip(lev["ci_low"], lev["ci_high"])]})
    lev = lev[["knob", "level", "n_configs", "mean", "95% CI", *cost]].rename(
        columns={"mean": f"{m} mean"})
    blocks += [Heading(3, "Metric per level"), Table(lev)]
    best = result.best[result.best["dataset"] == dataset].drop(columns="dataset")
    comp = result.comparison[result.comparison["dataset"] == dataset].drop(columns="dataset")
    blocks += [Heading(3, "Best configuration, baselines and published numbers"),
               Table(best, "mean and spread over the confirm seeds"), Table(comp)]
    done, pruned, bad = summary.top_trials(result.table, dataset, m, knobs)
    blocks += [Heading(3, "Top completed trials"), Table(done)]
    if not pruned.empty:
        blocks.append(Table(pruned, "pruned trials: stopped early at a lower budget, not ranked"))
    if not bad.empty:
        blocks.append(Table(bad, "diverged or failed trials"))
    blocks.append(Image(f"trials_{_slug(dataset)}", plots.trials_plot(result.table, dataset, m),
                        f"trials on {dataset}"))
    return blocks


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
