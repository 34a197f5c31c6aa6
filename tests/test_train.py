"""adrec.train.fit: the warm-up embedding, model selection, gradient combination, checkpoint/resume, divergence, the stage-1 cache, baselines and
an end-to-end run that must learn a Markov chain.

Everything runs on a seeded synthetic sequence file written into a tmp dir: a few hundred users,
100 items, next item = previous + 1 (mod 100) with probability 0.9.
"""
from __future__ import annotations

import functools
import math
import multiprocessing
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from adrec.config import TrialConfig
from adrec.data import load_dataset
from adrec.train import CHECKPOINT_FILE, LoopState, fit, improved, pcgrad_backward

torch.set_num_threads(1)  # tiny models: extra threads only contend with the other test processes

N_ITEMS = 100


def write_markov_file(path: Path, users: int, items: int = N_ITEMS, p_next: float = 0.9, seed: int = 0) -> Path:
    """`user item item ...` lines: each next item is prev % items + 1 with prob p_next, else uniform."""
    rng = random.Random(seed)
    lines = []
    for user in range(1, users + 1):
        item = rng.randint(1, items)
        seq = [item]
        for _ in range(rng.randint(8, 20) - 1):
            item = item % items + 1 if rng.random() < p_next else rng.randint(1, items)
            seq.append(item)
        lines.append(" ".join(map(str, [user, *seq])))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_markov_file(tmp_path_factory.mktemp("data") / "markov120.txt", users=120)


def tiny(dataset: Path, **changes: Any) -> TrialConfig:
    values = dict(dataset=str(dataset), hidden_size=16, heads=2, cam_blocks=1, adm_blocks=1, max_len=20,
                  diffusion_steps=24, device="cpu", batch_size=64, eval_every=1, patience=10,
                  stage1_epochs=1, stage2_epochs=1, stage3_epochs=1)
    return TrialConfig(**{**values, **changes})


class Recorder:
    """A reporter that keeps every payload and, on chosen epochs, a copy of the checkpoint dir."""

    def __init__(self, copy_at: dict[int, Path] | None = None, keep_model: bool = False):
        self.payloads: list[dict[str, Any]] = []
        self.models: dict[int, dict[str, torch.Tensor]] = {}
        self.copy_at, self.keep_model = copy_at or {}, keep_model

    def __call__(self, payload: dict[str, Any], path: Path | None) -> None:
        self.payloads.append(dict(payload))
        if path is None:
            return
        assert (Path(path) / CHECKPOINT_FILE).is_file()
        if payload["epoch"] in self.copy_at:
            shutil.copytree(path, self.copy_at[payload["epoch"]])
        if self.keep_model:
            snap = torch.load(Path(path) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
            self.models[payload["epoch"]] = {k: v.clone() for k, v in snap["loop"]["model"].items()}

    def by_epoch(self) -> dict[int, dict[str, Any]]:
        return {p["epoch"]: p for p in self.payloads}


RESULT_KEYS = {"config", "status", "error", "epochs", "seconds", "env", "val", "test", "best_epoch"}


def assert_metrics(metrics: dict[str, float]) -> None:
    assert set(metrics) == {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["HR@5"] <= metrics["HR@10"] <= metrics["HR@20"]
    assert all(metrics[f"NDCG@{k}"] <= metrics[f"HR@{k}"] for k in (5, 10, 20))


# --- the record and the reports -----------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [{"stage_plan": "three_stage", "stage2_epochs": 1, "stage3_epochs": 1},
     {"stage_plan": "no_warmup", "stage2_epochs": 1, "stage3_epochs": 1},
     {"stage_plan": "no_pretrain", "stage2_epochs": 1, "stage3_epochs": 0, "pcgrad": True},
     {"stage_plan": "three_stage", "stage2_epochs": 1, "stage3_epochs": 1, "padding_mask": "query",
      "selection": "metric"}],
    ids=["three_stage", "no_warmup", "no_pretrain-pcgrad", "query-mask-one-metric"],
)
def test_fit_record_and_reports(small_file: Path, changes: dict) -> None:
    cfg = tiny(small_file, **changes)
    rec = Recorder()
    result = fit(cfg, report=rec)
    assert RESULT_KEYS <= set(result)
    assert result["status"] == "completed" and result["error"] is None
    assert result["config"] == cfg.to_dict()
    s1, s2, s3 = cfg.stage_epochs()
    assert result["epochs"] == {"stage1": s1, "stage2": s2, "stage3": s3}
    assert_metrics(result["val"])
    assert_metrics(result["test"])
    assert result["seconds"]["stage1"] > 0 if s1 else result["seconds"]["stage1"] == 0
    # One report per evaluation (eval_every=1) of stages 2-3, validation metrics only.
    assert [p["epoch"] for p in rec.payloads] == list(range(1, s2 + s3 + 1))
    assert [p["stage"] for p in rec.payloads] == [2] * s2 + [3] * s3
    for p in rec.payloads:
        assert not any(k.startswith("test") for k in p)
        assert {f"val_{k}" for k in result["val"]} <= set(p)
        assert math.isfinite(p["loss"]) and p["loss"] > 0
    kept = rec.by_epoch()[result["best_epoch"]]  # the selected model's own evaluation
    assert result["val"] == pytest.approx({k[4:]: v for k, v in kept.items() if k.startswith("val_")})
    assert rec.payloads[-1]["objective"] == pytest.approx(kept["val_NDCG@20"])
    if cfg.selection == "metric":
        assert kept["val_NDCG@20"] == max(p["val_NDCG@20"] for p in rec.payloads)
    assert result["env"]["code_version"]  # git describe of this checkout by default


