"""How many trials to pack on one device: measured, not guessed.

`choose_pack_size(cfg)` times a few stage-3 training steps of packs of 1, 2, 4, ... copies of the
config (seeds seed, seed+1, ...) on the config's device and keeps doubling while a member's step
gets cheaper by at least `min_gain` and the next size's memory (the measured peak, doubled) stays
within the budget. The choice is the largest size reached: on a GPU, where a small trial's step is
launch-bound, that is tens of members; on a CPU, where a pack's step costs its members' FLOPs,
doubling stops early (a pack of 2 is about as fast per member as 1). Each size runs the real
`Pack` step (`adrec.pack.Pack._step`) on the dataset's own batches, so the figures are those of
the sweep's trials.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch

from adrec.config import TrialConfig
from adrec.train import Splits, environment, prepare, resolve_device

CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Probe:
    """One pack size's measurement."""

    pack_size: int
    s_per_step: float  # median seconds of one step of the whole pack
    s_per_member_step: float
    peak_mb: float  # peak device memory of the step (GPU; 0 on CPU, where the host's memory is the limit)


def measure(cfg: TrialConfig, k: int, splits: Splits, device: torch.device, steps: int = 4, warmup: int = 2) -> Probe:
    """Median seconds of `steps` stage-3 steps of a pack of `k` copies of `cfg`, after `warmup` steps."""
    from adrec.pack import _start_member, make_packs

    cfgs = [cfg.replace(seed=cfg.seed + i, stage_plan="no_pretrain") for i in range(k)]
    env = environment(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    packs = make_packs([_start_member(i, c, None, splits, device, env, None) for i, c in enumerate(cfgs)], splits,
                       device)  # laid out as fit_pack lays it out on this device
    for pack in packs:
        pack.model.train()
    full_width = cfg.padding_mask == "query"
    epoch = cfg.stage_epochs()[1] + 1  # a stage-3 epoch: every parameter trains
    streams = [_endless(splits, c, epoch, full_width) for c in cfgs]
    times = []
    for i in range(warmup + steps):
        batches = [next(s) for s in streams]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for pack in packs:
            pack._step(batches[pack.members[0].index:pack.members[-1].index + 1], epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    del packs
    return Probe(pack_size=k, s_per_step=step, s_per_member_step=step / k, peak_mb=peak)


def _endless(splits: Splits, cfg: TrialConfig, epoch: int, full_width: bool) -> Iterator[Any]:
    """The member's training batches, epoch after epoch (a small split has fewer batches than steps)."""
    return itertools.chain.from_iterable(
        splits.train.batches(cfg.batch_size, cfg.seed, e, cfg.bucketed_batches, full_width)
        for e in itertools.count(epoch + 3000))


def memory_budget_mb(device: torch.device, share: float = 1.0, fraction: float = 0.8) -> float:
    """What one Ray trial may use on `device`: `fraction` of the GPU's memory times its `share` of
    the GPU (`--gpus-per-trial`); unlimited on CPU."""
    if device.type != "cuda":
        return float("inf")
    return torch.cuda.get_device_properties(device).total_memory / 2**20 * fraction * min(share, 1.0)


def choose_pack_size(cfg: TrialConfig, candidates: Sequence[int] = CANDIDATES, *, min_gain: float = 0.10,
                     steps: int = 4, gpu_share: float = 1.0, measure_cpu: bool = True) -> dict[str, Any]:
    """Measure packs of growing size (see the module docstring); returns {"pack_size", "probes",
    "budget_mb", "device", "dataset", "why"} with the choice and every measurement. With
    `measure_cpu=False` a run that gets no GPU measures nothing and gets 1."""
    sizes = sorted(set(int(k) for k in candidates))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"pack size candidates must be >= 1; got {list(candidates)}")
    if resolve_device(cfg.device).type == "cpu" and not measure_cpu:
        return {"pack_size": 1, "why": "the trial sees no GPU (on CPU a pack is not faster per member)",
                "budget_mb": float("inf"), "device": "cpu", "dataset": cfg.dataset, "probes": []}
    device, data, splits = prepare(cfg)
    budget = memory_budget_mb(device, gpu_share)
    probes: list[Probe] = []
    chosen, why = sizes[0], f"the largest candidate ({sizes[-1]})"
    for k in sizes:
        if probes and probes[-1].peak_mb * k / probes[-1].pack_size > budget:
            why = f"{k} members would need ~{probes[-1].peak_mb * k / probes[-1].pack_size:.0f} MB of {budget:.0f} MB"
            break
        probes.append(measure(cfg, k, splits, device, steps=steps))
        if len(probes) > 1 and probes[-1].s_per_member_step > (1 - min_gain) * probes[-2].s_per_member_step:
            why = (f"{k} members save less than {min_gain:.0%} per member over {probes[-2].pack_size} "
                   f"({probes[-1].s_per_member_step * 1e3:.1f} vs {probes[-2].s_per_member_step * 1e3:.1f} ms per "
                   "member step)")
            break
        chosen = k
    return {"pack_size": chosen, "why": why, "budget_mb": budget, "device": str(device), "dataset": data.name,
            "probes": [asdict(p) for p in probes]}
