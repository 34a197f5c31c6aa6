"""`python -m adrec bench`: time the trainer's own epoch and evaluation code on a real dataset.

It calls the same `train_epoch` and `evaluate` that `fit` uses, after untimed warm-up epochs, and
reports seconds per training epoch for each stage, seconds per full validation pass, peak RSS of
the process and its children, peak GPU memory and the GFLOP/s reached (FLOPs counted by
torch.utils.flop_counter over one extra epoch, divided by the timed seconds).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from adrec.config import TrialConfig
from adrec.model import ADRec, SASRec
from adrec.train import Splits, environment, evaluate, make_optimizer, prepare, seed_everything, train_epoch


def peak_rss_mb() -> float:
    """Peak resident set size of this process and of its waited-for children, in MiB."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return max(own, children)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_epochs(cfg: TrialConfig, model, splits: Splits, device, epochs: int, warmup: int, first_epoch: int
                 ) -> list[float]:
    optimizer, _ = make_optimizer(cfg, model)
    for e in range(warmup):
        train_epoch(cfg, model, optimizer, splits.train, first_epoch + e, device)
    times = []
    for e in range(epochs):
        _sync(device)
        start = time.perf_counter()
        train_epoch(cfg, model, optimizer, splits.train, first_epoch + warmup + e, device)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _count_flops(cfg: TrialConfig, model, splits: Splits, device, epoch: int) -> int:
    """FLOPs of one training epoch (counted, not timed: the counter slows the epoch down)."""
    optimizer, _ = make_optimizer(cfg, model)
    with FlopCounterMode(display=False) as counter:
        train_epoch(cfg, model, optimizer, splits.train, epoch, device)
    return counter.get_total_flops()


def _time_eval(cfg: TrialConfig, model, splits: Splits, device, passes: int) -> tuple[list[float], dict[str, float]]:
    full_width = cfg.padding_mask == "query"  # as fit evaluates
    evaluate(model, splits.val, cfg.eval_batch_size, device, full_width)  # warm-up
    times, metrics = [], {}
    for _ in range(passes):
        _sync(device)
        start = time.perf_counter()
        metrics = evaluate(model, splits.val, cfg.eval_batch_size, device, full_width)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, metrics


