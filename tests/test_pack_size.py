"""`--pack-size auto`: the pack size measured by timing real pack steps (`adrec.pack_size`), and a
sweep that measures it on a trial's node before it starts (`sweeps.pack_probe`, real Ray).

Timing on a shared CPU is noisy, so the tests check the rule applied to what was measured, and
the ends where the rule decides whatever the timings are (any gain accepted / no pack can gain 99%).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from adrec.config import TrialConfig
from adrec.pack_size import choose_pack_size
from test_pack_sweep import TINY, USERS, write_space


def tiny(**over) -> TrialConfig:
    return TrialConfig.from_dict({**TINY, "dataset": "ml-100k", "max_users": 100,
                                  **over})


def test_doubling_stops_at_the_first_size_that_saves_too_little():
    found = choose_pack_size(tiny(), candidates=(1, 2, 4), min_gain=0.10, steps=2)
    sizes = [p["pack_size"] for p in found["probes"]]
    assert sizes == [1, 2, 4][:len(sizes)] and found["device"] == "cpu" and found["dataset"] == "ml-100k"
    per_member = [p["s_per_member_step"] for p in found["probes"]]
    assert all(p["s_per_step"] > 0 and p["peak_mb"] == 0.0 for p in found["probes"])  # no GPU: no device memory
    gained = 1
    for before, after, k in zip(per_member, per_member[1:], sizes[1:]):
        if after > 0.9 * before:
            break
        gained = k
    assert found["pack_size"] == gained
    assert ("save less than 10%" in found["why"]) == (gained < sizes[-1] or len(sizes) < 3)


def test_the_rule_ends():
    assert choose_pack_size(tiny(), candidates=(1, 2, 4), min_gain=-1e9, steps=1)["pack_size"] == 4
    found = choose_pack_size(tiny(), candidates=(1, 2), min_gain=0.99, steps=1)
    assert found["pack_size"] == 1 and "save less than 99%" in found["why"]
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        choose_pack_size(tiny(), candidates=(0, 2))
    # auto as the default of GPU trials: a trial that sees no GPU measures nothing and gets 1
    assert choose_pack_size(tiny(), measure_cpu=False) == {
        "pack_size": 1, "why": "the trial sees no GPU (on CPU a pack is not faster per member)",
        "budget_mb": float("inf"), "device": "cpu", "dataset": "ml-100k", "probes": []}


@pytest.mark.slow
def test_a_sweep_with_pack_size_auto_measures_it_first_and_keeps_it(tmp_path, ray_address, capsys):
    from sweeps.run import main

    space = write_space(tmp_path, "autopack", {"paired_samples": 2, "repeats": 2})
    assert main(["--space", space, "--max-users", USERS, "--storage", str(tmp_path), "--pack-size", "auto",
                 "--no-report"]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "autopack"
    probe = json.loads((sweep / "pack_size.json").read_text())
    size = probe["pack_size"]
    assert size >= 1 and probe["datasets"]["ml-100k"]["probes"][0]["pack_size"] == 1
    assert json.loads((sweep / "runtime.json").read_text())["pack_size"] == size
    assert f"pack size {size}" in out and "ml-100k on cpu:" in out
    df = pd.read_parquet(sweep / "trials.parquet")
    assert len(df) == 4 and (df["status"] == "completed").all()
    assert (df["pack_id"].isna().all() if size == 1 else df.groupby("pack_id").size().max() <= size)