def test_fit_records_the_code_version_it_is_given(small_file: Path) -> None:
    result = fit(tiny(small_file, model="most_popular"), code_version="driver-abc123")
    assert result["env"]["code_version"] == "driver-abc123"


# --- model selection ----------------------------------------------------------------------------
def test_any_metric_selection_is_the_authors_strict_rounded_comparison() -> None:
    cfg = TrialConfig()
    assert cfg.selection == "any_metric"  # the authors' default
    state = LoopState()
    first = {"HR@5": 0.1, "HR@10": 0.2, "HR@20": 0.3, "NDCG@5": 0.05, "NDCG@10": 0.06, "NDCG@20": 0.07}
    assert improved(cfg, state, first)
    assert not improved(cfg, state, dict(first))  # equal is not better
    assert not improved(cfg, state, {**first, "HR@20": 0.3 + 4e-9})  # below the authors' rounding (1e-6)
    assert improved(cfg, state, {**first, "HR@5": 0.0, "NDCG@20": 0.0701})  # one metric is enough
    assert not improved(cfg, state, {**first, "NDCG@20": 0.0701})  # ... and it became the new best
    assert not improved(cfg, LoopState(), {k: 0.0 for k in first})  # bests start at 0, as theirs
    one = cfg.replace(selection="metric")
    state = LoopState(best_value=0.07)
    assert not improved(one, state, {**first, "HR@5": 0.9}) and improved(one, state, {**first, "NDCG@20": 0.08})


def test_a_run_whose_metrics_stay_zero_keeps_its_first_model(small_file: Path, monkeypatch) -> None:
    """Under any_metric nothing beats bests that start at 0; the run still ends with a model and metrics."""
    import adrec.train as train

    zeros = {m: 0.0 for m in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")}
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: dict(zeros))
    result = fit(tiny(small_file, stage1_epochs=0, stage_plan="no_pretrain", stage3_epochs=4, patience=2))
    assert result["status"] == "completed"
    assert result["val"] == zeros and result["test"] == zeros
    assert result["best_epoch"] == 1 and result["epochs"]["stage3"] == 2  # patience still counts


