"""Padded tensors of the training and evaluation sequences, and the batches cut from them.

Everything is left-padded to `max_len` once, up front, and a batch is trimmed to its longest
sequence. Training batches are plain shuffles of the users, as in the authors' code; the trainer
then packs each batch's sequences end to end into rows (`pack`: a row holds several short
sequences, and each attends only to itself), so a dataset where 88% of the 50 slots are padding
does not pay for them while each step still sees a random batch. `bucketed=True` instead draws
batches from length buckets (shuffle, sort within chunks of a few batches, shuffle the batches):
on a small dataset the same users then share a batch every epoch and short sequences weigh more
in the batch mean. The epoch's order comes from a generator seeded by (seed, epoch), so a resumed
run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import bisect
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


def length_groups(lengths: Sequence[int], max_rows: int, max_tokens: int, fill: float) -> list[slice]:
    """Cut rows sorted by descending length into consecutive groups of at most `max_rows` rows and
    `max_tokens` positions (rows x the group's first, longest length), starting a new group at the
    first row shorter than `fill` x that length, so padding stays under (1 - fill) of a group."""
    groups, start = [], 0
    while start < len(lengths):
        longest = max(int(lengths[start]), 1)
        cap = max(1, min(max_rows, max_tokens // longest))
        end = start + 1
        while end < len(lengths) and end - start < cap and lengths[end] >= fill * longest:
            end += 1
        groups.append(slice(start, end))
        start = end
    return groups


@dataclass
class Packed:
    """Sequences laid end to end in rows: `segment` numbers them 1, 2, ... within each row (0 marks
    padding), each sequence's items in order with its newest last, as in a left-padded row."""

    seq: torch.Tensor  # (R, W)
    tgt: torch.Tensor  # (R, W)
    segment: torch.Tensor  # (R, W)

    @property
    def n_sequences(self) -> int:
        return int(self.segment.amax(1).sum())

    def split(self, max_tokens: int) -> list["Packed"]:
        """Consecutive row groups of at most `max_tokens` positions (one row at least)."""
        rows = max(1, max_tokens // self.seq.shape[1])
        return [Packed(s, t, g) for s, t, g in zip(self.seq.split(rows), self.tgt.split(rows), self.segment.split(rows))]


def best_fit(lengths: Sequence[int], width: int) -> list[int]:
    """Row of each length under best-fit decreasing packing into rows of `width` slots: longest
    first, each into the row with the least room that still fits it (a sorted list of rooms)."""
    rooms: list[tuple[int, int]] = []  # (room left, row), ascending; full rows leave the list
    row_of, n_rows = [0] * len(lengths), 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(rooms, (lengths[i], -1))
        if k < len(rooms):
            room, row = rooms.pop(k)
        else:
            room, row, n_rows = width, n_rows, n_rows + 1
        if room > lengths[i]:
            bisect.insort(rooms, (room - lengths[i], row))
        row_of[i] = row
    return row_of


def pack(seq: torch.Tensor, tgt: torch.Tensor) -> Packed:
    """Pack the left-padded rows of a batch (inputs and targets share their padding) end to end
    into rows as wide as the longest sequence, best-fit decreasing."""
    lengths = (seq > 0).sum(1).tolist()
    width = max(lengths + [1])
    row_of = best_fit(lengths, width)
    used, count = [0] * (max(row_of) + 1), [0] * (max(row_of) + 1)
    start, segment = [], []
    for n, r in zip(lengths, row_of):  # within a row, sequences keep their batch order
        start.append(used[r])
        used[r] += n
        count[r] += n > 0
        segment.append(count[r])
    # One index per token: its column in the left-padded batch and its place in the packed rows.
    n = torch.tensor(lengths)
    tok = torch.repeat_interleave(torch.arange(len(lengths)), n)
    k = torch.arange(len(tok)) - torch.repeat_interleave(n.cumsum(0) - n, n)
    src = (tok, seq.shape[1] - n[tok] + k)
    dst = (torch.tensor(row_of)[tok], torch.tensor(start)[tok] + k)
    out = torch.zeros(3, len(used), width, dtype=torch.long)
    out[0][dst], out[1][dst], out[2][dst] = seq[src], tgt[src], torch.tensor(segment)[tok]
    return Packed(*out)


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

    def batches(self, batch_size: int, seed: int, epoch: int, bucketed: bool = False, full_width: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (seq, tgt), trimmed to their longest sequence unless `full_width` (padded to
        max_len, as the authors' batches: query-masked attention sees every padding column)."""
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
            yield (self.seq[idx], self.tgt[idx]) if full_width else trim(self.seq[idx], self.tgt[idx])


@dataclass
class EvalSequences:
    """Histories and the single held-out item per user, longest first, for tight batches."""

    seq: torch.Tensor  # (U, L)
    target: torch.Tensor  # (U,)

    FILL = 0.75  # an evaluation batch is at most a quarter padding

    @classmethod
    def build(cls, histories: Sequence[Sequence[int]], targets: Sequence[int], max_len: int) -> "EvalSequences":
        seq = left_pad(histories, max_len)
        order = (seq > 0).sum(1).argsort(descending=True, stable=True)
        return cls(seq=seq[order], target=torch.as_tensor(list(targets), dtype=torch.long)[order])

    def __len__(self) -> int:
        return self.seq.shape[0]

    def batches(self, batch_size: int, full_width: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """At most `batch_size` users each, cut where lengths drop, trimmed to their longest (or
        kept at max_len: `full_width`)."""
        lengths = (self.seq > 0).sum(1).tolist()
        for part in length_groups(lengths, batch_size, 2**62, self.FILL):
            seq = self.seq[part] if full_width else trim(self.seq[part])[0]
            yield seq, self.target[part]
