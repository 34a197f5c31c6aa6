"""`python -m adrec`: error messages and exit codes, train --out/--config round trip, data stats.

The entry point itself (`python -m adrec`, exit status, stdout/stderr) runs in a subprocess for one
case of each command; the other cases call `adrec.cli.main(argv)` in-process, the same function
`__main__` exits with, to save a torch import (seconds on a busy machine) per case.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adrec import data
from adrec.cli import main
from adrec.config import KNOBS, TrialConfig, field_names

ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = Path(os.environ.get(data.ENV_DATA_DIR) or data.SHARED_DATA_DIR)
TINY_SET = ["hidden_size=16", "heads=2", "cam_blocks=1", "adm_blocks=1", "max_len=20", "diffusion_steps=24",
            "batch_size=64", "eval_every=1", "stage1_epochs=1", "stage2_epochs=1", "stage3_epochs=1", "device=cpu"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADREC_DATA_URL_BASE": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "adrec", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def seq_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("cli") / "tiny.txt"
    lines = [" ".join(map(str, [u, *(rng.randint(1, 30) for _ in range(rng.randint(5, 12)))])) for u in range(1, 61)]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- errors: exit 2, one line naming what is wrong ----------------------------------------------
def test_unknown_dataset_exits_2_listing_the_known_datasets() -> None:
    proc = run("train", "--dataset", "nope")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: dataset 'nope' is neither a known dataset (baby, beauty, ml-100k, sports, toys, yelp)")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["train", "--dataset", "nope"],
         r"^error: dataset 'nope' is neither a known dataset \(baby, beauty, ml-100k, sports, toys, yelp\)"),
        (["train", "--dataset", "ml-100k", "--set", "hidden_size=abc"], r"^error: hidden_size='abc' is not a valid int"),
        (["train", "--dataset", "ml-100k", "--set", "bogus=1"],
         r"^error: unknown TrialConfig field 'bogus'; known fields: " + ", ".join(field_names())),
        (["train", "--dataset", "ml-100k", "--set", "aggregation=xattn"],
         r"^error: aggregation='xattn' is not one of linear, cross_attention, adaln, concat"),
        (["train", "--dataset", "ml-100k", "--set", "denoiser=mlp", "--set", "aggregation=adaln"],
         r"^error: denoiser='mlp' cannot use aggregation='adaln'"),
        (["bench", "--dataset", "ml-100k", "--set", "diffusion_steps=20"],
         r"^error: noise_schedule='trunc_lin' with diffusion_steps=20"),
        (["bench", "--dataset", "ml-100k", "--epochs", "0"], r"^error: bench needs epochs >= 1"),
        (["train", "--config", "/nonexistent/r.json"], None),
    ],
    ids=["unknown-dataset", "bad-int", "unknown-field", "bad-choice", "bad-combination", "bench-bad-schedule",
         "bench-zero-epochs", "missing-config-file"],
)
def test_bad_input_exits_2_with_a_message(args: list[str], pattern: str | None,
                                          capsys: pytest.CaptureFixture) -> None:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    if pattern is None:  # at least one line that names the file
        assert "/nonexistent/r.json" in err
    else:
        assert re.search(pattern, err.splitlines()[-1]), err


def test_argparse_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "gru4rec"])
    assert info.value.code == 2


# --- train --out and --config -------------------------------------------------------------------
def test_train_on_a_file_writes_the_record_and_config_reruns_it(seq_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run("train", "--data-path", str(seq_file), *sets(*TINY_SET), "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "status=completed" in proc.stdout and f"wrote {out}" in proc.stdout
    assert "HR@20" in proc.stdout.splitlines()[0]
    record = json.loads(out.read_text())
    assert {"config", "val", "test", "epochs", "seconds", "status"} <= set(record)
    assert record["status"] == "completed"
    assert record["config"]["dataset"] == str(seq_file.resolve())
    assert record["config"]["hidden_size"] == 16
    assert TrialConfig.from_dict(record["config"]).to_dict() == record["config"]
    assert set(record["val"]) == set(record["test"]) == {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"}
    assert all(0 <= v <= 1 for v in [*record["val"].values(), *record["test"].values()])
    assert record["epochs"] == {"stage1": 1, "stage2": 1, "stage3": 1}
    assert set(record["seconds"]) == {"stage1", "stage2", "stage3"}

    again = tmp_path / "r2.json"
    assert main(["train", "--config", str(out), "--quiet", "--out", str(again)]) == 0
    rerun = json.loads(again.read_text())
    assert rerun["config"] == record["config"]
    assert rerun["val"] == pytest.approx(record["val"], abs=1e-9)  # same seed, same code: same numbers
    assert rerun["test"] == pytest.approx(record["test"], abs=1e-9)


def test_diverged_run_exits_3_and_records_the_status(seq_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d.json"
    assert main(["train", "--data-path", str(seq_file), *sets(*TINY_SET, "mse_weight=1e9"), "--quiet",
                 "--out", str(out)]) == 3
    record = json.loads(out.read_text())
    assert record["status"] == "diverged" and record["val"] is None and record["error"]
    assert "status=diverged" in capsys.readouterr().out


def test_seeds_train_one_pack_whose_members_are_the_solo_runs(seq_file: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "seeds.json"
    assert main(["train", "--data-path", str(seq_file), *sets(*TINY_SET), "--quiet", "--seeds", "7-8,11",
                 "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["config"]["seed"] for r in records] == [7, 8, 11]
    printed = capsys.readouterr().out
    assert "test over 3 seeds" in printed and "mean" in printed and "sd" in printed
    solo = tmp_path / "solo.json"
    assert main(["train", "--data-path", str(seq_file), *sets(*TINY_SET, "seed=8"), "--quiet",
                 "--out", str(solo)]) == 0
    alone = json.loads(solo.read_text())
    assert records[1]["val"] == pytest.approx(alone["val"], abs=1e-5)
    assert records[1]["test"] == pytest.approx(alone["test"], abs=1e-5)
    hr = [r["test"]["HR@20"] for r in records]
    mean = sum(hr) / 3
    assert f"{mean:.4f}" in printed.split("test over 3 seeds")[1].splitlines()[2]


@pytest.mark.parametrize("text, message", [("2025-2020", "runs backwards"), ("a,b", "is not a seed")])
def test_bad_seed_lists_exit_2(seq_file: Path, capsys: pytest.CaptureFixture, text: str, message: str) -> None:
    assert main(["train", "--data-path", str(seq_file), "--seeds", text]) == 2
    assert message in capsys.readouterr().err


def test_parse_seeds_keeps_order_and_drops_repeats() -> None:
    from adrec.cli import parse_seeds

    assert parse_seeds("2025-2027,2026,3") == [2025, 2026, 2027, 3]


def test_set_overrides_config_file_and_data_path_overrides_dataset(seq_file: Path, tmp_path: Path) -> None:
    import argparse

    from adrec.cli import build_config

    bare = tmp_path / "bare.json"
    bare.write_text(TrialConfig(hidden_size=64, heads=4, lr=0.01).to_json())
    args = argparse.Namespace(config=str(bare), data_path=str(seq_file), dataset="ml-100k", data_dir=None,
                              model="sasrec", set=["lr=0.5", "hidden_size=32"])
    cfg = build_config(args)
    assert (cfg.dataset, cfg.model, cfg.lr, cfg.hidden_size, cfg.heads) == (str(seq_file.resolve()), "sasrec",
                                                                             0.5, 32, 4)


# --- --quick ------------------------------------------------------------------------------------
def _train_args(*argv: str):
    from adrec.cli import parser

    return parser().parse_args(["train", *argv])


def test_quick_sets_short_stages_and_set_still_wins() -> None:
    from adrec.cli import QUICK, build_config, training_plan

    cfg = build_config(_train_args("--dataset", "ml-100k", "--quick"))
    assert {k: getattr(cfg, k) for k in QUICK} == QUICK == {"stage1_epochs": 10, "stage2_epochs": 1,
                                                            "stage3_epochs": 4, "eval_every": 5, "batch_size": 64}
    assert cfg.stage_epochs() == (10, 1, 4) and cfg.patience == TrialConfig().patience
    args = _train_args("--dataset", "ml-100k", "--quick", "--set", "stage3_epochs=8")
    cfg = build_config(args)
    assert (cfg.stage1_epochs, cfg.stage2_epochs, cfg.stage3_epochs, cfg.batch_size) == (10, 1, 8, 64)
    assert training_plan(cfg, args) == ("training: stage 1 at most 10 epochs, stage 2 1, stage 3 at most 8; "
                                        "validation every 5 epochs, stopping after 4 without improvement "
                                        "(--quick: stage1_epochs=10, stage2_epochs=1, eval_every=5, batch_size=64; "
                                        "stage3_epochs from --set)")


def test_shortening_some_stages_names_the_ones_left_long() -> None:
    """The trap of the issue: stage 1 and 3 set to 2 epochs, the warm-up's 5 and evaluation every 5 stay."""
    from adrec.cli import build_config, training_plan

    args = _train_args("--dataset", "ml-100k", "--set", "stage1_epochs=2", "--set", "stage3_epochs=2")
    text = training_plan(build_config(args), args)
    assert text.splitlines() == [
        "training: stage 1 at most 2 epochs, stage 2 5, stage 3 at most 2; validation every 5 epochs, stopping "
        "after 4 without improvement",
        "note: stage2_epochs=5, eval_every=5 kept from the config; a quick run is `--quick` (stage1_epochs=10, "
        "stage2_epochs=1, stage3_epochs=4, eval_every=5, batch_size=64)"]
    full = _train_args("--dataset", "ml-100k")
    assert "note" not in training_plan(build_config(full), full)


