"""adrec.bench: the figures of `run_bench` and `python -m adrec bench --out` on an ml-100k slice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adrec import data
from adrec.bench import peak_rss_mb, run_bench
from adrec.config import TrialConfig

torch.set_num_threads(1)  # tiny models: extra threads only contend with the other test processes

ROOT = Path(__file__).resolve().parents[1]
REAL_DIR = Path(os.environ.get(data.ENV_DATA_DIR) or data.SHARED_DATA_DIR)
TINY = dict(dataset="ml-100k", data_dir=str(REAL_DIR), max_users=100, hidden_size=16, heads=2, cam_blocks=1,
            adm_blocks=1, max_len=20, diffusion_steps=24, device="cpu")
FIGURES = ("stage1_s_per_epoch", "stage2_s_per_epoch", "train_s_per_epoch", "eval_s_per_pass",
           "train_gflops_per_s", "peak_rss_mb", "peak_gpu_mem_mb")


@pytest.fixture(autouse=True)
def needs_ml100k() -> None:
    if not (REAL_DIR / data.REGISTRY["ml-100k"].file).is_file():
        pytest.skip(f"ml-100k.pkl is missing from {REAL_DIR}: set {data.ENV_DATA_DIR}")


def check_figures(figures: dict, cfg: TrialConfig) -> None:
    assert set(FIGURES) <= set(figures)
    for key in ("stage1_s_per_epoch", "stage2_s_per_epoch", "train_s_per_epoch", "eval_s_per_pass"):
        assert 0 < figures[key] < 60, key
    assert figures["train_gflops_per_s"] > 0
    assert figures["peak_rss_mb"] > 50  # torch alone is more than that
    assert figures["peak_gpu_mem_mb"] == 0.0  # CPU run
    assert (figures["dataset"], figures["users"], figures["items"]) == ("ml-100k", 100, 1008)
    assert figures["device"] == "cpu"
    assert figures["config"] == cfg.to_dict()
    assert set(figures["val_metrics_after_bench"]) == {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"}


def test_run_bench_figures() -> None:
    cfg = TrialConfig(**TINY)
    figures = run_bench(cfg, epochs=1, warmup=0, eval_passes=1)
    check_figures(figures, cfg)


def test_run_bench_flops_grow_with_the_model() -> None:
    """GFLOP/s = counted FLOPs / seconds; the FLOP count itself must scale with hidden size."""
    from torch.utils.flop_counter import FlopCounterMode

    from adrec.model import ADRec

    counts = []
    for hidden in (16, 32):
        cfg = TrialConfig(**{**TINY, "hidden_size": hidden})
        model = ADRec(cfg, 50)
        seq = torch.randint(1, 51, (8, 10))
        with FlopCounterMode(display=False) as counter:
            model.loss(seq, seq)[0].backward()
        counts.append(counter.get_total_flops())
    assert counts[1] > 1.5 * counts[0] > 0


@pytest.mark.parametrize("epochs, warmup", [(0, 0), (1, -1)], ids=["no-epochs", "negative-warmup"])
def test_run_bench_rejects_bad_counts(epochs: int, warmup: int) -> None:
    with pytest.raises(ValueError, match=rf"bench needs epochs >= 1 and warmup >= 0; got epochs={epochs}, "
                                         rf"warmup={warmup}"):
        run_bench(TrialConfig(**TINY), epochs=epochs, warmup=warmup)


def test_peak_rss_is_in_mib() -> None:
    rss = peak_rss_mb()
    assert 50 < rss < 64 * 1024  # between torch's footprint and the machine's memory


def test_bench_command_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    sets = [f"{k}={v}" for k, v in TINY.items() if k not in ("dataset", "device")]
    args = [sys.executable, "-m", "adrec", "bench", "--dataset", "ml-100k", "--device", "cpu",
            *(a for s in sets for a in ("--set", s)), "--epochs", "1", "--warmup", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    check_figures(figures, TrialConfig(**TINY))
    assert json.loads(proc.stdout) == figures


def test_bench_packs_times_a_pack_and_processes_that_train_the_same_trials(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    tiny = [f"{k}={v}" for k, v in TINY.items() if k not in ("dataset", "device")]
    proc = subprocess.run(
        [sys.executable, "scripts/bench_packs.py", "--dataset", "ml-100k", "--device", "cpu", "--sizes", "2",
         "--epochs", "1", "--out", str(out), *(a for t in tiny for a in ("--set", t))],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["K"], r["mode"]) for r in rows] == [(2, "pack"), (2, "processes")]
    assert all(r["wall_s"] > 0 and r["trials_per_hour"] == pytest.approx(2 / r["wall_s"] * 3600, rel=0.01)
               for r in rows)
    assert rows[0]["mean_val_NDCG@20"] == pytest.approx(rows[1]["mean_val_NDCG@20"], abs=1e-4)  # same trials
    assert "trials/hour" in proc.stdout
