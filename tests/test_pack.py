"""adrec.pack: a member trained in a pack equals the same config trained alone by `fit`.

Each architecture variant packs members that differ in everything a pack lets differ (seed, lr,
λ, dropout, MSE weight, noise schedule and level, weight decay, warm-up mode, loss combination,
selection, batch size and micro-batches, stage epochs, evaluation interval, patience, PCGrad),
one of them stopping early and, in the first pack, one diverging; every reported loss and metric, the
stopping epoch and the test metrics must equal the solo run's within 1e-5. The per-member Adam
and learning-rate schedule are checked against torch's own, bitwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adrec.config import TrialConfig
from adrec.pack import (FROM_GRAD, Layout, MemberAdam, MemberDenoiser, MemberRNG, MemberSampler, PackedDropout, _start_member,
                        check_packable, cosine_lrs, evaluate_members, fit_pack, stack_models)
from adrec.train import Splits, evaluate, fit, prepare
from test_train import Recorder, tiny, write_markov_file

torch.set_num_threads(1)  # tiny models: extra threads only contend with the other test processes

TOL = 1e-5

# Members of a pack: A is the small default run, B changes every non-architecture knob it can,
# C skips stage 1 and stops early (patience 1), D blows up in its second epoch, E and F use PCGrad.
MEMBERS: dict[str, dict[str, Any]] = {
    "A": dict(stage1_epochs=1, stage2_epochs=1, stage3_epochs=2),
    "B": dict(stage1_epochs=1, stage2_epochs=2, stage3_epochs=1, seed=7, lr=3e-3, lambda_uncertainty=0.3,
              dropout=0.0, emb_dropout=0.1, mse_weight=2.0, noise_schedule="beta", beta_a=0.5, beta_b=5.0,
              noise_level="sequence", loss_combination="sum", weight_decay=1e-3, warmup_embedding="frozen",
              selection="metric", batch_size=48, max_tokens_per_step=300, cosine_t_max=3, eval_every=2),
    "C": dict(stage_plan="no_pretrain", stage1_epochs=0, stage2_epochs=0, stage3_epochs=10, patience=1,
              selection="metric", seed=11, lr=1e-2, bucketed_batches=True, dropout=0.3),
    "D": dict(stage_plan="no_pretrain", lr=1e4, batch_size=512, stage3_epochs=3),
    "E": dict(stage1_epochs=1, stage2_epochs=1, stage3_epochs=2, pcgrad=True, seed=5, lr=2e-3),
    "F": dict(stage1_epochs=1, stage2_epochs=2, stage3_epochs=1, pcgrad=True, loss_combination="sum",
              warmup_embedding="frozen", mse_weight=5.0),
}

# Every aggregation, positional encoding and denoiser at least once, and the authors' query masking.
VARIANTS = [
    (dict(aggregation="linear", positional_encoding="none"), "ABCD"),
    (dict(aggregation="cross_attention", positional_encoding="learned"), "ABE"),
    (dict(aggregation="adaln", positional_encoding="sinusoidal"), "AB"),
    (dict(aggregation="concat", positional_encoding="rotary"), "AC"),
    (dict(aggregation="linear", positional_encoding="learned", denoiser="mlp"), "AF"),
    (dict(aggregation="concat", positional_encoding="none", denoiser="mlp"), "BC"),
    (dict(aggregation="linear", positional_encoding="rotary", padding_mask="query"), "AB"),
]
VARIANT_IDS = ["-".join(str(v) for v in arch.values()) + f"-{names}" for arch, names in VARIANTS]


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_markov_file(tmp_path_factory.mktemp("data") / "markov120.txt", users=120)


def assert_same_run(solo: dict, solo_rec: Recorder, packed: dict, packed_rec: Recorder) -> None:
    assert packed["status"] == solo["status"] and packed["error"] == solo["error"]
    assert packed["epochs"] == solo["epochs"]
    assert packed["best_epoch"] == solo["best_epoch"]
    assert [p["epoch"] for p in packed_rec.payloads] == [p["epoch"] for p in solo_rec.payloads]
    for ours, theirs in zip(packed_rec.payloads, solo_rec.payloads):
        assert ours["stage"] == theirs["stage"]
        for key, value in theirs.items():
            if key != "seconds":
                assert ours[key] == pytest.approx(value, abs=TOL), (theirs["epoch"], key)
    for split in ("val", "test"):
        if solo[split] is None:
            assert packed[split] is None
        else:
            assert packed[split] == pytest.approx(solo[split], abs=TOL), split
    if "stage1_val" in solo:
        assert packed["stage1_val"] == pytest.approx(solo["stage1_val"], abs=TOL)


@pytest.mark.parametrize("arch, names", VARIANTS, ids=VARIANT_IDS)
def test_a_packed_member_equals_its_solo_run(small_file: Path, arch: dict, names: str) -> None:
    cfgs = [tiny(small_file, **{**MEMBERS[n], **arch}) for n in names]
    packed_recs = [Recorder() for _ in cfgs]
    packed = fit_pack(cfgs, packed_recs, stack=len(cfgs))  # one stacked network (a GPU's layout), on CPU
    for name, cfg, result, rec in zip(names, cfgs, packed, packed_recs):
        solo_rec = Recorder()
        solo = fit(cfg, report=solo_rec)
        assert_same_run(solo, solo_rec, result, rec)
        assert result["config"] == cfg.to_dict()
        if name == "D":
            assert result["status"] == "diverged" and result["best_epoch"] == 1
        else:
            assert result["status"] == "completed"
        if name == "C" and arch["aggregation"] == "concat":  # patience 1 stops it early here
            assert result["epochs"]["stage3"] < 10 and rec.payloads[-1]["epoch"] == result["best_epoch"] + 1


def test_members_of_one_seed_share_the_stage1_cache(small_file: Path, tmp_path: Path) -> None:
    base = tiny(small_file, stage1_epochs=2, stage2_epochs=1, stage3_epochs=1)
    cfgs = [base, base.replace(lambda_uncertainty=0.5, mse_weight=3.0)]
    packed = fit_pack(cfgs, stage1_cache=tmp_path / "cache", stack=len(cfgs))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert [r["stage1_cached"] for r in packed] == [False, True]
    for cfg, result in zip(cfgs, packed):
        solo = fit(cfg)
        assert result["val"] == pytest.approx(solo["val"], abs=TOL)
        assert result["test"] == pytest.approx(solo["test"], abs=TOL)


@pytest.mark.parametrize(
    "changes, field",
    [({"hidden_size": 32}, "hidden_size"), ({"aggregation": "concat"}, "aggregation"),
     ({"padding_mask": "query"}, "padding_mask"), ({"max_len": 10}, "max_len")],
)
def test_configs_of_different_architectures_are_refused_naming_the_field(changes: dict, field: str) -> None:
    base = TrialConfig(hidden_size=16, heads=2)
    with pytest.raises(ValueError, match=f"^{field} differs within the pack"):
        check_packable([base, base.replace(**changes)])
    check_packable([base, base.replace(seed=3, lr=0.01, dropout=0.0, stage_plan="no_pretrain")])


def test_baselines_are_refused() -> None:
    with pytest.raises(ValueError, match="model='sasrec' cannot be packed"):
        check_packable([TrialConfig(model="sasrec")])


@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
def test_member_adam_is_torch_adam_per_member(foreach: bool) -> None:
    """Stacked members with their own lr and weight decay, two taking their slices of the stacked
    .grad (FROM_GRAD), one its own tensor and skipping a parameter for two steps (as the frozen
    warm-up table; its rows are updated apart until it rejoins): step for step bitwise equal to
    torch.optim.Adam, in its single-tensor and its foreach (the GPU's) variant."""
    torch.manual_seed(0)
    lrs, decays = [1e-3, 3e-2, 1e-3], [1e-5, 1e-2, 1e-5]
    shapes = [(5, 4), (4,)]
    stacked = [torch.nn.Parameter(torch.randn(3, *s)) for s in shapes]
    solos = [[torch.nn.Parameter(p.data[m].clone()) for p in stacked] for m in range(3)]
    ours = MemberAdam(stacked, 3, foreach=foreach)
    theirs = [torch.optim.Adam(ps, lr=lr, weight_decay=wd, foreach=foreach)
              for ps, lr, wd in zip(solos, lrs, decays)]
    for step in range(6):
        grads = [torch.randn(3, *s) for s in shapes]
        for p, g in zip(stacked, grads):
            p.grad = g
        updates = []
        for m in range(3):
            skip = m == 2 and step < 2
            member_grads = [None if skip and i == 0 else g[m] for i, g in enumerate(grads)]
            updates.append((m, member_grads if m == 2 else [FROM_GRAD] * len(shapes), lrs[m], decays[m]))
            for p, g in zip(solos[m], member_grads):
                p.grad = None if g is None else g.clone()
            theirs[m].step()
        ours.step(updates)
    for m in range(3):
        for p, q in zip(stacked, solos[m]):
            assert torch.equal(p.data[m], q.data)
    assert not torch.equal(stacked[0].data[2], solos[0][0].data)  # the members did differ


def test_member_adam_compacts_to_the_members_left() -> None:
    stacked = [torch.nn.Parameter(torch.zeros(3, 2))]
    adam = MemberAdam(stacked, 3)
    adam.step([(2, [torch.ones(2)], 0.1, 0.0)])
    stacked[0].data = stacked[0].data[torch.tensor([0, 2])]
    adam.compact(torch.tensor([0, 2]))
    assert adam.exp_avg[0].shape == (2, 2) and adam.steps[0].tolist() == [0.0, 1.0]
    assert stacked[0].data[0].tolist() == [0.0, 0.0] and stacked[0].data[1].tolist() == pytest.approx([-0.1, -0.1])


def test_cosine_lrs_are_the_schedulers_floats() -> None:
    cfg = TrialConfig(lr=3e-3, cosine_t_max=7)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.cosine_t_max)
    lrs = cosine_lrs(cfg)
    for _ in range(20):
        assert next(lrs) == opt.param_groups[0]["lr"]
        opt.step()
        sched.step()


