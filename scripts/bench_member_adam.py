"""Host time of one pack optimiser step: `adrec.pack.MemberAdam` over K stacked members against
the same K members as networks of one (torch's own adam called per member).

The tensors are tiny (hidden size 16, 5 items) so that the arithmetic is negligible and what is
timed is the per-tensor host work (and, on a GPU, the kernel launches) a step waits for; each
member has its own lr, as in an optimise pack.

    python scripts/bench_member_adam.py --members 16,64 [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from adrec.config import TrialConfig
from adrec.model import ADRec
from adrec.pack import FROM_GRAD, MemberAdam


def median_ms(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeats)) * 1e3


def stacked_params(k: int, device: torch.device) -> list[torch.nn.Parameter]:
    solo = ADRec(TrialConfig(hidden_size=16, heads=2, max_len=10), num_items=5).to(device)
    params = [torch.nn.Parameter(torch.stack([p.detach()] * k)) for p in solo.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def bench(k: int, repeats: int, device: torch.device) -> dict[str, float]:
    params = stacked_params(k, device)
    lrs = [1e-3 * (m + 1) for m in range(k)]
    stacked = MemberAdam(params, k)
    singles = []
    for m in range(k):
        own = [torch.nn.Parameter(p.data[m:m + 1].clone()) for p in params]
        for q, p in zip(own, params):
            q.grad = p.grad[m:m + 1].clone()
        singles.append(MemberAdam(own, 1))
    every = [FROM_GRAD] * len(params)
    return {
        "members": k, "parameters": len(params),
        "stacked_ms": median_ms(lambda: stacked.step([(m, every, lrs[m], 1e-4) for m in range(k)]), repeats,
                                device),
        "networks_of_one_ms": median_ms(lambda: [a.step([(0, every, lrs[m], 1e-4)]) for m, a in enumerate(singles)],
                                        repeats, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", default="16,64", help="comma-separated K values")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"{'K':>4} {'params':>7} {'MemberAdam ms':>14} {'torch adam x K ms':>18}  ({device})")
    for k in (int(v) for v in args.members.split(",")):
        r = bench(k, args.repeats, device)
        print(f"{r['members']:>4} {r['parameters']:>7} {r['stacked_ms']:>14.2f} {r['networks_of_one_ms']:>18.2f}")


if __name__ == "__main__":
    main()