# --- knobs ------------------------------------------------------------------------------------
def test_knobs_lists_every_knob_with_paper_name_range_scale_condition_and_default() -> None:
    proc = run("knobs")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["knob", "paper", "values", "scale", "active_when", "default"]
    rows = {line.split()[0]: line for line in lines[1:len(KNOBS) + 1]}
    assert list(rows) == list(KNOBS)
    assert re.fullmatch(r"lambda_uncertainty +λ \(uncertainty weight\) +0\.0001 \.\. 1 +log +aggregation=linear +0\.001",
                        rows["lambda_uncertainty"])
    assert re.fullmatch(r"aggregation +aggregation +linear, cross_attention, adaln, concat +categorical +always +linear",
                        rows["aggregation"])
    s1 = KNOBS["stage1_epochs"]
    assert re.fullmatch(rf"stage1_epochs +stage-1 epochs +{s1.low} \.\. {s1.high} +log "
                        rf"+stage_plan=three_stage\|no_warmup +{s1.default}", rows["stage1_epochs"])
    assert re.fullmatch(r"pcgrad +PCGrad +false, true +categorical +always +false", rows["pcgrad"])


def test_knobs_json_round_trips_the_vocabulary(capsys: pytest.CaptureFixture) -> None:
    assert main(["knobs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["knob"] for k in listed] == list(KNOBS)
    for entry in listed:
        knob = KNOBS[entry["knob"]]
        assert (entry["paper"], entry["kind"], entry["scale"], entry["default"], entry["low"], entry["high"]) == \
            (knob.paper, knob.kind, knob.scale, knob.default, knob.low, knob.high)
        assert tuple(entry["choices"]) == knob.choices
        assert {f: tuple(v) for f, v in entry["when"].items()} == dict(knob.when)
    assert next(k for k in listed if k["knob"] == "lambda_uncertainty")["when"] == {"aggregation": ["linear"]}


# --- data stats ---------------------------------------------------------------------------------
def test_data_stats_prints_the_readme_numbers() -> None:
    if not all((REAL_DIR / info.file).is_file() for info in data.REGISTRY.values()):
        pytest.skip(f"the six dataset files are not all in {REAL_DIR}")
    proc = run("data", "stats", "--data-dir", str(REAL_DIR))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == {"baby", "beauty", "ml-100k", "sports", "toys", "yelp"}
    # users, items, interactions, avg len, min, max (shared/datasets/README.md)
    assert rows["ml-100k"][1:] == ["938", "1008", "54413", "58.01", "5", "365"]
    assert rows["yelp"][1:] == ["30431", "20033", "316354", "10.40", "5", "350"]
    assert rows["beauty"][1:4] == ["10553", "6086", "94148"]