def test_pack_bench_times_the_pack_and_the_runs_in_sequence(small_file: Path) -> None:
    from adrec.bench import _evaluations_per_trial, run_pack_bench

    figures = run_pack_bench(tiny(small_file, eval_every=3), k=2, epochs=2, trial_epochs=8)
    assert figures["pack_size"] == 2 and len(figures["pack_s_per_epoch"]) == len(figures["sequential_s_per_epoch"]) == 2
    assert figures["pack_s_per_member_epoch"] == pytest.approx(sorted(figures["pack_s_per_epoch"])[0] / 2 / 2
                                                               + sorted(figures["pack_s_per_epoch"])[1] / 2 / 2)
    for key in ("pack_trials_per_hour", "sequential_trials_per_hour", "eval_s_per_pass", "pack_over_sequential",
                "pack_eval_s_per_member_pass"):
        assert figures[key] > 0
    assert figures["pack_trials_per_hour"] == pytest.approx(  # its own stacked evaluation, 4 passes a trial
        3600 / (8 * figures["pack_s_per_member_epoch"] + 4 * figures["pack_eval_s_per_member_pass"]))
    assert _evaluations_per_trial(8, 3) == 4  # after epochs 3, 6 and 8, and the test pass
    assert _evaluations_per_trial(10, 5) == 3


