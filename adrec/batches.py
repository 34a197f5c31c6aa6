"""Padded tensors of the training and evaluation sequences, and the batches cut from them.

Everything is left-padded to `max_len` once, up front. A batch is then trimmed to its longest
sequence, and training batches are drawn from length buckets (shuffle, sort within chunks of a few
batches, shuffle the batches), so a dataset where 88% of the 50 slots are padding does not pay for
them. The epoch's order comes from a generator seeded by (seed, epoch), so a resumed run sees the
same batches as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

BUCKET_BATCHES = 16  # batches per sorting chunk: large enough to group lengths, small enough to mix


def left_pad(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """(U, length) long tensor, each row's last `length` items right-aligned, zeros in front."""
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        row = list(row)[-length:]
        if row:
            out[i, length - len(row):] = torch.as_tensor(row, dtype=torch.long)
    return out


def trim(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns that are padding in every row of the first tensor."""
    valid_cols = (tensors[0] > 0).any(0)
    first = int(valid_cols.nonzero()[0]) if valid_cols.any() else tensors[0].shape[1] - 1
    return tuple(t[:, first:] for t in tensors)


@dataclass
class TrainSequences:
    """Inputs and next-item targets for teacher-forced training: tgt[:, i] follows seq[:, i]."""

    seq: torch.Tensor  # (U, L)
    tgt: torch.Tensor  # (U, L)

    @classmethod
    def build(cls, histories: Sequence[Sequence[int]], max_len: int) -> "TrainSequences":
        usable = [h for h in histories if len(h) >= 2]  # one item has no next item to learn
        return cls(seq=left_pad([h[:-1] for h in usable], max_len),
                   tgt=left_pad([h[1:] for h in usable], max_len))

    def __len__(self) -> int:
        return self.seq.shape[0]

    def batches(self, batch_size: int, seed: int, epoch: int, bucketed: bool = True
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self), generator=g)
        if bucketed:
            lengths = (self.seq > 0).sum(1)
            chunks = order.split(batch_size * BUCKET_BATCHES)
            order = torch.cat([c[lengths[c].argsort(stable=True)] for c in chunks])
        groups = list(order.split(batch_size))
        if bucketed:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=g)]
        for idx in groups:
            yield trim(self.seq[idx], self.tgt[idx])


@dataclass
class EvalSequences:
    """Histories and the single held-out item per user, ordered by length for tight batches."""

    seq: torch.Tensor  # (U, L)
    target: torch.Tensor  # (U,)

    @classmethod
    def build(cls, histories: Sequence[Sequence[int]], targets: Sequence[int], max_len: int) -> "EvalSequences":
        seq = left_pad(histories, max_len)
        order = (seq > 0).sum(1).argsort(stable=True)
        return cls(seq=seq[order], target=torch.as_tensor(list(targets), dtype=torch.long)[order])

    def __len__(self) -> int:
        return self.seq.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            (seq,) = trim(self.seq[start:start + batch_size])
            yield seq, self.target[start:start + batch_size]