def run_bench(cfg: TrialConfig, epochs: int = 2, warmup: int = 1, eval_passes: int = 2) -> dict[str, Any]:
    """Seconds per epoch (stages 1-3) and per validation pass, memory and GFLOP/s, as a dict."""
    if epochs < 1 or warmup < 0:
        raise ValueError(f"bench needs epochs >= 1 and warmup >= 0; got epochs={epochs}, warmup={warmup}")
    device, data, splits = prepare(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(cfg.seed)
    figures: dict[str, Any] = {"dataset": data.name, "users": len(data.train), "items": data.num_items,
                               "device": str(device), "env": environment(device)}

    sasrec = SASRec(cfg, splits.num_items).to(device)
    t1 = _time_epochs(cfg, sasrec, splits, device, epochs, warmup, first_epoch=1)

    model = ADRec(cfg, splits.num_items).to(device)
    with torch.no_grad():
        model.item_emb.weight.copy_(sasrec.item_emb.weight)
    model.item_emb.weight.requires_grad_(False)
    t2 = _time_epochs(cfg, model, splits, device, epochs, warmup, first_epoch=1001)
    model.item_emb.weight.requires_grad_(True)
    t3 = _time_epochs(cfg, model, splits, device, epochs, warmup, first_epoch=2001)
    te, metrics = _time_eval(cfg, model, splits, device, eval_passes)
    peak_rss = peak_rss_mb()  # before counting FLOPs: the counter's bookkeeping is not the trainer's
    flops = _count_flops(cfg, model, splits, device, epoch=3001)

    stage3 = statistics.median(t3)
    figures.update({
        "stage1_s_per_epoch": statistics.median(t1),
        "stage2_s_per_epoch": statistics.median(t2),
        "train_s_per_epoch": stage3,
        "eval_s_per_pass": statistics.median(te),
        "train_gflops_per_s": flops / stage3 / 1e9,
        "peak_rss_mb": peak_rss,
        "peak_gpu_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0,
        "val_metrics_after_bench": metrics,
        "config": cfg.to_dict(),
    })
    return figures


# ---------------------------------------------------------------------------------------------
# Packs: K members trained as one model against the same K configs trained one after another
# ---------------------------------------------------------------------------------------------
def _evaluations_per_trial(epochs: int, eval_every: int) -> int:
    """Validation passes of an `epochs`-epoch trial (every `eval_every` epochs and at the last one)
    plus its one test pass."""
    return len({e for e in range(1, epochs + 1) if e % eval_every == 0} | {epochs}) + 1


def _time_pack_eval(packs: list, splits: Splits, device: torch.device) -> float:
    """Seconds of one validation pass of every member of the packs, as a pack evaluates them
    (stacked, `adrec.pack.evaluate_members`), after one untimed pass."""
    from adrec.pack import evaluate_members, member_state

    def one_pass() -> None:
        for pack in packs:
            states = [member_state(pack.model, m) for m in range(len(pack.members))]
            evaluate_members(pack.members, states, splits.val, device)

    one_pass()
    _sync(device)
    start = time.perf_counter()
    one_pass()
    _sync(device)
    return time.perf_counter() - start


def run_pack_bench(cfg: TrialConfig, k: int, epochs: int = 1, trial_epochs: int = 8, stack: int | None = None
                   ) -> dict[str, Any]:
    """Stage-3 seconds per epoch of K members (seeds seed, seed+1, ...) in one pack and of the same
    K configs trained one after another, measured in alternating rounds so that both see the same
    machine load; per-member seconds per epoch and trials per hour for `trial_epochs`-epoch trials
    (validation and test passes included, timed once: the pack's members in one stacked pass as
    `fit_pack` evaluates them, the sequential runs' as `fit` does;
    stage 1 is left out, it is shared through the stage-1 cache). The pack is laid out as `fit_pack`
    lays it out: networks of `stack` members (`adrec.pack.default_stack` when None)."""
    from adrec.pack import _start_member, make_packs

    if k < 1 or epochs < 1:
        raise ValueError(f"bench --pack needs K >= 1 and epochs >= 1; got K={k}, epochs={epochs}")
    device, data, splits = prepare(cfg)
    cfgs = [cfg.replace(seed=cfg.seed + i, stage_plan="no_pretrain") for i in range(k)]
    env = environment(device)
    packs = make_packs([_start_member(i, c, None, splits, device, env, None) for i, c in enumerate(cfgs)],
                       splits, device, stack)
    solos = []
    for c in cfgs:
        seed_everything(c.seed)
        model = ADRec(c, splits.num_items).to(device)
        solos.append((c, model, make_optimizer(c, model)[0]))
    pack_times, solo_times = [], []
    for epoch in range(1, epochs + 1):
        _sync(device)
        start = time.perf_counter()
        for pack in packs:
            pack._epoch(epoch)
        _sync(device)
        pack_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for c, model, optimizer in solos:
            train_epoch(c, model, optimizer, splits.train, epoch + 3000, device, epoch)
        _sync(device)
        solo_times.append(time.perf_counter() - start)
    eval_times, _ = _time_eval(cfg, solos[0][1], splits, device, passes=1)
    pack_eval = _time_pack_eval(packs, splits, device) / k
    pack_member, solo_member = statistics.median(pack_times) / k, statistics.median(solo_times) / k
    evals = _evaluations_per_trial(trial_epochs, cfg.eval_every)

    def per_hour(s_per_epoch: float, s_per_eval: float) -> float:
        return 3600.0 / (trial_epochs * s_per_epoch + evals * s_per_eval)

    return {
        "dataset": data.name, "users": len(data.train), "items": data.num_items, "device": str(device),
        "pack_size": k, "stack": len(packs[0].members), "timed_epochs": epochs, "trial_epochs": trial_epochs,
        "pack_s_per_epoch": pack_times, "sequential_s_per_epoch": solo_times,
        "pack_s_per_member_epoch": pack_member, "sequential_s_per_member_epoch": solo_member,
        "pack_over_sequential": pack_member / solo_member,
        "eval_s_per_pass": statistics.median(eval_times), "pack_eval_s_per_member_pass": pack_eval,
        "pack_trials_per_hour": per_hour(pack_member, pack_eval),
        "sequential_trials_per_hour": per_hour(solo_member, statistics.median(eval_times)),
        "peak_rss_mb": peak_rss_mb(), "env": env, "config": cfg.to_dict(),
    }
