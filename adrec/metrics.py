"""Full-ranking top-k metrics, computed on the device and averaged over users."""
from __future__ import annotations

import torch

from adrec.config import METRICS

METRIC_NAMES = METRICS  # the one list of metric names lives in adrec.config (a Literal field's choices)
KS = tuple(sorted({int(m.split("@")[1]) for m in METRICS}))


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items: how many items score strictly higher.

    scores (B, N+1), targets (B,) -> (B,) long. Ties are resolved in the target's favour, the
    usual full-ranking convention (and what topk-based code gives for distinct scores).
    """
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
    ranks = (scores > target_scores).sum(1)
    # A NaN target score compares False with everything; it must count as a miss, not rank 0.
    return torch.where(target_scores.squeeze(1).isnan(), scores.shape[1], ranks)


class RankingMetrics:
    """Accumulates per-user HR@k and NDCG@k sums on the scores' device (read back once, by
    `result()`, so a GPU evaluation does not wait on every batch); `result()` gives means over users."""

    def __init__(self, ks: tuple[int, ...] = KS):
        self.ks = ks
        self.names = [f"{m}@{k}" for m in ("HR", "NDCG") for k in ks]
        self.totals: torch.Tensor | None = None  # float64, in the order of `names`
        self.users = 0

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        ranks = target_ranks(scores, targets)
        gains = 1.0 / torch.log2(ranks.double() + 2.0)
        hits = [ranks < k for k in self.ks]
        batch = torch.stack([hit.sum().double() for hit in hits] + [(gains * hit).sum() for hit in hits])
        self.totals = batch if self.totals is None else self.totals + batch
        self.users += int(targets.shape[0])

    def result(self) -> dict[str, float]:
        if self.users == 0 or self.totals is None:
            raise ValueError("no users were evaluated: the evaluation split is empty")
        return {name: total / self.users for name, total in zip(self.names, self.totals.tolist())}
