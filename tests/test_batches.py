"""adrec.batches: training batches packed into rows, evaluation batches cut by length."""
from __future__ import annotations

import torch

from adrec.batches import EvalSequences, TrainSequences, best_fit, left_pad, length_groups, pack


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


def test_full_width_batches_keep_every_padding_column() -> None:
    """Query-masked attention sees the padding, so its batches stay padded to max_len (as the
    authors'); the default trims them to their longest sequence. Same users either way."""
    histories = [[1 + (u + j) % 50 for j in range(2 + u % 7)] for u in range(40)]
    train = TrainSequences.build(histories, max_len=12)
    trimmed = list(train.batches(16, seed=0, epoch=1))
    full = list(train.batches(16, seed=0, epoch=1, full_width=True))
    assert all(s.shape[1] == 12 for s, _ in full) and any(s.shape[1] < 12 for s, _ in trimmed)
    for (s, t), (fs, ft) in zip(trimmed, full):
        assert torch.equal(fs[:, -s.shape[1]:], s) and torch.equal(ft[:, -t.shape[1]:], t)
        assert not fs[:, :-s.shape[1]].any()
    split = EvalSequences.build(histories, list(range(1, 41)), max_len=12)
    pairs = zip(split.batches(16), split.batches(16, full_width=True))
    assert all(fs.shape[1] == 12 and torch.equal(fs[:, -s.shape[1]:], s) for (s, _), (fs, _) in pairs)


def test_best_fit_decreasing_puts_each_length_where_it_fits_tightest() -> None:
    # Longest first, each into the row with the least room that fits it:
    # 5 -> new row 0; 4 -> new row 1 (room 1); 3 -> new row 2 (room 2); 2 -> row 2; 1 -> row 1.
    assert best_fit([3, 5, 2, 4, 1], width=5) == [2, 0, 2, 1, 1]
    # 6 -> row 0 (room 4); 5 -> row 1 (room 5); 4 -> row 0 (tightest fit, room 0); 3 -> row 1.
    assert best_fit([6, 5, 4, 3], width=10) == [0, 1, 0, 1]
    rows = best_fit([7, 3, 3, 3, 1, 1, 1, 1], width=10)
    assert max(rows) == 1  # 20 slots of items in two rows of 10


def test_pack_holds_every_sequence_once_in_order_with_little_padding() -> None:
    """Baby-like lengths (many short, few long): every sequence lands in one row, contiguous, in
    its own order and with its own targets, numbered within the row; rows are as wide as the
    longest sequence and nearly full."""
    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 9, (300,), generator=gen)] + [50] * 5 + [20] * 20
    rows = [[1 + (7 * r + j) % 97 for j in range(n)] for r, n in enumerate(lengths)]
    seq, tgt = left_pad(rows, 50), left_pad([[x + 1 for x in r] for r in rows], 50)
    packed = pack(seq, tgt)
    assert packed.seq.shape[1] == 50 and packed.n_sequences == len(rows)
    assert torch.equal(packed.seq > 0, packed.segment > 0) and torch.equal(packed.seq > 0, packed.tgt > 0)
    got = []
    for s, t, g in zip(packed.seq, packed.tgt, packed.segment):
        ids = g[g > 0]
        assert ids.tolist() == sorted(ids.tolist()) and ids.unique().tolist() == list(range(1, int(ids.max()) + 1))
        for k in ids.unique():
            items = s[g == k].tolist()
            assert t[g == k].tolist() == [x + 1 for x in items]
            got.append(tuple(items))
    assert sorted(got) == sorted(tuple(r) for r in rows)
    assert (packed.seq > 0).sum() >= 0.95 * packed.seq.numel()  # vs ~15% filled when left-padded
    parts = packed.split(max_tokens=1000)
    assert all(p.seq.numel() <= 1000 for p in parts)
    assert sum(p.n_sequences for p in parts) == len(rows)
    assert torch.equal(torch.cat([p.segment for p in parts]), packed.segment)
