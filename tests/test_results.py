"""The results package on synthetic trial tables with a planted truth.

`make_table` plants, on datasets d1, d2, d3 (paired configs x seed repeats, seed noise sd 0.004):
- positional_encoding: rotary is +0.010 on d1 only            -> matters on d1 only
- aggregation: linear +/-0.004, sign flipped on d2             -> matters everywhere, best flips
- noise_level: token +0.00125 / sequence -0.00125 everywhere   -> real, but below the seed noise
- lambda_uncertainty, noise_schedule, beta_a: no effect        -> pure noise
"""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from adrec.config import TrialConfig
from results import TableError, analyse, build_report, write_report
from results.cli import main, resolve_table
from results.summary import top_trials
from results.table import with_config_id

SEED_SD = 0.004
BASE = {"d1": 0.05, "d2": 0.03, "d3": 0.08}
PLANTED_BEST = {"d1": ("rotary", "linear"), "d2": ("none", "cross_attention"),
                "d3": ("none", "linear")}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(val: float, rng: np.random.Generator) -> dict[str, float]:
    test = val + rng.normal(0, 0.002)
    out = {}
    for split, v in (("val", val), ("test", test)):
        for k, f in ((5, 0.5), (10, 0.75), (20, 1.0)):
            out[f"{split}_NDCG@{k}"] = v * f
            out[f"{split}_HR@{k}"] = 2 * v * f
    return out


def _truth(dataset: str, cfg: dict) -> float:
    mean = BASE[dataset]
    if dataset == "d1" and cfg["positional_encoding"] == "rotary":
        mean += 0.010
    flip = -1 if dataset == "d2" else 1
    mean += 0.004 * flip * (1 if cfg["aggregation"] == "linear" else -1)
    mean += 0.00125 * (1 if cfg["noise_level"] == "token" else -1)
    return mean


def make_table(n_configs: int = 240, repeats: int = 2,
               datasets: tuple[str, ...] = ("d1", "d2", "d3"), extras: bool = True,
               seed: int = 0) -> pd.DataFrame:
    """A trial table in the sweep's format with the planted truth of the module docstring.

    extras adds, per dataset: confirm runs of the planted best config (3 fresh seeds), optimize
    trials without config_id (completed and pruned), both baselines and one failed trial.
    """
    rng = np.random.default_rng(seed)
    configs = []
    for i in range(n_configs):
        schedule = ("trunc_lin", "cosine", "beta")[i % 3]
        configs.append({
            "config_id": f"c{i:03d}",
            "positional_encoding": ("none", "learned", "sinusoidal", "rotary")[rng.integers(4)],
            "aggregation": ("linear", "cross_attention")[rng.integers(2)],
            "noise_level": ("token", "sequence")[rng.integers(2)],
            "lambda_uncertainty": float(10 ** rng.uniform(-4, 0)),
            "noise_schedule": schedule,
            "beta_a": float(rng.uniform(0.1, 1.0)) if schedule == "beta" else 0.3,
        })
    defaults = TrialConfig().to_dict()
    rows: list[dict] = []

    def add(dataset: str, cfg: dict, phase: str, seed_: int, status: str = "completed",
            value: float | None = None, **more) -> None:
        val = _truth(dataset, cfg) + rng.normal(0, SEED_SD) if value is None else value
        rows.append({**defaults, **cfg, "sweep": "synthetic", "dataset": dataset,
                     "trial_id": f"t{len(rows):05d}", "phase": phase, "status": status,
                     "seed": seed_, "model": "adrec", **_metrics(val, rng), **more})

    for dataset in datasets:
        for cfg in configs:
            for r in range(repeats):
                add(dataset, cfg, "paired", 100 + r)
        if not extras:
            continue
        pe, agg = PLANTED_BEST[dataset]
        best = {"config_id": f"best_{dataset}", "positional_encoding": pe, "aggregation": agg,
                "noise_level": "token", "lambda_uncertainty": 1e-3, "noise_schedule": "trunc_lin",
                "beta_a": 0.3}
        for s in range(3):
            add(dataset, best, "confirm", 200 + s)
            add(dataset, {**best, "config_id": f"second_{dataset}", "noise_level": "sequence"},
                "confirm", 200 + s)
        for j in range(4):
            opt = {**configs[j], "config_id": None}
            add(dataset, opt, "optimize", 300 + j)
            add(dataset, opt, "optimize", 400 + j, status="pruned", value=BASE[dataset] * 3)
        for model in ("most_popular", "sasrec"):
            add(dataset, {"config_id": None}, "baseline", 1, model=model,
                value=BASE[dataset] * (0.3 if model == "most_popular" else 0.8))
        add(dataset, configs[0], "optimize", 500, status="failed", error="RuntimeError: boom")
        rows[-1].update({k: np.nan for k in _metrics(0.0, rng)})
    table = pd.DataFrame(rows)
    for stage in (1, 2, 3):
        table[f"epochs_stage{stage}"] = 5
        table[f"seconds_stage{stage}"] = 1.0
    table = table.assign(node_id="n0", accelerator="cpu", code_version="test",
                         torch_version="2.13.0", ray_version="2.60.0", optuna_version="5.0.0")
    if "error" not in table:
        table["error"] = None
    return table


