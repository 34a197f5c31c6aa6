"""The optimise phase as packs (`--pack-size K`): TPE asks K configs of one architecture at once,
each member is its own Optuna trial, the pack reports every evaluation round, ASHA stops packs.

The searcher and row tests need no Ray (a real Optuna journal in a temp sweep folder). The sweep
runs real Ray (the session's private Ray, conftest.py) and the real trainer on 100-user slices of
ml-100k, with a crash injected into every pack after training.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from adrec.pack import PACK_FIELDS
from adrec.record import PACK_KEY, pack_rows
from sweeps import storage
from sweeps.searchers import JOURNAL, StudySearcher, journal_storage, reconcile_studies
from sweeps.spaces import load_space
from sweeps.storage import SweepStore
from test_pack_sweep import TINY, USERS, sigkill_packed_sweep, write_space

ENV = {"code_version": "test", "torch_version": "t", "ray_version": "r", "optuna_version": "o"}


@pytest.fixture()
def searcher(tmp_path):
    """A StudySearcher over the `full` space (architecture knobs are swept) on one dataset, packs of 3."""
    storage.activate(SweepStore.open(str(tmp_path), "opt"))
    storage.current().local.mkdir(parents=True, exist_ok=True)
    space = load_space("full")
    return StudySearcher(study_names={"ml-100k": "opt/ml-100k"}, space=space,
                         base_configs={"ml-100k": {**space.base_values(), "dataset": "ml-100k"}},
                         num_samples=8, seed=3, pack_size=3)


def _study(searcher: StudySearcher) -> optuna.Study:
    return searcher.studies()["ml-100k"]


def _by_ray_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}


def test_a_pack_is_k_optuna_trials_of_one_architecture(searcher):
    packs = [searcher.suggest(f"r{i}") for i in range(3)]
    assert searcher.suggest("r3") == "FINISHED"  # 8 trials asked: 3 + 3 + 2
    assert [len(p[PACK_KEY]) for p in packs] == [3, 3, 2]
    study = _study(searcher)
    trials = _by_ray_id(study)
    assert len(trials) == 8 and all(t.state == TrialState.RUNNING for t in trials.values())
    knobs = [p.field for p in searcher.space.params if p.field not in PACK_FIELDS]
    for i, pack in enumerate(packs):
        assert pack["phase"] == "optimize" and pack["dataset"] == "ml-100k"
        members = [m["config"] for m in pack[PACK_KEY]]
        # one architecture per pack (what one network needs), the cheap knobs differ
        assert len({tuple(m[f] for f in PACK_FIELDS) for m in members}) == 1
        assert len({tuple(m[k] for k in knobs) for m in members}) == len(members)
        for j, member in enumerate(members):
            trial = trials[f"r{i}-m{j}"]
            assert trial.user_attrs["pack_id"] == f"r{i}"
            assert member["config_id"] == f"ml-100k-t{trial.number:03d}"
            assert member["job"] == f"optimize/ml-100k/{trial.number}"
            assert all(member[f] == v for f, v in trial.user_attrs["config"].items())
    # packs differ in architecture from one another as TPE likes (the first member is asked freely)
    assert len({tuple(p[PACK_KEY][0]["config"][f] for f in PACK_FIELDS) for p in packs}) >= 2


def test_each_member_is_told_its_own_values_and_outcome(searcher):
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert len(first[PACK_KEY]) == len(second[PACK_KEY]) == 3
    # an evaluation round: members report their best-so-far values at the pack's iteration
    searcher.on_trial_result("a", {"objective": 0.3, "training_iteration": 1,
                                   "member_objectives": [0.1, 0.3, None], "member_status": [None, None, None]})
    searcher.on_trial_complete("a", {"objective": 0.35, "final": 1, "member_objectives": [0.12, 0.35, None],
                                     "member_status": ["completed", "completed", "diverged"]})
    # a member that left its pack is told at that round; when the scheduler stops the pack, the
    # others are pruned
    searcher.on_trial_result("b", {"objective": 0.2, "training_iteration": 1,
                                   "member_objectives": [0.2, 0.05, 0.1], "member_status": ["completed", None, None]})
    trials = _by_ray_id(_study(searcher))
    assert (trials["b-m0"].state, trials["b-m0"].value) == (TrialState.COMPLETE, 0.2)
    assert trials["b-m1"].state == TrialState.RUNNING and trials["b-m1"].intermediate_values == {1: 0.05}
    searcher.on_trial_complete("b", {"objective": 0.2, "training_iteration": 2,
                                     "member_objectives": [0.2, 0.06, 0.1],
                                     "member_status": ["completed", None, None]})
    trials = _by_ray_id(_study(searcher))
    assert trials["a-m0"].intermediate_values == {1: 0.1} and trials["a-m1"].intermediate_values == {1: 0.3}
    assert trials["a-m2"].intermediate_values == {}
    assert [(trials[f"a-m{i}"].state, trials[f"a-m{i}"].value) for i in range(3)] == [
        (TrialState.COMPLETE, 0.12), (TrialState.COMPLETE, 0.35), (TrialState.FAIL, None)]
    assert [trials[f"b-m{i}"].state for i in range(3)] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert trials["b-m0"].value == 0.2 and trials["b-m1"].user_attrs["status"] == "pruned"
    # a crashed pack that never reported: every member failed
    searcher.suggest("c")
    searcher.on_trial_complete("c", None, error=True)
    assert {t.state for t in _by_ray_id(_study(searcher)).values() if t.user_attrs.get("pack_id") == "c"} == {
        TrialState.FAIL}


def test_restart_tells_finished_packs_and_orphans_packs_ray_never_saved(searcher):
    searcher.suggest("done")
    searcher.suggest("lost")
    journal = str(storage.current().path(JOURNAL))
    known = {"done": {"status": "TERMINATED", "last_result": {
        "objective": 0.4, "final": 1, "member_objectives": [0.4, 0.2, 0.3],
        "member_status": ["completed", "completed", "completed"]}}}
    counts = reconcile_studies(journal, {"ml-100k": "opt/ml-100k"}, known)
    assert counts == {"told": 3, "orphaned": 3, "resumed": 0}
    study = optuna.load_study(study_name="opt/ml-100k", storage=journal_storage(journal))
    trials = _by_ray_id(study)
    assert [trials[f"done-m{i}"].value for i in range(3)] == [0.4, 0.2, 0.3]
    lost = [trials[f"lost-m{i}"] for i in range(3)]
    assert all(t.user_attrs.get("orphan") for t in lost)
    # the next pack adopts the orphans (one architecture: they were asked as one pack), asks nothing new
    fresh = StudySearcher(study_names=searcher.study_names, space=searcher.space, base_configs=searcher.base_configs,
                          num_samples=searcher.num_samples, seed=searcher.seed, pack_size=3)
    pack = fresh.suggest("again")
    assert sorted(m["job"] for m in pack[PACK_KEY]) == sorted(f"optimize/ml-100k/{t.number}" for t in lost)
    assert len(_study(fresh).trials) == 6


def test_rows_of_a_stopped_pack_keep_finished_records_and_prune_the_rest():
    cfgs = [{**TINY, "dataset": "ml-100k", "seed": 2025 + i, "phase": "optimize", "config_id": f"ml-100k-t00{i}",
             "job": f"optimize/ml-100k/{i}"} for i in range(2)]
    config = {"phase": "optimize", "dataset": "ml-100k", "model": "adrec", "job": "optimize/ml-100k/0+1",
              "config_id": "ml-100k-t000+ml-100k-t001", PACK_KEY: [{"job": c["job"], "config": c} for c in cfgs]}
    metrics = {m: 0.1 for m in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")}
    record = {"config": cfgs[0], "status": "completed", "val": metrics, "test": {**metrics, "NDCG@20": 0.2},
              "epochs": {"stage1": 1, "stage2": 1, "stage3": 1}, "seconds": {}, "env": {}}
    evaluations = [[{"epoch": 1, "objective": 0.1, "val_NDCG@20": 0.1}],
                   [{"epoch": 1, "objective": 0.05, "val_NDCG@20": 0.05, "val_HR@20": 0.2},
                    {"epoch": 2, "objective": 0.07, "val_NDCG@20": 0.07, "val_HR@20": 0.3}]]
    progress = {"epoch": 2, "evaluations": evaluations, "finished": {"0": record}}
    rows = pack_rows(sweep="s", trial_id="p", config=config, ray_status="TERMINATED", results=None, error=None,
                     env=ENV, progress=progress)
    assert [(r["trial_id"], r["status"], r["pack_id"]) for r in rows] == [("p-m0", "completed", "p"),
                                                                         ("p-m1", "pruned", "p")]
    assert rows[0]["test_NDCG@20"] == 0.2
    assert rows[1]["val_NDCG@20"] == 0.07 and rows[1]["val_HR@20"] == 0.3 and math.isnan(rows[1]["test_NDCG@20"])
    assert rows[1]["epochs_stage2"] == 1 and rows[1]["epochs_stage3"] == 1
    # the same pack crashed after its retries: the finished member keeps its record, the other failed
    rows = pack_rows(sweep="s", trial_id="p", config=config, ray_status="ERROR", results=None, error="boom",
                     env=ENV, progress=progress)
    assert [(r["status"], r["error"]) for r in rows] == [("completed", None), ("failed", "boom")]


@pytest.mark.slow
def test_optimize_phase_runs_packs_that_report_rounds_and_survive_a_crash(tmp_path, ray_address, monkeypatch):
    from sweeps.run import main

    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("ADREC_FAULT_ONCE", str(markers))  # every pack crashes once, after training
    space = write_space(tmp_path, "optpacks", {"paired_samples": 0, "num_samples": 5}, stage3_epochs=3)
    raw = yaml.safe_load(Path(space).read_text())
    raw["params"]["aggregation"] = {"choices": ["linear", "concat"]}  # an architecture knob: packs must agree on it
    Path(space).write_text(yaml.safe_dump(raw))
    assert main(["--space", space, "--max-users", USERS, "--storage", str(tmp_path), "--pack-size", "2",
                 "--no-report", "--quiet"]) == 0
    sweep = tmp_path / "optpacks"
    df = pd.read_parquet(sweep / "trials.parquet")
    assert len(df) == 5 and (df["phase"] == "optimize").all() and df["trial_id"].is_unique
    assert set(df["status"]) <= {"completed", "pruned"}
    packs = df.groupby("pack_id")  # 5 trials asked 2 at a time: two packs and a last single trial
    assert sorted(packs.size()) == [2, 2] and df["pack_id"].isna().sum() == 1
    assert (packs["aggregation"].nunique() == 1).all()
    # each row is its Optuna trial, finished with the row's outcome
    study = optuna.load_study(study_name="optpacks/ml-100k", storage=journal_storage(str(sweep / JOURNAL)))
    trials = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert set(trials) == set(df["trial_id"])
    for _, row in df.iterrows():
        trial = trials[row["trial_id"]]
        assert trial.user_attrs.get("pack_id") == (row["pack_id"] if isinstance(row["pack_id"], str) else None)
        assert trial.user_attrs["status"] == row["status"]
        if row["status"] == "completed":
            assert trial.value == pytest.approx(row["val_NDCG@20"], abs=1e-9)
        assert trial.intermediate_values, row["trial_id"]  # rounds reached the member's trial
        if isinstance(row["pack_id"], str):  # a member's TensorBoard run, finished or stopped by ASHA
            assert list(sweep.glob(f"optimize/*_{row['pack_id']}/checkpoint_*/{row['trial_id']}/events.out.*"))
    # each pack reported its rounds once: the retry after the crash stayed silent up to where it had been
    for pack_id in packs.groups:
        (pack_dir,) = (sweep / "optimize").glob(f"optimize_*_{pack_id}")
        results = [json.loads(x) for x in (pack_dir / "result.json").read_text().splitlines() if x.strip()]
        rounds = [r for r in results if not r.get("final")]
        assert rounds and [r["epoch"] for r in rounds] == sorted({r["epoch"] for r in rounds})
        assert [r["training_iteration"] for r in results] == list(range(1, len(results) + 1))
        assert all(len(r["member_objectives"]) == r["pack_size"] for r in results)
        if results[-1].get("final"):  # it crashed once after training and trained again, silently
            assert (markers / f"{pack_id}.fault").exists() and len(rounds) < len(results)


@pytest.mark.slow
def test_sigkill_mid_optimize_packs_then_resume_runs_each_trial_once(tmp_path, ray_address):
    from sweeps.run import main

    space = write_space(tmp_path, "killedopt", {"paired_samples": 0, "num_samples": 6}, stage3_epochs=3)
    sweep = tmp_path / "killedopt"
    before = sigkill_packed_sweep(space, tmp_path, ray_address, sweep, trials=6)

    assert main(["--resume", "--name", "killedopt", "--storage", str(tmp_path), "--no-report", "--quiet"]) == 0
    df = pd.read_parquet(sweep / "trials.parquet")
    assert len(df) == 6 and df["trial_id"].is_unique and set(df["status"]) <= {"completed", "pruned"}
    assert set(before["trial_id"]) <= set(df["trial_id"])  # finished before the kill: kept, once
    assert df["pack_id"].notna().all() and (df.groupby("pack_id").size() == 2).all()
    study = optuna.load_study(study_name="killedopt/ml-100k", storage=journal_storage(str(sweep / JOURNAL)))
    assert len(study.trials) == 6 and all(t.state.is_finished() for t in study.trials)
    assert {t.user_attrs["ray_trial_id"] for t in study.trials} == set(df["trial_id"])