def test_stage1_runs_as_a_pack_of_sasrec_members_each_to_its_own_early_stop(small_file: Path) -> None:
    """Stage 1 of four members (patience 1 on one, a longer budget on another, one diverging)
    packed: the same stage-1 epochs, validation metrics and the same trial afterwards (or the same
    stage-1 divergence) as their solo runs."""
    cfgs = [tiny(small_file, stage1_epochs=3, stage2_epochs=1, stage3_epochs=1),
            tiny(small_file, stage1_epochs=8, stage2_epochs=1, stage3_epochs=1, seed=3, lr=3e-3, patience=1,
                 selection="metric", dropout=0.0),
            tiny(small_file, stage1_epochs=2, stage2_epochs=1, stage3_epochs=1, seed=4, weight_decay=1e-3),
            tiny(small_file, stage1_epochs=3, lr=1e4, batch_size=512)]  # blows up in stage 1
    packed = fit_pack(cfgs, stack=len(cfgs))
    stage1_epochs = []
    for cfg, result in zip(cfgs, packed):
        solo = fit(cfg)
        assert (result["status"], result["error"]) == (solo["status"], solo["error"])
        if solo["status"] == "diverged":
            assert result["error"].startswith("stage 1: training loss became") and result["val"] is None
            continue
        assert result["epochs"] == solo["epochs"]
        assert result["stage1_val"] == pytest.approx(solo["stage1_val"], abs=TOL)
        assert result["val"] == pytest.approx(solo["val"], abs=TOL)
        assert result["test"] == pytest.approx(solo["test"], abs=TOL)
        stage1_epochs.append(result["epochs"]["stage1"])
    assert stage1_epochs[0] == 3 and stage1_epochs[2] == 2 and len(set(stage1_epochs)) == 3