@pytest.fixture(scope="module")
def planted():
    return analyse(make_table(), n_boot=1000)


@pytest.fixture(scope="module")
def small_table() -> pd.DataFrame:
    return make_table(n_configs=24, repeats=2)


@pytest.fixture(scope="module")
def report_dir(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report(planted, out, "planted")
    return out


# --- the verdict finds exactly the planted truth --------------------------------------------

def test_verdict_finds_planted_truth(planted):
    v = planted.verdict.set_index("knob")
    assert set(v.index[v["matters_on"] != ""]) == {"positional_encoding", "aggregation"}
    assert v.loc["positional_encoding", "matters_on"] == "d1"
    assert v.loc["aggregation", "matters_on"] == "d1, d2, d3"
    assert pd.notna(v.loc["aggregation", "best_agrees"]) and not v.loc["aggregation", "best_agrees"]
    assert v.loc["aggregation", "best_per_dataset"] == "d1: linear; d2: cross_attention; d3: linear"
    for knob in ("noise_level", "lambda_uncertainty", "noise_schedule", "beta_a"):
        assert v.loc[knob, "matters_on"] == "", knob
        assert v.loc[knob, "verdict"].startswith("Within noise on every dataset"), knob
    assert pd.isna(v.loc["positional_encoding", "best_agrees"])  # matters on one dataset only
    assert v.loc["positional_encoding", "verdict"].startswith("Matters only on d1 (best rotary)")
    assert v.loc["diffusion_steps", "verdict"] == "fixed at 32; not analysed"
    assert not v.loc["diffusion_steps", "analysed"]
    # a universal aggregation costs a real amount on the datasets whose best differs
    assert v.loc["aggregation", "cost_test_NDCG@20"] > SEED_SD


def test_effect_below_seed_noise_is_within_noise_by_the_floor(planted):
    """noise_level's effect is statistically real (interval excludes 0) yet below the floor."""
    e = planted.effects[planted.effects["knob"] == "noise_level"]
    assert (e["best_level"] == "token").all()
    assert (e["ci_low"] > 0).any()
    assert (e["effect"] < e["noise_floor"]).all()
    assert not e["matters"].any()
    assert e["reason"].str.startswith("within noise").all()
    # and the interval, simultaneous over level pairs, covers the planted 0.0025
    assert ((e["ci_low"] < 0.0025) & (e["ci_high"] > 0.0025)).sum() >= 2


def test_noise_floor_recovers_seed_sd(planted):
    n = planted.noise.set_index("dataset")
    # confirm repeats (3 seeds x 2 configs) join the 240 paired repeats
    assert (n["repeated_configs"] == 242).all()
    assert np.allclose(n["noise_sd"], SEED_SD, rtol=0.15)


def test_importance_ranks_the_planted_knobs(planted):
    imp = planted.importance
    top = imp.sort_values("fanova", ascending=False).groupby("dataset")["knob"].first()
    assert top.to_dict() == {"d1": "positional_encoding", "d2": "aggregation", "d3": "aggregation"}
    top_ped = imp.sort_values("ped_anova", ascending=False).groupby("dataset")["knob"].first()
    assert top_ped["d1"] == "positional_encoding"
    beta = imp[imp["knob"] == "beta_a"]
    assert beta["fanova"].isna().all() and beta["ped_anova"].notna().all()  # conditional knob
    assert np.allclose(imp.groupby("dataset")["ped_anova"].sum(), 1.0)
    assert (imp["n_configs"] == 240).all()  # paired configs only, seeds averaged


def test_levels_are_shared_bins_with_intervals(planted):
    lev = planted.levels
    lam = lev[lev["knob"] == "lambda_uncertainty"]
    labels = lam.groupby("dataset")["level"].apply(tuple)
    assert labels.nunique() == 1 and len(labels.iloc[0]) == 4  # the same 4 quartile bins
    assert lam["binned"].all()
    assert ((lev["ci_low"] <= lev["mean"]) & (lev["mean"] <= lev["ci_high"])).all()
    beta = lev[lev["knob"] == "beta_a"]
    assert beta.groupby("dataset")["n_configs"].sum().eq(80).all()  # only schedule == 'beta'
    d1 = lev[(lev["knob"] == "positional_encoding") & (lev["dataset"] == "d1")].set_index("level")
    assert d1.loc["rotary", "mean"] - d1.loc["none", "mean"] == pytest.approx(0.010, abs=0.0025)


def test_kendall_tau_follows_the_flip(planted):
    k = planted.kendall
    assert np.allclose(k.to_numpy(), k.to_numpy().T)
    assert k.loc["d1", "d3"] > 0.2
    assert k.loc["d1", "d2"] < -0.1 and k.loc["d2", "d3"] < -0.1
    assert (planted.kendall_pairs["n_common"] == 240).all()


def test_tunability_and_config_regret(planted):
    t = planted.tunability.set_index(["knob", "dataset"])
    agg = t.loc["aggregation"]
    universal = agg["universal"].iloc[0]
    differs = agg[agg["best_level"] != universal]
    assert len(differs) >= 1 and not differs["within_noise"].any()
    assert (differs["regret"] > SEED_SD).all()
    assert (agg.loc[agg["best_level"] == universal, "regret"] == 0).all()
    assert t.loc["noise_level", "regret"].eq(0).all()  # token is best everywhere
    r = planted.config_regret
    assert len(r) == 3 and (r["regret"] >= 0).all() and r["universal_config"].nunique() == 1


def test_open_questions(planted):
    q = planted.open_questions
    agg = q[q["question"].str.startswith("aggregation")].set_index("dataset")
    assert agg.loc["d2", "difference"] > 0 > agg.loc["d1", "difference"]
    assert agg["matters"].all()
    assert q.loc[q["question"] == "stage plan", "answer"].tolist() == ["not covered by this sweep"]
    assert len(q[q["question"].str.startswith("positional")]) == 3


def test_best_config_is_confirmed_and_compared(planted):
    best = planted.best.set_index("dataset")
    assert best["confirmed"].all()
    assert best.loc["d1", "config_id"] == "best_d1" and (best["seeds"] == 3).all()
    assert (best["val_NDCG@20_sd"] > 0).all()
    comp = planted.comparison
    assert set(comp["model"]) == {"ADRec, confirmed best", "most_popular", "sasrec"}
    assert (comp.groupby("dataset").size() == 3).all()


def test_published_cells_and_pruned_flagged():
    table = make_table(n_configs=12, repeats=2)
    table["dataset"] = table["dataset"].replace({"d1": "beauty", "d2": "sports"})
    result = analyse(table, n_boot=200)
    pub = result.comparison[result.comparison["model"] == "ADRec, published"].set_index("dataset")
    assert pub.loc["beauty", "test_HR@20"] == 0.1682 and pub.loc["beauty", "test_NDCG@20"] == 0.0832
    assert pub.loc["sports", "test_HR@20"] == 0.0816 and pub.loc["sports", "test_NDCG@20"] == 0.0364
    assert "d3" not in pub.index
    # pruned trials score 3x the base on purpose: listed and flagged, never ranked
    knobs = ["aggregation", "noise_schedule", "beta_a"]
    done, pruned, bad = top_trials(result.table, "beauty", "val_NDCG@20", knobs)
    listed = pd.concat([done, pruned])
    assert listed.loc[listed["noise_schedule"] != "beta", "beta_a"].isna().all()
    assert listed.loc[listed["noise_schedule"] == "beta", "beta_a"].notna().all()
    assert (done["status"] == "completed").all() and done["rank"].tolist() == list(range(1, 9))
    assert len(pruned) == 4 and pruned["flag"].str.startswith("pruned").all()
    assert done["val_NDCG@20"].max() < pruned["val_NDCG@20"].min()
    assert bad["error"].tolist() == ["RuntimeError: boom"]
    assert result.units["config_id"].str.startswith("c").all()  # paired units only


def test_config_id_derived_from_knobs_when_missing():
    table = make_table(n_configs=3, repeats=2, extras=False).drop(columns="config_id")
    ids = with_config_id(table)["config_id"]
    assert ids.str.fullmatch(r"[0-9a-f]{12}").all()
    # same knobs -> same id across datasets and seeds; 3 configs -> 3 ids
    assert ids.nunique() == 3
    assert (ids.groupby(table["dataset"]).apply(lambda s: tuple(sorted(set(s)))).nunique()) == 1


# --- bad and degenerate tables ----------------------------------------------------------------

def test_missing_columns_named(small_table):
    with pytest.raises(TableError, match=r"missing required column\(s\) 'status', 'val_NDCG@20'"):
        analyse(small_table.drop(columns=["status", "val_NDCG@20"]))
    with pytest.raises(TableError, match=r"missing required column\(s\) 'test_MRR'.*--metric"):
        analyse(small_table, metric="test_MRR")


def test_no_completed_trial(small_table):
    table = small_table.assign(status="pruned")
    with pytest.raises(TableError, match=r"no completed ADRec trial .*pruned="):
        analyse(table)


def test_unknown_status_and_phase(small_table):
    with pytest.raises(TableError, match=r"status value\(s\) 'done' not one of completed, pruned"):
        analyse(small_table.assign(status="done"))
    with pytest.raises(TableError, match=r"phase value\(s\) 'grid' not one of paired"):
        analyse(small_table.assign(phase="grid"))


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


def test_too_few_trials_warn_not_zero():
    table = make_table(n_configs=6, repeats=1, datasets=("d1", "d2"), extras=False)
    with pytest.warns(UserWarning) as record:
        result = analyse(table, n_boot=200)
    messages = " ".join(str(w.message) for w in record)
    assert "importance needs at least 10" in messages
    assert "seed-noise floor is unknown" in messages
    assert result.importance[["ped_anova", "fanova"]].isna().all().all()
    assert result.noise["noise_sd"].isna().all()
    assert any("importance needs at least" in w for w in result.warnings)


def test_single_dataset_renders_with_note(tmp_path):
    table = make_table(n_configs=24, repeats=2, datasets=("d1",))
    (tmp_path / "solo").mkdir()
    table.to_parquet(tmp_path / "solo" / "trials.parquet")
    assert main([str(tmp_path / "solo"), "--n-boot", "200", "-q"]) == 0
    out = tmp_path / "solo" / "report"
    md = (out / "report.md").read_text()
    assert "Note: only one dataset (d1)" in md
    assert "## Dataset: d1" in md and "### Effect of each knob" in md
    assert not (out / "tables" / "verdict.csv").exists()
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
    assert len(verdict) == 15 and verdict["best_agrees"].dtype == "boolean"
    assert pd.read_csv(out / "tables" / "levels.csv").shape[0] > 0


# --- the files ----------------------------------------------------------------------------------

def test_report_files_exist(report_dir):
    for name in ("report.md", "report.html", "hiplot.html"):
        assert (report_dir / name).stat().st_size > 1000, name
    for stem in ("verdict", "effects", "levels", "importance", "kendall_tau", "tunability",
                 "noise_floor", "best_configs", "comparison", "open_questions", "config_regret"):
        assert (report_dir / "tables" / f"{stem}.csv").exists(), stem
        assert not pd.read_parquet(report_dir / "tables" / f"{stem}.parquet").empty, stem
    md = (report_dir / "report.md").read_text()
    for png in re.findall(r"\]\((plots/[^)]+\.png)\)", md):
        assert (report_dir / png).read_bytes().startswith(PNG_SIGNATURE)
    assert "Matters only on d1 (best rotary)" in md


def test_report_html_embeds_valid_pngs_only(report_dir):
    html = (report_dir / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    # kendall + importance + 6 knob plots + 3 trial plots
    assert len(images) == 11
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
    assert not re.search(r"<link[^>]*href\s*=\s*['\"]?https?://", text, flags=re.I)
    assert "fonts.googleapis.com/css?family" not in text
    assert "positional_encoding" in text and "val_NDCG@20" in text


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
@pytest.mark.parametrize("page", ["report.html", "hiplot.html"])
def test_pages_render_in_headless_chromium(report_dir, tmp_path, page):
    """Offline rendering: no network, hiplot's inline JavaScript must draw the plot itself."""
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,1600",
             "--virtual-time-budget=5000", f"--screenshot={shot}",
             (report_dir / page).resolve().as_uri()],
            check=True, capture_output=True, timeout=90)
    pixels = mpimg.imread(shot)[..., :3]
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert 0.01 < non_white < 0.9  # text, tables and a plot, on a mostly white page
    assert len(np.unique(pixels.reshape(-1, 3).round(2), axis=0)) > 20  # not a flat colour
