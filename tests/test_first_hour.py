"""A new user's first hour: the smoke study's design, HiPlot's knob axes, the --dry-run cost model and the
two report pages in a real headless Chromium.

The tables here are what the sweep writes for the smoke space's own paired design (`Plan.paired_jobs`
turned into rows by `adrec.record.trial_row`, inactive knobs null), with planted metrics instead of
training, so the report's requirements on the smoke design are checked in seconds.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import pytest

from adrec.config import KNOBS, METRICS, TrialConfig
from adrec.record import to_frame, trial_row
from sweeps.plan import Plan
from sweeps.spaces import load_space, parse_space

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SEED_SD = 0.002  # planted seed noise of val NDCG@20 (ml-100k at short epochs: ~0.001-0.003)


def smoke_plan(**changes: Any) -> Plan:
    space = load_space("smoke")
    values = dict(name="smoke", space=space, datasets=space.datasets, paired_samples=space.paired_samples,
                  repeats=space.repeats, num_samples=space.num_samples, confirm_top=space.confirm_top,
                  baselines=space.baselines, metric="NDCG@20", seed=2025, max_users=0, data_dir="/data")
    return Plan(**{**values, **changes})


def planted(values: Mapping[str, Any]) -> float:
    """Truth of the tests, the sizes measured at the smoke epochs: adaln loses 0.008, learned positions gain
    0.004, everything else nothing."""
    return 0.030 - 0.008 * (values["aggregation"] == "adaln") + 0.004 * (values["positional_encoding"] == "learned")


def _row(plan: Plan, i: int, config: dict[str, Any], value: float) -> dict[str, Any]:
    metrics = {m: value * (2.5 if m.startswith("HR") else 1.0) for m in METRICS}
    fit = {"status": "completed", "val": metrics, "test": {m: v * 0.95 for m, v in metrics.items()},
           "epochs": {"stage1": 10, "stage2": 1, "stage3": 4}, "seconds": {"stage1": 30.0, "stage2": 5.0,
                                                                          "stage3": 20.0}, "env": {}}
    return trial_row(sweep=plan.name, trial_id=f"t{i:03d}", config=config, ray_status="TERMINATED", history=None,
                     fit_result=fit, error=None, env={})


def sweep_table(plan: Plan, truth: Callable[[Mapping[str, Any]], float] = planted, seed: int = 0) -> pd.DataFrame:
    """The rows a finished sweep of `plan` would write, phase after phase (paired, confirm from the paired
    rows, baselines), with planted metrics: `truth(config)` plus seed noise."""
    rng = np.random.default_rng(seed)

    def value(config: dict[str, Any]) -> float:
        return 0.02 if config["model"] != "adrec" else truth(config) + rng.normal(0, SEED_SD)

    rows = [_row(plan, i, j["config"], value(j["config"])) for i, j in enumerate(plan.paired_jobs(plan.paired_configs()))]
    confirm = plan.confirm_jobs(to_frame(rows))
    rows += [_row(plan, len(rows) + i, j["config"], value(j["config"])) for i, j in enumerate(confirm)]
    rows += [_row(plan, len(rows) + i, j["config"], value(j["config"])) for i, j in enumerate(plan.baseline_jobs())]
    return to_frame(rows)


def test_the_smoke_design_gives_verdicts_on_its_knobs() -> None:
    """README's main job must end with an answer: with effects of the size measured on ml-100k at the
    smoke epochs, the report's analysis ranks every knob of the smoke space and finds the large one."""
    from results import analyse

    plan = smoke_plan()
    table = sweep_table(plan)
    assert (table["phase"].value_counts().to_dict()
            == {"paired": plan.paired_samples * plan.repeats, "confirm": (plan.confirm_top + 1) * plan.repeats,
                "baseline": len(plan.baselines)})
    result = analyse(table, n_boot=400)
    verdict = result.verdict.set_index("knob")
    swept = [p.field for p in plan.space.params]
    assert verdict.loc[swept, "analysed"].all()
    grid = result.verdict_grid.set_index("knob")["ml-100k"]
    assert grid["aggregation"] == "matters (best linear)"  # -0.008 against a seed noise of 0.002
    words = ("matters", "depends", "equivalent", "small", "not detected")
    assert all(grid[k].startswith(words) for k in swept), grid.to_dict()
    assert result.noise["dof"].iloc[0] >= plan.confirm_top  # the confirm re-runs give the seed noise