def test_on_cpu_a_pack_runs_its_members_as_networks_of_one_in_lock_step(small_file: Path) -> None:
    """The CPU default (`default_stack`): each member its own network, the networks trained epoch by
    epoch together; every member is its solo run to the bit, and `on_epoch` sees the epochs in order
    with each member's record once, when it leaves."""
    cfgs = [tiny(small_file, **MEMBERS[n]) for n in "ABC"]
    seen: list[tuple[int, list[int]]] = []
    packed = fit_pack(cfgs, on_epoch=lambda epoch, done: seen.append((epoch, sorted(done))))
    for cfg, result in zip(cfgs, packed):
        solo = fit(cfg)
        assert (result["val"], result["test"], result["epochs"]) == (solo["val"], solo["test"], solo["epochs"])
    assert [e for e, _ in seen] == list(range(1, len(seen) + 1))
    assert sorted(i for _, done in seen for i in done) == [0, 1, 2]
    last = {i: e for e, done in seen for i in done}
    assert all(last[i] == r["epochs"]["stage2"] + r["epochs"]["stage3"] for i, r in enumerate(packed))


@pytest.mark.parametrize("variant, name", [(0, "B"), (3, "C"), (4, "F"), (6, "B")],
                         ids=lambda v: str(v) if isinstance(v, str) else VARIANT_IDS[v].rsplit("-", 1)[0])
def test_a_pack_of_one_is_fit_to_the_bit(small_file: Path, variant: int, name: str) -> None:
    """With one member every stacked layer computes as the solo layer, so the whole run, stage 1,
    warm-up, PCGrad and early stopping included, is bitwise fit's: what is left between a packed
    member and its solo run is the rounding of batched against single matmuls."""
    cfg = tiny(small_file, **{**MEMBERS[name], **VARIANTS[variant][0]})
    packed_rec, solo_rec = Recorder(), Recorder()
    packed, solo = fit_pack([cfg], [packed_rec])[0], fit(cfg, report=solo_rec)
    assert [{**p, "seconds": 0} for p in packed_rec.payloads] == [{**p, "seconds": 0} for p in solo_rec.payloads]
    assert (packed["val"], packed["test"], packed["epochs"], packed["best_epoch"]) == \
        (solo["val"], solo["test"], solo["epochs"], solo["best_epoch"])
    assert packed["stage1_val"] == solo["stage1_val"]


# --- evaluation of several members in one stacked network ----------------------------------------
EVAL_MEMBERS = [dict(seed=1), dict(seed=2, lambda_uncertainty=0.4, noise_schedule="beta", score_padding_item=False),
                dict(seed=3, lambda_uncertainty=0.05, noise_schedule="cosine", beta_a=0.5)]


def eval_members(small_file: Path, arch: dict, changes: list[dict]) -> tuple[list, Splits]:
    """Members built as a pack builds them (trained weights differ by seed; the stages do not matter)."""
    cfgs = [tiny(small_file, stage_plan="no_pretrain", stage1_epochs=0, **arch, **c) for c in changes]
    device, _, splits = prepare(cfgs[0])
    members = [_start_member(i, cfg, None, splits, device, {}, None) for i, cfg in enumerate(cfgs)]
    return members, splits