# --- stages 2 and 3 -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["frozen", "decayed"])
def test_warmup_embedding_frozen_or_decayed_and_stage3_moves_it(small_file: Path, tmp_path: Path, mode: str) -> None:
    """'frozen': bitwise unchanged through the warm-up. 'decayed' (the authors): only Adam's weight
    decay moves it, by at most lr per step and entry (Adam's step is bounded by lr), row 0 too."""
    # weight_decay=0.1 and a high lr: Adam's weight decay would move a frozen-but-reachable table.
    cfg = tiny(small_file, weight_decay=0.1, lr=1e-2, stage1_epochs=1, stage2_epochs=2, stage3_epochs=1,
               warmup_embedding=mode)
    rec = Recorder(keep_model=True)
    fit(cfg, report=rec, stage1_cache=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.pt")
    pretrained = torch.load(cached, map_location="cpu", weights_only=False)["embedding"]
    emb = {e: rec.models[e]["item_emb.weight"] for e in (1, 2, 3)}
    if mode == "frozen":
        assert torch.equal(emb[1], pretrained)
        assert torch.equal(emb[2], pretrained)
    else:
        steps = 2  # 120 users, batch 64: two optimiser steps per epoch
        for epoch in (1, 2):
            moved = (emb[epoch] - pretrained).abs()
            assert 0.5 * cfg.lr < moved.max() <= epoch * steps * cfg.lr * 1.0001
            # Weight decay pulls every entry towards 0 (entries smaller than the steps may overshoot it).
            big = pretrained.abs() > epoch * steps * cfg.lr
            assert big.sum() > 100 and torch.all(emb[epoch].abs()[big] < pretrained.abs()[big])
    assert (emb[3] - emb[2]).abs().max() > 1e-4
    # The rest of the model did train during the warm-up.
    cam = [k for k in rec.models[1] if k.startswith("cam.") and k.endswith("weight")][0]
    assert (rec.models[2][cam] - rec.models[1][cam]).abs().max() > 1e-4


# --- checkpoint and resume ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(small_file: Path, tmp_path_factory: pytest.TempPathFactory):
    ckpts = tmp_path_factory.mktemp("ckpts")
    cfg = tiny(small_file, stage1_epochs=1, stage2_epochs=1, stage3_epochs=2, weight_decay=1e-3)
    rec = Recorder(copy_at={1: ckpts / "after1", 2: ckpts / "after2"})
    result = fit(cfg, report=rec)
    return cfg, rec, result, ckpts


@pytest.mark.parametrize("after", [1, 2], ids=["from-warmup-into-stage3", "inside-stage3"])
def test_resume_gives_the_same_run(uninterrupted, after: int) -> None:
    cfg, rec, result, ckpts = uninterrupted
    resumed_rec = Recorder()
    resumed = fit(cfg, report=resumed_rec, resume_from=ckpts / f"after{after}")
    full = rec.by_epoch()
    assert [p["epoch"] for p in resumed_rec.payloads] == list(range(after + 1, 4))
    for p in resumed_rec.payloads:
        ref = full[p["epoch"]]
        assert p["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        for key in ref:
            if key.startswith("val_") or key == "objective":
                assert p[key] == pytest.approx(ref[key], abs=1e-6), key
    assert resumed["status"] == "completed"
    assert resumed["epochs"] == result["epochs"]
    assert resumed["val"] == pytest.approx(result["val"], abs=1e-6)
    assert resumed["test"] == pytest.approx(result["test"], abs=1e-6)
    assert resumed["best_epoch"] == result["best_epoch"]


def test_resume_from_a_folder_without_checkpoint_is_an_error(small_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds no checkpoint\.pt"):
        fit(tiny(small_file), resume_from=tmp_path)


# --- divergence ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, has_metrics",
    [
        ({"mse_weight": 1e9}, False),
        # One batch per epoch: epoch 1 is evaluated, Adam's 1e4 step then blows up epoch 2.
        ({"stage_plan": "no_pretrain", "lr": 1e4, "batch_size": 512, "stage3_epochs": 3}, True),
        # The same blow-up inside stage 1 (the SASRec pre-training run of a three-stage trial).
        ({"lr": 1e4, "batch_size": 512, "stage1_epochs": 3}, None),
    ],
    ids=["huge-mse-weight-at-once", "huge-lr-after-an-evaluation", "huge-lr-in-stage1"],
)
def test_diverging_run_ends_with_status_diverged(small_file: Path, changes: dict, has_metrics: bool | None) -> None:
    cfg = tiny(small_file, **changes)
    result = fit(cfg)  # no exception
    assert result["status"] == "diverged"
    assert "training loss became" in result["error"]
    if has_metrics:  # the best model before the blow-up is kept and tested
        assert result["best_epoch"] == 1
        assert_metrics(result["val"])
        assert_metrics(result["test"])
    elif has_metrics is False:
        assert result["val"] is None and result["test"] is None
        assert result["epochs"]["stage2"] + result["epochs"]["stage3"] == 0


def test_divergence_message_names_the_real_epoch(small_file: Path) -> None:
    cfg = tiny(small_file, stage_plan="no_pretrain", lr=1e4, batch_size=512, stage3_epochs=3)
    result = fit(cfg)
    assert result["status"] == "diverged"
    assert result["error"].endswith("at epoch 2"), result["error"]  # not the batch-order seed 3002


# --- stage-1 cache ------------------------------------------------------------------------------
def test_stage1_cache_is_reused_for_the_same_key_and_not_for_another(small_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cfg = tiny(small_file, stage1_epochs=2, stage2_epochs=1, stage3_epochs=1)
    first_rec, second_rec = Recorder(keep_model=True), Recorder(keep_model=True)
    first = fit(cfg, report=first_rec, stage1_cache=cache)
    second = fit(cfg, report=second_rec, stage1_cache=cache)
    assert first["seconds"]["stage1"] > 0
    assert second["seconds"]["stage1"] == 0.0
    assert second["epochs"] == first["epochs"] == {"stage1": 2, "stage2": 1, "stage3": 1}
    assert len(list(cache.glob("*.pt"))) == 1
    # Same embedding out of the cache (bitwise, seen in the frozen warm-up) and the same run after it.
    assert torch.equal(first_rec.models[1]["item_emb.weight"], second_rec.models[1]["item_emb.weight"])
    assert second["stage1_val"] == first["stage1_val"]
    assert second["val"] == first["val"] and second["test"] == first["test"]
    # The cached run equals a run without the cache.
    uncached = fit(cfg)
    assert uncached["val"] == first["val"] and uncached["test"] == first["test"]

    other = fit(cfg.replace(seed=cfg.seed + 1), stage1_cache=cache)
    assert other["seconds"]["stage1"] > 0
    assert len(list(cache.glob("*.pt"))) == 2
    # A stage-2/3-only knob shares the key.
    shared = fit(cfg.replace(lambda_uncertainty=0.5, aggregation="concat"), stage1_cache=cache)
    assert shared["seconds"]["stage1"] == 0.0
    assert len(list(cache.glob("*.pt"))) == 2


def test_two_processes_share_one_stage1_result(small_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache = tmp_path / "cache"
    cfg = tiny(small_file, stage1_epochs=3, stage2_epochs=0, stage3_epochs=1)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(functools.partial(fit, stage1_cache=str(cache)), [cfg, cfg])
    assert len(list(cache.glob("*.pt"))) == 1
    assert not list(cache.glob("*.tmp*"))
    assert sorted(r["seconds"]["stage1"] == 0.0 for r in results) == [False, True]  # one writer
    a, b = results
    assert a["status"] == b["status"] == "completed"
    assert a["val"] == b["val"] and a["test"] == b["test"] and a["stage1_val"] == b["stage1_val"]


# --- baselines ----------------------------------------------------------------------------------
def test_most_popular_through_fit_matches_a_hand_count(small_file: Path) -> None:
    cfg = tiny(small_file, model="most_popular")
    rec = Recorder()
    result = fit(cfg, report=rec)
    assert result["status"] == "completed"
    assert result["epochs"] == {"stage1": 0, "stage2": 0, "stage3": 0}
    data = load_dataset(str(small_file))

    def hr20(histories: list[list[int]], targets: list[int]) -> float:
        counts = [0] * (data.num_items + 1)
        for h in histories:
            for item in h:
                counts[item] += 1
        hits = [sum(c > counts[t] for c in counts[1:]) < 20 for t in targets]
        return sum(hits) / len(hits)

    assert result["val"]["HR@20"] == pytest.approx(hr20(data.train, data.val), abs=1e-12)
    test_histories = [h + [v] for h, v in zip(data.train, data.val)]
    assert result["test"]["HR@20"] == pytest.approx(hr20(test_histories, data.test), abs=1e-12)
    assert len(rec.payloads) == 1 and rec.payloads[0]["val_HR@20"] == result["val"]["HR@20"]


def test_sasrec_through_fit(small_file: Path) -> None:
    cfg = tiny(small_file, model="sasrec", stage1_epochs=2)
    rec = Recorder()
    result = fit(cfg, report=rec)
    assert result["status"] == "completed"
    assert result["epochs"] == {"stage1": 2, "stage2": 0, "stage3": 0}
    assert result["seconds"]["stage1"] > 0
    assert [p["stage"] for p in rec.payloads] == [1, 1]
    assert_metrics(result["val"])
    assert_metrics(result["test"])


# --- PCGrad -------------------------------------------------------------------------------------
def test_pcgrad_projects_conflicting_gradients_by_hand() -> None:
    """g1 = (1, 0), g2 = (-1, 1) conflict (dot -1): g1' = g1 + g2/2 = (.5, .5), g2' = g2 + g1 = (0, 1)."""
    model = torch.nn.Linear(2, 1, bias=False)
    w = model.weight
    losses = [(w * torch.tensor([[1.0, 0.0]])).sum(), (w * torch.tensor([[-1.0, 1.0]])).sum()]
    pcgrad_backward(model, losses)
    torch.testing.assert_close(w.grad, torch.tensor([[0.5, 1.5]]))
    # No conflict: plain sum.
    losses = [(w * torch.tensor([[1.0, 0.0]])).sum(), (w * torch.tensor([[1.0, 1.0]])).sum()]
    pcgrad_backward(model, losses)
    torch.testing.assert_close(w.grad, torch.tensor([[2.0, 1.0]]))


# --- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["three_stage", "no_pretrain"], ids=str)
def test_end_to_end_learns_a_markov_chain(tmp_path: Path, plan: str) -> None:
    """300 users on a 0.9-deterministic chain over 100 items. Most-popular sits near chance
    (20/100); the best possible HR@20 is ~0.9 + 0.1 * 20/100 = 0.92; ADRec must get >= 3x most-popular
    and stay below that ceiling (a score above it would mean the test item leaked)."""
    path = write_markov_file(tmp_path / "markov300.txt", users=300)
    base = dict(dataset=str(path), hidden_size=32, heads=2, cam_blocks=1, adm_blocks=1, max_len=20,
                diffusion_steps=24, device="cpu", batch_size=32, lr=5e-3, eval_every=2, patience=100)
    popular = fit(TrialConfig(model="most_popular", **base))["test"]["HR@20"]
    result = fit(TrialConfig(stage_plan=plan, stage1_epochs=5, stage2_epochs=1, stage3_epochs=10, **base))
    hr20 = result["test"]["HR@20"]
    assert 0.1 <= popular <= 0.3
    assert result["status"] == "completed"
    assert hr20 >= 3 * popular, (hr20, popular)
    assert hr20 <= 0.97


@pytest.mark.parametrize("mode", ["key", "query"])
@pytest.mark.parametrize("max_tokens", [300, 1000], ids=["many-micro-batches", "few-micro-batches"])
def test_micro_batches_give_the_full_batch_step(max_tokens, mode: str):
    """Gradient accumulation over micro-batches must equal one step on the whole batch (CE is a mean
    over positions, so each micro-batch is weighted by its share of them)."""
    from adrec.data import load_dataset
    from adrec.model import SASRec
    from adrec.train import Splits, make_optimizer, train_epoch

    data = load_dataset("ml-100k", max_users=80)
    splits = Splits.build(data, 50)
    results = []
    for tokens in (10**9, max_tokens):
        cfg = TrialConfig(hidden_size=16, dropout=0.0, emb_dropout=0.0, batch_size=64, max_tokens_per_step=tokens,
                          padding_mask=mode)
        torch.manual_seed(0)
        model = SASRec(cfg, data.num_items)
        optimizer, _ = make_optimizer(cfg, model)
        loss = train_epoch(cfg, model, optimizer, splits.train, 1, torch.device("cpu"))
        results.append((loss, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (full_loss, full_params), (micro_loss, micro_params) = results
    assert abs(full_loss - micro_loss) < 1e-5
    assert (full_params - micro_params).abs().max().item() < 1e-4


@pytest.mark.parametrize("pcgrad", [False, True], ids=["plain", "pcgrad"])
def test_mean_combination_is_half_the_summed_gradient(pcgrad: bool) -> None:
    """The authors average the CE and MSE gradients: exactly half the sum, parameter by parameter."""
    from adrec.model import ADRec
    from adrec.train import backward

    grads = {}
    for combination in ("mean", "sum"):
        cfg = TrialConfig(hidden_size=16, heads=2, max_len=10, dropout=0.0, emb_dropout=0.0, pcgrad=pcgrad,
                          lambda_uncertainty=0.5, loss_combination=combination)
        torch.manual_seed(0)
        model = ADRec(cfg, 30).train()
        seq = torch.randint(1, 31, (6, 10))
        seq[3:, :4] = 0
        torch.manual_seed(1)
        out = model.forward_train(seq[:, :-1], seq[:, 1:] * (seq[:, :-1] > 0))
        backward(cfg, model, out.ce, out.mse)
        grads[combination] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert TrialConfig().loss_combination == "mean"
    for name, g in grads["sum"].items():
        torch.testing.assert_close(grads["mean"][name], g / 2, rtol=1e-5, atol=1e-9)
    assert max(float(g.abs().max()) for g in grads["sum"].values()) > 1e-2


def test_packed_rows_give_the_unpacked_loss() -> None:
    """SASRec (deterministic without dropout): the CE of a packed batch is the left-padded one's."""
    from adrec.batches import pack
    from adrec.data import load_dataset
    from adrec.model import SASRec
    from adrec.train import Splits

    data = load_dataset("ml-100k", max_users=60)
    seq, tgt = next(Splits.build(data, 50).train.batches(60, seed=0, epoch=1))
    keep = torch.arange(50) >= 50 - (2 + torch.arange(60) % 9).unsqueeze(1)  # 2-10 newest items per row
    seq, tgt = seq[:, -50:] * keep, tgt[:, -50:] * keep  # short sequences, so that several share a row
    cfg = TrialConfig(hidden_size=16, dropout=0.0, emb_dropout=0.0)
    torch.manual_seed(0)
    model = SASRec(cfg, data.num_items)
    packed = pack(seq, tgt)
    assert packed.seq.shape[0] < seq.shape[0]
    torch.testing.assert_close(model.loss(packed.seq, packed.tgt, packed.segment)[0], model.loss(seq, tgt)[0])


def test_flush_denormals_zeroes_subnormal_floats_on_cpu() -> None:
    from adrec.train import flush_denormals

    torch.set_flush_denormal(False)  # an earlier fit in this process may have turned it on
    tiny = torch.tensor([1e-39, 1e-30])  # the first is subnormal in float32
    assert tiny[0] > 0
    try:
        flush_denormals(torch.device("cpu"))
        assert (tiny * 1.0).tolist()[0] == 0.0 and (tiny * 1.0)[1] > 0
    finally:
        torch.set_flush_denormal(False)
