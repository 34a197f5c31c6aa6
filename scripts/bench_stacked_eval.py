"""Seconds per member of one validation pass: K members evaluated as one stacked network
(`adrec.pack.evaluate_members`, as a pack evaluates them) against each member alone (the solo
path), in alternating rounds so that both see the same machine load.

The members are freshly initialised ADRec models with seeds seed .. seed+K-1 on the dataset's
default config; evaluation cost does not depend on training.

    python scripts/bench_stacked_eval.py --dataset ml-100k --members 4 --rounds 3
    python scripts/bench_stacked_eval.py --dataset baby --members 4 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from adrec.config import TrialConfig
from adrec.pack import _start_member, evaluate_members
from adrec.train import prepare


def timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.members < 2 or args.rounds < 1:
        parser.error(f"--members must be >= 2 and --rounds >= 1; got {args.members}, {args.rounds}")
    cfg = TrialConfig(dataset=args.dataset, device=args.device)
    device, _, splits = prepare(cfg)
    members = [_start_member(i, cfg.replace(seed=cfg.seed + i, stage_plan="no_pretrain"), None, splits, device, {},
                             None) for i in range(args.members)]
    states = [{name: value.clone() for name, value in m.solo.state_dict().items()} for m in members]
    k = len(members)
    evaluate_members(members[:2], states[:2], splits.val, device)  # warm-up
    stacked, alone = [], []
    for r in range(args.rounds):
        stacked.append(timed(lambda: evaluate_members(members, states, splits.val, device), device) / k)
        alone.append(timed(lambda: [evaluate_members([m], [s], splits.val, device) for m, s in zip(members, states)],
                           device) / k)
        print(f"round {r + 1}: stacked {stacked[-1]:.3f} s per member, alone {alone[-1]:.3f} s", flush=True)
    ratio = statistics.median(stacked) / statistics.median(alone)
    print(f"{args.dataset}, {k} members on {device}: median {statistics.median(stacked):.3f} s stacked against "
          f"{statistics.median(alone):.3f} s alone per member and pass ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
