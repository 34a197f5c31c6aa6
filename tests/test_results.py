"""The results package: the report's files, the CLI, bad tables, and the pieces of the analysis
on tables with a planted truth (`results.synthetic`; the verdicts over many re-draws are in
tests/test_results_planted.py)."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from results import TableError, analyse, build_report, write_report
from results.cli import main, resolve_table
from results.knobs import by_name, make_levels
from results.selection import default_runs, expected_max
from results.summary import top_trials
from results.synthetic import SEED_SD, make_table
from results.table import cost_metrics, with_config_id

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def planted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyse(make_table(seed=3), n_boot=1000)


@pytest.fixture(scope="module")
def small_table() -> pd.DataFrame:
    return make_table(n_configs=60, seeds=2)


@pytest.fixture(scope="module")
def report_dir(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report(planted, out, "planted")
    return out


# --- the analysis on one planted table --------------------------------------------------------

def test_verdict_grid_and_sentences(planted):
    grid = planted.verdict_grid.set_index("knob")
    assert list(grid.columns) == ["d1", "d2", "d3"]
    assert grid.loc["lr"].str.startswith("matters (best").all()
    assert grid.loc["positional_encoding"].str.contains("interacts with aggregation").all()
    assert "adaln diverges in" in grid.loc["aggregation", "d2"]
    v = planted.verdict.set_index("knob")
    assert v.loc["lambda_uncertainty", "verdict"].startswith("Matters on d1")
    assert v.loc["hidden_size", "verdict"] == "fixed at 128; not analysed"
    assert not v.loc["hidden_size", "analysed"]
    assert v.loc["beta_b", "verdict"] == "fixed at 10; not analysed"


def test_noise_floor_recovers_seed_sd(planted):
    n = planted.noise.set_index("dataset")
    assert np.allclose(n["noise_sd"], SEED_SD, rtol=0.15)
    assert (n["repeated_configs"] >= 140).all()  # d2 loses configs whose adaln runs all diverged


def test_levels_are_shared_with_intervals_and_adjusted(planted):
    lev = planted.levels
    lr = lev[lev["knob"] == "lr"]
    labels = lr.groupby("dataset")["level"].apply(tuple)
    assert labels.nunique() == 1  # the same bins on every dataset
    assert lr["binned"].all()
    ok = lev["ranked"].astype(bool)
    assert ((lev.loc[ok, "ci_low"] <= lev.loc[ok, "mean"])
            & (lev.loc[ok, "mean"] <= lev.loc[ok, "ci_high"])).all()
    d1 = lev[(lev["knob"] == "positional_encoding") & (lev["dataset"] == "d1")].set_index("level")
    # rotary is +0.03 only with cross_attention (about a quarter of configs)
    assert d1.loc["rotary", "mean"] - d1.loc["none", "mean"] == pytest.approx(0.0075, abs=0.004)
    assert d1.loc["rotary", "recommended"] and not d1.loc["none", "recommended"]


def test_numeric_levels_follow_the_log_scale():
    table = make_table(n_configs=80, seeds=1, extras=False)
    units = table.drop_duplicates("config_id")
    lev = make_levels(units, by_name("lr"))
    assert lev.binned and len(lev.order) == 3
    for label in lev.order:  # a log knob sits at the geometric median of its bin
        inside = units.loc[lev.labels == label, "lr"].to_numpy(float)
        assert lev.x[label] == pytest.approx(np.exp(np.median(np.log(inside))))
    assert lev.level_of(1e-4) == lev.order[0] and lev.level_of(1e-2) == lev.order[-1]
    assert lev.label_values(units["lr"]).tolist() == lev.labels.tolist()


def test_interaction_heatmap_and_shares(planted):
    cells = planted.heatmaps
    d1 = cells[(cells["dataset"] == "d1") & (cells["knob_a"] == "aggregation")
               & (cells["knob_b"] == "positional_encoding")].set_index(["level_a", "level_b"])
    lift = d1.loc[("cross_attention", "rotary"), "mean"] - d1.loc[("cross_attention", "none"),
                                                                  "mean"]
    assert lift == pytest.approx(0.03, abs=0.006)
    assert abs(d1.loc[("linear", "rotary"), "mean"] - d1.loc[("linear", "none"), "mean"]) < 0.006
    shares = planted.shares[planted.shares["dataset"] == "d1"].set_index("component")
    assert shares.loc["aggregation x positional_encoding", "share"] > 0.1
    total = shares["share"].sum()
    assert 0.8 < total < 1.2  # unnormalised shares, with noise and remainder, add up to ~1


def test_importance_sorted_by_anova_with_n(planted):
    imp = planted.importance
    first = imp.groupby("dataset").head(1)
    assert set(first["knob"]) <= {"lr", "positional_encoding", "aggregation"}
    assert imp.groupby("dataset")["anova_total"].apply(
        lambda s: s.dropna().is_monotonic_decreasing).all()
    lam = imp[imp["knob"] == "lambda_uncertainty"]
    assert (lam["n_configs"] < 80).all() and lam["anova_main"].notna().all()


def test_tunability_from_the_default(planted):
    t = planted.tunability.set_index(["knob", "dataset"])
    # lr's default 1e-3 is at the planted peak: nothing to gain
    assert (t.xs("lr")["word"] != "matters").all()
    assert (t.xs("lr")["default_level"] == t.xs("lr")["tuned_level"]).any()
    # beta_a is inactive at the default schedule
    assert (t.xs("beta_a")["word"] == "inactive at the default").all()


def test_expected_max_is_monotone(planted):
    curve = planted.expected_max
    for _, part in curve.groupby("dataset"):
        assert part["expected_max"].is_monotonic_increasing
        assert part["trials"].iloc[0] == 1
    runs = pd.Series([0.1, 0.2, 0.3, 0.4])
    one = expected_max(pd.DataFrame({"dataset": "x", "m": runs}), "m")
    assert one.loc[one["trials"] == 1, "expected_max"].iloc[0] == pytest.approx(0.25)
    # k = 2 with replacement: E[max] = sum v_i ((i/4)^2 - ((i-1)/4)^2)
    assert one.loc[one["trials"] == 2, "expected_max"].iloc[0] == pytest.approx(
        (0.1 * 1 + 0.2 * 3 + 0.3 * 5 + 0.4 * 7) / 16)


def test_without_a_default_run_the_tuned_mean_is_still_shown() -> None:
    table = make_table(seed=4, n_configs=40, seeds=2)
    table = table[table["config_id"] != "default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = analyse(table, n_boot=200).default_vs_tuned
    obj = d[d["metric"] == "val_NDCG@20"]
    assert len(obj) == table["dataset"].nunique() > 0
    assert (obj["default_runs"] == 0).all() and obj["default_mean"].isna().all()
    assert obj["tuned_mean"].notna().all() and obj["verdict"].str.startswith("no run of the authors' default").all()


def test_gap_bound_is_welchs_with_two_runs_a_side_and_uses_the_seed_sd_below() -> None:
    from scipy import stats as sps

    from results.selection import gap_upper_bound

    tuned, default = np.array([0.31, 0.33, 0.30]), np.array([0.29, 0.28])
    upper, note = gap_upper_bound(tuned, default, seed_sd=0.01)
    welch = sps.ttest_ind(tuned, default, equal_var=False).confidence_interval(0.90).high
    assert upper == pytest.approx(welch, rel=1e-9) and note == ""
    upper, note = gap_upper_bound(np.array([0.31]), np.array([0.29]), seed_sd=0.01)
    assert upper == pytest.approx(0.02 + sps.norm.ppf(0.95) * 0.01 * np.sqrt(2), rel=1e-9)
    assert "seed sd" in note
    assert np.isnan(gap_upper_bound(np.array([0.31]), np.array([0.29]), seed_sd=np.nan)[0])


def test_default_vs_tuned(planted):
    d = planted.default_vs_tuned
    assert set(d["dataset"]) == {"d1", "d2", "d3"}
    obj = d[d["metric"] == planted.metric]
    assert (obj["default_runs"] == 3).all() and (obj["tuned_runs"] == 3).all()
    # the planted best (rotary x cross_attention) beats the default by ~0.03: not non-inferior
    assert (obj["gap"] > 0.02).all() and (~obj["non_inferior"].astype(bool)).all()
    adrec = planted.table[planted.table["phase"] != "baseline"]
    mask = default_runs(adrec, [k.name for k in planted.varying])
    assert set(adrec.loc[mask, "config_id"]) == {"default"}


def test_open_questions(planted):
    q = planted.open_questions
    agg = q[q["question"].str.startswith("aggregation")]
    assert len(agg) == 3 and agg["answer"].str.contains("cross_attention - linear").all()
    assert q.loc[q["question"] == "stage plan", "answer"].str.contains("three_stage|no_warmup").all()


def test_best_config_is_confirmed_and_compared(planted):
    best = planted.best.set_index("dataset")
    assert best["confirmed"].all() and (best["seeds"] == 3).all()
    assert best.loc["d1", "config_id"] == "best_d1"
    knobs = planted.best_knobs.set_index("knob")
    assert knobs.loc["positional_encoding"].tolist() == ["rotary"] * 3
    comp = planted.comparison
    assert set(comp["model"]) == {"ADRec, confirmed best", "most_popular", "sasrec"}


def test_pruned_flagged_and_failures_listed_in_full(planted):
    knobs = ["aggregation", "noise_schedule", "beta_a"]
    done, pruned, bad = top_trials(planted.table, "d2", "val_NDCG@20", knobs)
    assert (done["status"] == "completed").all() and done["rank"].tolist() == list(range(1, 9))
    assert len(pruned) == 4 and pruned["flag"].str.startswith("pruned").all()
    assert done["val_NDCG@20"].max() < pruned["val_NDCG@20"].min()  # pruned score 3x, unranked
    listed = pd.concat([done, pruned])
    assert listed.loc[listed["noise_schedule"] != "beta", "beta_a"].isna().all()
    assert len(bad) > 8  # every diverged run, not the first 8
    assert set(bad["status"]) == {"diverged", "failed"}


def test_config_id_derived_from_knobs_when_missing():
    table = make_table(n_configs=3, seeds=2, extras=False).drop(columns="config_id")
    ids = with_config_id(table)["config_id"]
    assert ids.str.fullmatch(r"[0-9a-f]{12}").all()
    assert ids.nunique() == 3
    assert (ids.groupby(table["dataset"]).apply(lambda s: tuple(sorted(set(s)))).nunique()) == 1


def test_cost_metrics_follow_the_objective():
    assert cost_metrics("val_NDCG@20") == ("test_HR@20", "test_NDCG@20")
    assert cost_metrics("val_HR@10") == ("test_HR@10", "test_NDCG@10")


# --- bad and degenerate tables ----------------------------------------------------------------

def test_missing_columns_named(small_table):
    with pytest.raises(TableError, match=r"missing required column\(s\) 'status', 'val_NDCG@20'"):
        analyse(small_table.drop(columns=["status", "val_NDCG@20"]))
    with pytest.raises(TableError, match=r"missing required column\(s\) 'test_MRR'.*--metric"):
        analyse(small_table, metric="test_MRR")


def test_no_completed_trial(small_table):
    with pytest.raises(TableError, match=r"no completed ADRec trial .*pruned="):
        analyse(small_table.assign(status="pruned"))


def test_unknown_status_and_phase(small_table):
    with pytest.raises(TableError, match=r"status value\(s\) 'done' not one of completed, pruned"):
        analyse(small_table.assign(status="done"))
    with pytest.raises(TableError, match=r"phase value\(s\) 'grid' not one of paired"):
        analyse(small_table.assign(phase="grid"))


def test_corrupt_table_is_a_table_error(tmp_path, caplog):
    (tmp_path / "trials.parquet").write_bytes(b"PAR1 truncated")
    assert main([str(tmp_path), "-q"]) == 2
    assert "not a readable Parquet trial table" in caplog.text


def test_cli_exit_codes_and_messages(small_table, tmp_path, caplog):
    with pytest.raises(TableError, match="missing required column"):
        build_report(small_table.drop(columns=["dataset"]), tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing written for a bad table
    bad = tmp_path / "bad"
    bad.mkdir()
    small_table.drop(columns=["status"]).to_parquet(bad / "trials.parquet")
    assert main([str(bad), "--n-boot", "200", "-q"]) == 2
    assert "missing required column(s) 'status'" in caplog.text
    assert main([str(tmp_path / "nowhere"), "-q"]) == 2
    assert "no trial table for" in caplog.text


def test_too_few_trials_warn_not_crash():
    table = make_table(n_configs=6, seeds=1, datasets=("d1", "d2"), extras=False)
    with pytest.warns(UserWarning) as record:
        result = analyse(table, n_boot=200)
    messages = " ".join(str(w.message) for w in record)
    assert "the level model needs at least" in messages
    assert "seed-noise floor is unknown" in messages
    assert (result.effects["word"] == "not varied").all()
    assert result.noise["noise_sd"].isna().all()
    assert result.importance["ped_anova"].isna().all()


def test_single_dataset_renders_with_note(tmp_path):
    table = make_table(n_configs=48, seeds=2, datasets=("d1",))
    (tmp_path / "solo").mkdir()
    table.to_parquet(tmp_path / "solo" / "trials.parquet")
    assert main([str(tmp_path / "solo"), "--n-boot", "200", "-q"]) == 0
    out = tmp_path / "solo" / "report"
    md = (out / "report.md").read_text()
    assert "Note: only one dataset (d1)" in md
    assert "## The answer" in md and "## Dataset: d1" in md
    assert (out / "tables" / "verdict_grid.csv").exists()
    assert not (out / "tables" / "config_regret.csv").exists()
    assert (out / "tables" / "effects.parquet").exists() and (out / "hiplot.html").exists()


def test_cli_resolves_sweep_name_and_writes_out(small_table, tmp_path):
    sweep = tmp_path / "runs" / "smoke"
    sweep.mkdir(parents=True)
    small_table.to_parquet(sweep / "trials.parquet")
    found = resolve_table("smoke", runs_dir=tmp_path / "runs")
    assert found == (sweep / "trials.parquet").resolve()
    assert resolve_table(str(sweep / "trials.parquet")) == (sweep / "trials.parquet").resolve()
    out = tmp_path / "elsewhere"
    assert main([str(sweep), "--out", str(out), "--n-boot", "200", "--metric", "val_HR@20",
                 "-q"]) == 0
    assert "Objective (selection and importance): val_HR@20" in (out / "report.md").read_text()
    verdict = pd.read_parquet(out / "tables" / "verdict.parquet")
    assert verdict["best_agrees"].dtype == "boolean"
    assert pd.read_csv(out / "tables" / "levels.csv").shape[0] > 0


# --- the files ----------------------------------------------------------------------------------

def test_report_opens_with_the_answer(report_dir):
    md = (report_dir / "report.md").read_text()
    order = [md.index(h) for h in ("## The answer", "## Plots", "## Detail", "## Dataset: d1")]
    assert order == sorted(order)
    answer = md[md.index("## The answer"):md.index("## Plots")]
    assert "| knob | d1 | d2 | d3 |" in answer
    assert "adaln diverges in" in answer.lower()
    assert "Best config per dataset" in answer and "The authors' default" in answer
    assert "MATTERS: the interval excludes 0" in md
    assert "... and " in md and "more (all in the tables/ folder)" in md  # no silent cut


def test_report_files_exist(report_dir):
    for name in ("report.md", "report.html", "hiplot.html"):
        assert (report_dir / name).stat().st_size > 1000, name
    for stem in ("verdict", "verdict_grid", "effects", "levels", "importance", "interactions",
                 "variance_shares", "tunability", "failures_by_level", "failed_trials",
                 "kendall_tau", "universal_values", "noise_floor", "best_configs", "comparison",
                 "default_vs_tuned", "expected_max", "recommended_values", "open_questions",
                 "config_regret"):
        assert (report_dir / "tables" / f"{stem}.csv").exists(), stem
        assert not pd.read_parquet(report_dir / "tables" / f"{stem}.parquet").empty, stem
    md = (report_dir / "report.md").read_text()
    pngs = re.findall(r"\]\((plots/[^)]+\.png)\)", md)
    assert any("interaction_d1_aggregation_positional_encoding" in p for p in pngs)
    for png in pngs:
        assert (report_dir / png).read_bytes().startswith(PNG_SIGNATURE)


def test_report_html_embeds_valid_pngs_only(planted, report_dir):
    html = (report_dir / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    # variance shares + 11 knobs + one map per kept interaction + expected max + kendall + 3 trials
    maps = planted.heatmaps.groupby(["dataset", "knob_a", "knob_b"]).ngroups
    assert maps >= 3  # aggregation x positional_encoding on each dataset
    assert len(images) == 1 + 11 + maps + 1 + 1 + 3
    for data in images:
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(PNG_SIGNATURE)
        pixels = mpimg.imread(io.BytesIO(raw), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=['\"]?https?://", html)


def test_hiplot_is_offline(report_dir):
    text = (report_dir / "hiplot.html").read_text()
    assert "<script" in text
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*['\"]?https?://", text, flags=re.I)
    assert "fonts.googleapis.com/css?family" not in text
    assert "positional_encoding" in text and "val_NDCG@20" in text


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    """Offline rendering of report.html (hiplot.html is tested with the HiPlot module)."""
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,1600",
             "--virtual-time-budget=5000", f"--screenshot={shot}",
             (report_dir / "report.html").resolve().as_uri()],
            check=True, capture_output=True, timeout=90)
    pixels = mpimg.imread(shot)[..., :3]
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert 0.01 < non_white < 0.9
    assert len(np.unique(pixels.reshape(-1, 3).round(2), axis=0)) > 20


def test_failure_flags_blame_the_level_not_its_companions():
    """adaln (Transformer only) diverges in half of its d1 runs: adaln is flagged, the
    Transformer denoiser that merely co-occurs with it is not."""
    from results.failures import failure_rates
    from results.synthetic import FULL_SPACE, mlp_branch

    table = make_table(lambda d, c: 0.05, n_configs=200, seeds=2, datasets=("d1",),
                       space=FULL_SPACE, confound=mlp_branch, extras=False,
                       diverge=lambda d, c: 0.5 if c["aggregation"] == "adaln" else 0.0)
    units = table[table["status"] == "completed"].drop_duplicates("config_id")
    levels = {k: make_levels(units, by_name(k)) for k in ("aggregation", "denoiser", "lr")}
    rates = failure_rates(table, levels).set_index(["knob", "level"])
    assert rates.loc[("aggregation", "adaln"), "flagged"]
    assert rates.loc[("denoiser", "transformer"), "bad_rate"] > rates.loc[("denoiser", "mlp"),
                                                                         "bad_rate"]
    assert not rates["flagged"].drop(("aggregation", "adaln")).any()


def test_small_sweep_screens_knobs_and_still_finds_the_big_effect():
    """48 configs for 14 knobs: too few for the full model; the F-screen keeps lr and the
    others are read adjusted for it."""
    from results.synthetic import FULL_SPACE, mlp_branch

    def truth(dataset: str, cfg: dict) -> float:
        return 0.05 - 0.02 * (np.log10(cfg["lr"]) + 3) ** 2

    table = make_table(truth, n_configs=48, seeds=3, datasets=("d1", "d2"), space=FULL_SPACE,
                       confound=mlp_branch, diverge=None)
    with pytest.warns(UserWarning, match="forward F-screen keeps"):
        result = analyse(table, n_boot=500)
    e = result.effects.set_index(["knob", "dataset"])
    assert (e.xs("lr")["word"] == "matters").all()
    others = result.effects[result.effects["knob"] != "lr"]
    assert (others["word"] != "matters").mean() >= 0.9
