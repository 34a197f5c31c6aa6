"""adrec.metrics: HR@k and NDCG@k against rankings computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from adrec.metrics import KS, METRIC_NAMES, RankingMetrics, target_ranks

N_ITEMS = 30


def scores_with_ranks(ranks: list[int], n_items: int = N_ITEMS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random scores (B, N+1) where the target of user u has exactly `ranks[u]` items above it."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.empty(len(ranks), n_items + 1)
    targets = torch.empty(len(ranks), dtype=torch.long)
    for u, rank in enumerate(ranks):
        order = torch.randperm(n_items, generator=g) + 1  # item ids from best to worst
        scores[u, order] = torch.linspace(1.0, -1.0, n_items)
        targets[u] = order[rank]
    scores[:, 0] = -torch.inf
    return scores, targets


def test_target_ranks_are_the_constructed_ranks() -> None:
    scores, targets = scores_with_ranks([0, 4, 9, 25, 29])
    assert target_ranks(scores, targets).tolist() == [0, 4, 9, 25, 29]


def test_metrics_by_hand() -> None:
    scores, targets = scores_with_ranks([0, 4, 9, 25])
    m = RankingMetrics()
    m.update(scores, targets)
    result = m.result()
    gain = lambda r: 1 / math.log2(r + 2)  # noqa: E731
    expected = {
        "HR@5": 2 / 4,  # ranks 0 and 4
        "HR@10": 3 / 4,  # + rank 9
        "HR@20": 3 / 4,  # rank 25 is out of every cut-off
        "NDCG@5": (gain(0) + gain(4)) / 4,
        "NDCG@10": (gain(0) + gain(4) + gain(9)) / 4,
        "NDCG@20": (gain(0) + gain(4) + gain(9)) / 4,
    }
    assert list(result) == list(METRIC_NAMES)
    assert result == pytest.approx(expected, abs=1e-12)
    assert result["NDCG@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4, abs=1e-12)


@pytest.mark.parametrize("rank", [0, 4, 5, 9, 10, 19, 20], ids=lambda r: f"rank{r}")
def test_cut_off_boundaries(rank: int) -> None:
    scores, targets = scores_with_ranks([rank])
    m = RankingMetrics()
    m.update(scores, targets)
    result = m.result()
    for k in KS:
        assert result[f"HR@{k}"] == (1.0 if rank < k else 0.0)
        assert result[f"NDCG@{k}"] == pytest.approx(1 / math.log2(rank + 2) if rank < k else 0.0, abs=1e-12)


def test_averaged_over_users_not_over_batches() -> None:
    m = RankingMetrics()
    m.update(*scores_with_ranks([0]))  # a batch of one hit
    m.update(*scores_with_ranks([25, 25, 25], seed=1))  # a batch of three misses
    assert m.users == 4
    assert m.result()["HR@5"] == pytest.approx(0.25)  # per batch it would be (1 + 0) / 2 = 0.5
    assert m.result()["NDCG@20"] == pytest.approx(0.25)


def test_ties_are_resolved_in_the_targets_favour() -> None:
    scores = torch.zeros(2, N_ITEMS + 1)
    scores[:, 0] = -torch.inf
    scores[1, 1:3] = 1.0  # two items strictly above, the rest tied with the target
    targets = torch.tensor([7, 7])
    assert target_ranks(scores, targets).tolist() == [0, 2]
    m = RankingMetrics()
    m.update(scores, targets)
    assert m.result()["HR@5"] == 1.0
    assert m.result()["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 2)


def test_padding_column_never_outranks_the_target() -> None:
    scores, targets = scores_with_ranks([0, 3])
    scores[:, 0] = -torch.inf
    assert target_ranks(scores, targets).tolist() == [0, 3]


def test_nan_target_score_is_a_miss() -> None:
    """A model that emits NaN scores must not get perfect metrics (NaN > x is False for every x)."""
    scores, targets = scores_with_ranks([0, 1])
    scores[:, 1:] = float("nan")
    m = RankingMetrics()
    m.update(scores, targets)
    assert m.result()["HR@20"] == 0.0


def test_empty_evaluation_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"no users were evaluated: the evaluation split is empty"):
        RankingMetrics().result()


def test_custom_cut_offs() -> None:
    m = RankingMetrics(ks=(1, 3))
    m.update(*scores_with_ranks([0, 2, 3]))
    assert m.result() == pytest.approx({"HR@1": 1 / 3, "HR@3": 2 / 3, "NDCG@1": 1 / 3,
                                        "NDCG@3": (1 + 1 / math.log2(4)) / 3})