@pytest.mark.parametrize("arch, names", VARIANTS, ids=VARIANT_IDS)
def test_the_stacked_sampler_gives_each_members_solo_sample(small_file: Path, arch: dict, names: str) -> None:
    members, splits = eval_members(small_file, arch, EVAL_MEMBERS)
    k = len(members)
    model = stack_models([m.solo for m in members], Layout(rngs=[m.rng for m in members])).eval()
    seq, _ = next(iter(splits.val.batches(32, arch.get("padding_mask") == "query")))
    noises = [torch.randn(model.steps + 1, seq.shape[0], model.cfg.hidden_size) for _ in members]
    stacked = model.sample_next(seq.repeat(k, 1), torch.cat(noises, dim=1),
                                adm=MemberDenoiser(model, members), step=MemberSampler([m.sched for m in members]))
    solos = [m.solo.eval().sample_next(seq, n) for m, n in zip(members, noises)]
    assert not torch.allclose(solos[0], solos[1], atol=1e-3)  # the members do differ
    torch.testing.assert_close(stacked, torch.cat(solos), rtol=0, atol=1e-5)


@pytest.mark.parametrize("split_name", ["val", "test"])
def test_members_evaluated_together_get_their_solo_metrics_and_streams(small_file: Path, split_name: str) -> None:
    members, splits = eval_members(small_file, {}, EVAL_MEMBERS + [dict(seed=4, eval_batch_size=40)])
    split = getattr(splits, split_name)
    states = [{k: v.clone() for k, v in m.solo.state_dict().items()} for m in members]
    before = [m.rng.state.clone() for m in members]
    together = evaluate_members(members, states, split, torch.device("cpu"))
    after = [m.rng.state.clone() for m in members]
    for member, state, start, end, metrics in zip(members, states, before, after, together):
        member.solo.load_state_dict(state)
        member.rng.state = start
        with member.rng.active():
            alone = evaluate(member.solo, split, member.cfg.eval_batch_size, torch.device("cpu"))
        assert metrics == pytest.approx(alone, abs=TOL)
        assert torch.equal(member.rng.state, end)  # the same draws taken from its stream
    assert together[0] != together[1]


# --- draws on the device, from each member's own generator (the default on an accelerator) -------
def drawn_run(small_file: Path, names: str, device_draws: bool) -> tuple[dict, Recorder]:
    cfgs = [tiny(small_file, **MEMBERS[n]) for n in names]
    recs = [Recorder() for _ in cfgs]
    return fit_pack(cfgs, recs, stack=len(cfgs), device_draws=device_draws)[0], recs[0]


def test_with_device_draws_a_member_depends_on_its_own_seed_only(small_file: Path) -> None:
    """A's run packed with B, with C (no stage 1: A's stage-1 pack differs too) and alone: the same
    within rounding, because every draw of A comes from A's generator."""
    alone = drawn_run(small_file, "A", True)
    for mates in ("AB", "AC"):
        assert_same_run(*alone, *drawn_run(small_file, mates, True))


def test_device_draws_are_not_the_cpu_stream(small_file: Path) -> None:
    drawn, drawn_rec = drawn_run(small_file, "AB", True)
    streamed, streamed_rec = drawn_run(small_file, "AB", False)
    assert drawn["status"] == streamed["status"] == "completed"
    losses = [[p["loss"] for p in rec.payloads] for rec in (drawn_rec, streamed_rec)]
    assert losses[0] != pytest.approx(losses[1], abs=1e-4)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_device_drawn_dropout_keeps_each_members_corner_at_its_rate(p: float) -> None:
    rngs = [MemberRNG.start(torch.device("cpu")) for _ in range(3)]
    layout = Layout(rngs=rngs, rows=[40, 25, 40], width=[30, 30, 12])
    drop = PackedDropout([torch.nn.Dropout(p), torch.nn.Dropout(0.5), torch.nn.Dropout(p)], layout).train()
    out = drop(torch.ones(3 * 40, 30, 64)).view(3, 40, 30, 64)
    for m, keep in ((0, 1 - p), (2, 1 - p), (1, 0.5)):
        corner = out[m, :layout.rows[m], :layout.width[m]]
        assert all(v == 0 or v == pytest.approx(1 / keep, rel=1e-6) for v in corner.unique().tolist())
        assert (corner > 0).float().mean().item() == pytest.approx(keep, abs=0.02)
    assert torch.equal(out[1, 25:], torch.ones(15, 30, 64)) and torch.equal(out[2, :, 12:], torch.ones(40, 18, 64))
    again = PackedDropout([torch.nn.Dropout(0.5)] * 3, layout).train()(torch.ones(120, 30, 64)).view(3, 40, 30, 64)
    assert not torch.equal(again[1, :25], out[1, :25])  # the generator moved on: a fresh mask
