"""adrec.batches: evaluation batches cut by length, and the shared grouping rule."""
from __future__ import annotations

import torch

from adrec.batches import EvalSequences, length_groups


def test_length_groups_respect_rows_tokens_and_fill() -> None:
    lengths = [50, 50, 40, 30, 26, 25, 12, 12, 12, 12, 3]
    groups = length_groups(lengths, max_rows=3, max_tokens=120, fill=0.5)
    # 50s: token cap (2 x 50 <= 120); 25 alone: 12 < 0.5 x 25; 12s: row cap; 3 < 0.5 x 12
    assert [lengths[g] for g in groups] == [[50, 50], [40, 30, 26], [25], [12, 12, 12], [12], [3]]


def test_eval_batches_hold_every_user_once_with_little_padding() -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = [int(x) for x in torch.randint(1, 51, (500,), generator=gen)]
    histories = [[1 + (u + j) % 300 for j in range(n)] for u, n in enumerate(lengths)]
    targets = list(range(1, 501))
    split = EvalSequences.build(histories, targets, max_len=50)
    seen = {}
    for seq, target in split.batches(64):
        assert seq.shape[0] <= 64
        assert (seq > 0).sum() >= EvalSequences.FILL * seq.numel()
        assert (seq[:, -1] > 0).all()  # left-padded: the newest item is always last
        for row, t in zip(seq, target.tolist()):
            seen[t] = [int(x) for x in row[row > 0]]
    assert seen == {t: h for t, h in zip(targets, histories)}