def test_confirm_reruns_the_authors_default_with_the_top_configs_seeds() -> None:
    """The report compares the tuned best with the authors' default: the confirm phase runs both, with
    the same fresh seeds, and the report's default-vs-tuned row has numbers on both sides."""
    from results import analyse

    plan = smoke_plan(repeats=2)
    table = sweep_table(plan)
    confirm = table[table["phase"] == "confirm"]
    default = confirm[confirm["config_id"] == "default"]
    assert sorted(default["seed"]) == sorted(confirm[confirm["config_id"] != "default"]["seed"].unique())
    for knob in (p.field for p in plan.space.params):
        assert (default[knob] == getattr(TrialConfig(), knob)).all(), knob
    assert plan.counts()["confirm"] == len(confirm)
    result = analyse(table, n_boot=200)
    row = result.default_vs_tuned.iloc[0]
    assert row["default_runs"] == 2 and np.isfinite(row["default_mean"]) and np.isfinite(row["gap_upper"])


def test_the_default_is_not_run_twice_when_it_is_among_the_top_configs() -> None:
    plan = smoke_plan()
    default = {p.field: getattr(TrialConfig(), p.field) for p in plan.space.params}
    rows = [_row(plan, 0, plan._job("paired", "ml-100k", "p000", {**default, "seed": 2025})["config"], 0.05),
            _row(plan, 1, plan._job("paired", "ml-100k", "p001", {**default, "mse_weight": 3.0,
                                                                   "seed": 2025})["config"], 0.04)]
    jobs = plan.confirm_jobs(to_frame(rows))
    assert [j["config"]["config_id"] for j in jobs] == ["p000", "p001"]
    assert plan.is_default(default) and not plan.is_default({**default, "aggregation": "adaln"})


# --- HiPlot ---------------------------------------------------------------------------------------
def test_hiplot_has_an_axis_per_swept_knob_inactive_knobs_blank_coloured_by_the_objective() -> None:
    from results.hiplot import experiment, hiplot_rows

    plan = smoke_plan()
    table = sweep_table(plan)
    swept = [p.field for p in plan.space.params]
    rows, axes = hiplot_rows(table, "val_NDCG@20", ["test_HR@20", "test_NDCG@20"])
    assert axes == ["phase", "model", *[k for k in KNOBS if k in swept], "val_NDCG@20", "test_HR@20", "test_NDCG@20"]
    assert len(rows) == len(table)
    for row, (_, source) in zip(rows, table.iterrows()):
        if source["model"] != "adrec":  # a baseline has no ADRec knobs
            assert all(row[k] is None for k in swept)
            continue
        assert row["aggregation"] == source["aggregation"]
        if "lambda_uncertainty" in swept:  # λ only acts with linear aggregation
            assert (row["lambda_uncertainty"] is None) == (source["aggregation"] != "linear")
        assert row["val_NDCG@20"] == pytest.approx(source["val_NDCG@20"], abs=1e-5)
    exp = experiment(table, "val_NDCG@20", ["test_HR@20", "test_NDCG@20"])
    assert exp.colorby == "val_NDCG@20"
    types = {name: d.type.value for name, d in exp.parameters_definition.items() if d.type is not None}
    for name in swept:
        assert types[name] == {"categorical": "categorical", "log": "numericlog", "linear": "numeric"}[KNOBS[name].scale]
    parallel = exp.display_data("PARALLEL_PLOT")
    assert sorted(parallel["order"]) == sorted(axes)
    assert {"trial_id", "config_id", "seed", "uid"} <= set(parallel["hide"])


def test_hiplot_blanks_inactive_knobs_of_tables_written_before_rows_held_null() -> None:
    from results.hiplot import hiplot_rows

    space = parse_space("lam", {"params": {"aggregation": {"choices": ["linear", "adaln"]}, "lambda_uncertainty": {}},
                                "counts": {"paired_samples": 8, "repeats": 1}})
    table = sweep_table(smoke_plan(space=space, paired_samples=8, repeats=1, confirm_top=0))
    old = table.copy()
    old["lambda_uncertainty"] = old["lambda_uncertainty"].fillna(1e-3)  # an older table: λ everywhere
    rows, _ = hiplot_rows(old, "val_NDCG@20", [])
    adrec = old["model"] == "adrec"
    blank = [r["lambda_uncertainty"] is None for r, a in zip(rows, adrec) if a]
    assert blank == (old.loc[adrec, "aggregation"] != "linear").tolist()
    assert any(blank) and not all(blank)


def test_hiplot_file_is_offline(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from results.hiplot import write_hiplot

    path = tmp_path / "hiplot.html"
    write_hiplot(SimpleNamespace(table=sweep_table(smoke_plan()), metric="val_NDCG@20",
                                 cost_metrics=["test_NDCG@20"]), path)
    text = path.read_text()
    assert "fonts.googleapis.com/css?family" not in text
    assert not re.search(r"<(script|link)[^>]*(src|href)\s*=\s*['\"]?https?://", text, flags=re.I)
    assert '"colorby": "val_NDCG@20"' in text or "val_NDCG@20" in text


# --- a real browser -------------------------------------------------------------------------------
def dump_dom(page: Path, budget_ms: int = 15000) -> str:
    """The page's DOM after its JavaScript ran (Chromium's virtual time), offline."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--window-size=1400,1000", f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()],
            check=True, capture_output=True, text=True, timeout=180)
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_hiplot_page_draws_the_knob_axes_in_chromium(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from results.hiplot import write_hiplot

    plan = smoke_plan()
    path = tmp_path / "hiplot.html"
    write_hiplot(SimpleNamespace(table=sweep_table(plan), metric="val_NDCG@20", cost_metrics=["test_NDCG@20"]), path)
    dom = dump_dom(path)
    # the parallel plot's axis titles, drawn by HiPlot's JavaScript (none of them is in the page's HTML)
    titles = re.findall(r'<span class="label-name[^"]*"[^>]*>([^<]+)</span>', dom)
    assert sorted(titles) == sorted(["phase", "model", *(p.field for p in plan.space.params), "val_NDCG@20",
                                     "test_NDCG@20"])
    ticks = set(re.findall(r"<text[^>]*>([^<]+)</text>", dom))
    assert {"linear", "adaln", "none", "learned"} <= ticks  # the knobs' levels on their axes


# --- --dry-run cost --------------------------------------------------------------------------------
def test_asha_share_of_epochs_follows_the_rungs() -> None:
    from sweeps.plan import asha_fraction

    # rungs at 3, 9, 27 evaluations (one epoch each): all train 3, a third 6 more, a ninth 18 more
    assert asha_fraction(27, 1, 3) == pytest.approx((3 + 6 / 3 + 18 / 9) / 27)
    assert asha_fraction(2, 1, 3) == 1.0  # stops before the first rung: nothing pruned
    assert asha_fraction(30, 5, 2) == pytest.approx((10 + 20 / 3) / 30)


def test_trial_seconds_expected_stops_where_readme_runs_stopped() -> None:
    from sweeps.plan import NODE_TYPES, TRIAL_OVERHEAD_S, trial_epochs, trial_seconds

    cfg = TrialConfig(dataset="ml-100k")
    assert trial_epochs(cfg, "ml-100k", expected=True) == (109, 5, 75)
    assert trial_epochs(cfg, "ml-100k", expected=False) == cfg.stage_epochs()
    assert trial_epochs(cfg, "toys", expected=True) == (50, 5, 30)  # Amazon sets stop like baby
    cpu, gpu = NODE_TYPES["cpu"], NODE_TYPES["h200"]
    expected, ceiling = trial_seconds(cfg, cpu, True), trial_seconds(cfg, cpu, False)
    assert TRIAL_OVERHEAD_S < expected < ceiling
    assert trial_seconds(cfg, cpu, True, stage1=False) < expected  # the stage-1 cache saves stage 1
    assert trial_seconds(cfg, cpu, True, asha=True) < expected
    assert trial_seconds(cfg, gpu, True) < expected / 10  # an H200 is an order of magnitude faster
    long_t = TrialConfig(dataset="ml-100k", diffusion_steps=128)
    assert trial_seconds(long_t, cpu, True) > expected  # T reverse steps per validation pass
    assert trial_seconds(TrialConfig(dataset="ml-100k", max_users=94), cpu, True) < expected / 5


def test_dry_run_prints_expected_and_ceiling_per_node_type() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "sweeps/run.py", "--space", "full", "--dry-run"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "total trials: 948" in out  # 32x3 paired + 48 TPE + (3 top + the default)x3 confirm + 2 baselines, x6
    found = re.findall(r"expected ([\d,.]+) (GPU-hours|CPU-core-hours), ceiling ([\d,.]+)", out)
    assert {unit for _, unit, _ in found} == {"GPU-hours", "CPU-core-hours"}
    hours = {unit: (float(e.replace(",", "")), float(c.replace(",", ""))) for e, unit, c in found}
    for expected, ceiling in hours.values():
        assert 0 < expected < ceiling / 3  # early stopping, ASHA and the stage-1 cache cut most of it
    assert hours["GPU-hours"][0] < hours["CPU-core-hours"][0] / 20
    walls = re.findall(r"wall-clock on (\d+) such nodes?: expected ([\d.]+ (?:min|h|days)), ceiling", out)
    assert [n for n, _ in walls] == ["1", "8", "1", "8"]


def test_cost_of_the_smoke_space_counts_stage_one_once_per_seed() -> None:
    from sweeps.plan import estimate_cost

    table = estimate_cost(smoke_plan())
    paired = table[table["phase"] == "paired"].iloc[0]
    assert paired["trials"] == smoke_plan().paired_samples * smoke_plan().repeats
    assert paired["cpu_expected_h"] < paired["cpu_ceiling_h"]  # shared stage 1; the epochs are all trained
    assert (table.loc[table["trials"] == 0, ["cpu_expected_h", "h200_expected_h"]] == 0).all().all()


def test_cost_with_packs_uses_a_node_types_pack_figure_only_where_measured() -> None:
    from sweeps.plan import NODE_TYPES, cost_lines, estimate_cost

    solo, packed = estimate_cost(smoke_plan()), estimate_cost(smoke_plan(), pack_size=8)
    cpu_speedup = NODE_TYPES["cpu"].pack_speedups[8]
    adrec = solo["phase"] != "baseline"
    assert packed.loc[adrec, "cpu_expected_h"].to_numpy() == pytest.approx(
        solo.loc[adrec, "cpu_expected_h"].to_numpy() / cpu_speedup)
    assert packed.loc[~adrec, "cpu_expected_h"].to_numpy() == pytest.approx(solo.loc[~adrec, "cpu_expected_h"])
    assert 4 not in NODE_TYPES["cpu"].pack_speedups  # no figure for packs of 4: one trial per process
    assert estimate_cost(smoke_plan(), pack_size=4)["cpu_expected_h"].to_numpy() == pytest.approx(
        solo["cpu_expected_h"].to_numpy())
    lines = "\n".join(cost_lines(smoke_plan(), pack_size=8))
    assert f"packs of 8, measured x{cpu_speedup:.2f} per unit" in lines
    assert "no pack figures for size 8 here: one trial per process" in lines  # the H200 has none yet


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_report_page_opens_with_the_verdict_table_in_chromium(tmp_path: Path) -> None:
    from results import build_report

    plan = smoke_plan()
    html = build_report(sweep_table(plan), tmp_path / "report", n_boot=300, title="smoke")
    dom = dump_dom(html, budget_ms=3000)
    tables = re.findall(r"<table.*?</table>", dom, flags=re.S)
    assert tables, "no table in the rendered report"
    first = re.sub(r"<[^>]+>", " ", tables[0])
    for knob in (p.field for p in plan.space.params):
        assert knob in first, f"the first table of the report does not list {knob!r}: {first[:300]}"
    assert "matters (best linear)" in first  # the planted aggregation effect, in the verdict table
    answer = dom.find("The answer")
    assert 0 <= answer < dom.find(tables[0])  # the answer comes first, the detail after it
    assert (tmp_path / "report" / "hiplot.html").exists()
