"""ADRec (KDD 2025) and the SASRec-style encoder it pre-trains with, read top to bottom.

Shapes: B batch, L positions (left-padded, newest item last), D hidden, N items (+1 for padding 0).
A training row may hold several sequences end to end (batches.pack): `segment` (B, L) numbers
them within the row (0 = padding), and attention and positions never cross a segment's edge.

ADRec = CAM, a causal Transformer over the history, + ADM, a causal denoiser over the targets:
  c   = CAM(LN(drop(E[seq]) + pos))                         # (B, L, D) history encoding
  x_t = sqrt(ᾱ_t) E[tgt] + sqrt(1 - ᾱ_t) ε,  t ~ U[0, T) per token  # independent noise per token
  x̂_0 = ADM(aggregate(c, x_t, t))                          # predict x_0
  loss = CE(x̂_0 E^T, tgt) + w · MSE(x̂_0, E[tgt])            # both on valid positions
Inference keeps the history at t = 0 and denoises only the last position from T-1 to 0. Because
both Transformers are causal, the history's keys and values never change across the T steps:
`score_all` computes them once and runs only the last token through the denoiser per step.

With `padding_mask='query'` (the authors' masking) rows are single sequences left-padded to L:
every query attends to all keys up to itself, padding included, and a padded query row attends
uniformly (its scores are all filled with -1e9, as in the authors' attention).

Both verbs every recommender here exposes: `loss(seq, tgt)` and `score_all(seq)` -> (B, N+1).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adrec.config import TrialConfig
from adrec.losses import linear_cross_entropy
from adrec.schedule import NoiseSchedule, ScheduleTensors

LN_EPS = 1e-12  # the authors' TF-style LayerNorm epsilon
PADDED_ROW_SCORE = -1e9  # the authors' fill for padded query rows (padding_mask='query')


# ---------------------------------------------------------------------------------------------
# Segments: which sequence each slot holds, its position (counted back from that sequence's
# newest item), the attention mask, and means per sequence
# ---------------------------------------------------------------------------------------------
def segments(seq: torch.Tensor, segment: torch.Tensor | None = None) -> torch.Tensor:
    """`segment` when the rows are packed, else one left-padded sequence per row: `seq > 0`."""
    return (seq > 0).long() if segment is None else segment


def segment_layout(segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask (B, 1, L, L) bool, True = may attend, and positions (B, L) for rows of
    sequences numbered by `segment` (B, L) (0 = padding; a left-padded row is `seq > 0`).

    A query sees the keys of its own sequence up to itself. A padded query sees only itself, so its
    softmax row is never empty (its output is ignored). A token's position is the number of tokens
    after it in its sequence: the newest item is position 0.
    """
    l = segment.shape[1]
    idx = torch.arange(l, device=segment.device)
    later = idx.unsqueeze(0) > idx.unsqueeze(1)  # (Lq, Lk): key after query
    same = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(1) > 0)  # (B, Lq, Lk)
    mask = (same & ~later) | torch.eye(l, dtype=torch.bool, device=segment.device)
    return mask.unsqueeze(1), (same & later).sum(-1)


def query_masked_layout(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' masking for one left-padded sequence per row: a causal mask (B, 1, L, L) for
    every row, padded keys included, the padded query rows (B, 1, L, 1) whose scores are all
    filled, and positions as in `segment_layout`."""
    valid = seq > 0
    l = seq.shape[1]
    causal = torch.ones(l, l, dtype=torch.bool, device=seq.device).tril()
    _, pos = segment_layout(valid.long())
    return causal.expand(seq.shape[0], 1, l, l), (~valid)[:, None, :, None], pos


def attention_context(seq: torch.Tensor, segment: torch.Tensor | None, query_masked: bool) -> Context:
    """The attention context of a batch: packed or key-masked rows (`segment_layout`), or the
    authors' query-row masking of left-padded rows (`query_masked_layout`)."""
    if not query_masked:
        mask, pos = segment_layout(segments(seq, segment))
        return Context(mask=mask, pos_q=pos, memory_mask=mask)
    if segment is not None and bool((segment > 1).any()):
        raise ValueError("padding_mask='query' needs one left-padded sequence per row; got packed rows")
    mask, padded_rows, pos = query_masked_layout(seq)
    return Context(mask=mask, pos_q=pos, memory_mask=mask, padded_rows=padded_rows)


def sinusoid(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] features of `values` (any shape) -> (*values.shape, dim), as in the authors' code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    args = values.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AbsolutePositions(nn.Module):
    """Learned or sinusoidal embeddings added to the inputs; `none`/`rotary` add nothing."""

    def __init__(self, kind: str, max_len: int, dim: int):
        super().__init__()
        self.kind, self.dim = kind, dim
        self.table = nn.Embedding(max_len, dim) if kind == "learned" else None

    def forward(self, pos: torch.Tensor) -> torch.Tensor | None:  # pos (B, L) -> (B, L, D) or None
        if self.kind == "learned":
            return self.table(pos)
        if self.kind == "sinusoidal":
            return sinusoid(pos, self.dim)
        return None


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) on the head dimension of q and k."""

    def __init__(self, head_dim: int):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x (B, H, L, dh), pos (B, L)
        angles = (pos.float().unsqueeze(-1) * self.inv_freq).unsqueeze(1)  # (B, 1, L, dh/2)
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def sequence_mean(values: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean of `values` (B, L) over its tokens."""
    counts = torch.zeros(segment.shape[0], segment.shape[1] + 1, device=segment.device)
    counts.scatter_add_(1, segment, torch.ones_like(values))  # (B, 1 + L): tokens per segment id
    weights = (segment > 0) / counts.gather(1, segment)
    return (values * weights).sum() / (counts[:, 1:] > 0).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Dropout with a cheaper mask on CPU
# ---------------------------------------------------------------------------------------------
def keep_scale(shape: torch.Size, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float mask of 1 / (1 - p) (kept, probability 1 - p) or 0, from 16 random bits per element
    (p is exact to 1/65536). On CPU, torch's per-element bernoulli_ costs several times more than
    the mask is worth; the bits come from numpy's SFC64, seeded from torch's generator so that
    torch.manual_seed still fixes every mask. `out`: a contiguous float tensor of `shape` to fill."""
    n = math.prod(shape)
    seed = int(torch.randint(2**62, (1,)))
    bits = torch.from_numpy(np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16))
    keep = bits[:n].view(shape) >= round(-32768 + p * 65536)
    if out is None:
        return torch.where(keep, 1.0 / (1.0 - p), 0.0)
    return torch.where(keep, torch.tensor(1.0 / (1.0 - p), dtype=out.dtype), torch.tensor(0.0, dtype=out.dtype),
                       out=out)


class Dropout(nn.Dropout):
    """nn.Dropout, with the cheaper mask above when training on the CPU (same distribution).
    Multiplying by a mask that needs no gradient saves only the mask for the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * keep_scale(x.shape, self.p)


# ---------------------------------------------------------------------------------------------
# Attention and blocks
# ---------------------------------------------------------------------------------------------
@dataclass
class KV:
    """Keys and values of one attention layer for a fixed prefix: (B, H, P, dh) each.

    `room` > 0 marks the last `room` positions as slots the queries write their own keys and values
    into, so a T-step loop over one new token reuses one buffer instead of concatenating each step.
    """

    k: torch.Tensor
    v: torch.Tensor
    room: int = 0

    def with_room(self, n: int) -> "KV":
        b, h, p, dh = self.k.shape
        k, v = self.k.new_empty(b, h, p + n, dh), self.v.new_empty(b, h, p + n, dh)
        k[:, :, :p], v[:, :, :p] = self.k, self.v
        return KV(k, v, room=n)


class Attention(nn.Module):
    explicit = False  # True: the explicit softmax below while training (a pack draws each member's dropout)

    def __init__(self, dim: int, heads: int, dropout: float, rotary: Rotary | None = None):
        super().__init__()
        self.heads, self.dropout, self.rotary = heads, dropout, rotary
        self.attn_drop = Dropout(dropout)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # keys and values in one matmul
        self.out = nn.Linear(dim, dim)
        with torch.no_grad():  # as the authors' separate d x d layers: K and V each xavier over (d, d)
            for weight in (self.q.weight, self.kv.weight[:dim], self.kv.weight[dim:], self.out.weight):
                weight.copy_(nn.init.xavier_normal_(torch.empty(dim, dim)))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, dh)
        b, l, d = x.shape
        return x.view(b, l, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor, pos: torch.Tensor | None) -> KV:
        k, v = self.kv(source).chunk(2, dim=-1)
        k, v = self._split(k), self._split(v)
        if self.rotary is not None and pos is not None:
            k = self.rotary(k, pos)
        return KV(k, v)

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor, pos: torch.Tensor | None,
                padded_rows: torch.Tensor | None = None) -> torch.Tensor:
        """`padded_rows` (B, 1, Lq, 1): query rows whose scores are all filled with -1e9 before the
        mask (the authors' padding mask), so they attend uniformly to the keys `mask` allows."""
        q = self._split(self.q(x))  # (B, H, Lq, dh)
        if self.rotary is not None and pos is not None:
            q = self.rotary(q, pos)
        if (padded_rows is not None or (self.explicit and self.training)
                or (q.device.type == "cpu" and (self.training or q.shape[2] == 1))):
            # SDPA's own math: on CPU its dropout draws a per-element bernoulli_ mask (the cheaper
            # mask above is 3-4x faster), and for the sampler's single query two matmuls beat it.
            scores = (q @ kv.k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if padded_rows is not None:
                scores = scores.masked_fill(padded_rows, PADDED_ROW_SCORE)
            y = self.attn_drop(torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=-1)) @ kv.v
        else:
            y = F.scaled_dot_product_attention(
                q, kv.k, kv.v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
            )  # (B, H, Lq, dh)
        b, h, lq, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(b, lq, h * dh))


def feed_forward(dim: int, dropout: float) -> nn.Sequential:
    ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), Dropout(dropout),
                        nn.Linear(4 * dim, dim))
    nn.init.xavier_normal_(ffn[0].weight)
    nn.init.xavier_normal_(ffn[3].weight)
    return ffn


@dataclass
class Context:
    """What every block of one forward pass shares."""

    mask: torch.Tensor  # (B, 1, Lq, Lk) self-attention mask
    pos_q: torch.Tensor  # (B, Lq) positions of the queries (from newest)
    padded_rows: torch.Tensor | None = None  # (B, 1, Lq, 1) padded query rows (padding_mask='query')
    memory: torch.Tensor | None = None  # (B, Lm, D) CAM output for cross-attention
    memory_mask: torch.Tensor | None = None  # (B, 1, Lq, Lm)
    cond: torch.Tensor | None = None  # (B, Lq, D) adaLN condition
    memory_kv: dict[int, KV] = field(default_factory=dict)  # per-block cache of the memory's K/V


class Block(nn.Module):
    """Post-norm Transformer block as in the authors' code; optional cross-attention or adaLN.

    `past` holds this block's self-attention keys/values of positions before the queries, so a
    single new token can be run against a cached prefix.
    """

    def __init__(self, dim: int, heads: int, dropout: float, rotary: Rotary | None,
                 cross: bool = False, adaln: bool = False):
        super().__init__()
        self.attn = Attention(dim, heads, dropout, rotary)
        self.cross = Attention(dim, heads, dropout) if cross else None
        self.ffn = feed_forward(dim, dropout)
        self.drop = Dropout(dropout)
        self.adaln = adaln
        n_norms = 3 if cross else 2
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=not adaln)
                                   for _ in range(n_norms))
        if adaln:  # DiT: shift, scale, gate for attention and FFN, zero-initialised (identity start)
            self.modulation = nn.Linear(dim, 6 * dim)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, ctx: Context, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        if self.adaln:
            return self._forward_adaln(x, ctx, past)
        kv = self._self_kv(x, ctx, past)
        x = self.norms[0](x + self.drop(self.attn(x, kv, ctx.mask, ctx.pos_q, ctx.padded_rows)))
        if self.cross is not None:
            mem = ctx.memory_kv.get(id(self))
            if mem is None:  # the memory is the same for every denoising step: project it once
                mem = ctx.memory_kv[id(self)] = self.cross.keys_values(ctx.memory, None)
            x = self.norms[1](x + self.drop(self.cross(x, mem, ctx.memory_mask, None, ctx.padded_rows)))
        x = self.norms[-1](x + self.drop(self.ffn(x)))
        return x, kv

    def keys_values(self, x: torch.Tensor, ctx: Context, past: KV | None = None) -> KV:
        """Only this block's self-attention keys/values for input `x` (what a later token needs)."""
        if self.adaln:
            shift1, scale1 = self.modulation(F.silu(ctx.cond)).chunk(6, -1)[:2]
            x = self.norms[0](x) * (1 + scale1) + shift1
        return self._self_kv(x, ctx, past)

    def _self_kv(self, x: torch.Tensor, ctx: Context, past: KV | None) -> KV:
        new = self.attn.keys_values(x, ctx.pos_q)
        if past is None:
            return new
        if past.room == new.k.shape[2]:  # inference only: overwrite the query slots in place
            past.k[:, :, -past.room:], past.v[:, :, -past.room:] = new.k, new.v
            return past
        return KV(torch.cat([past.k, new.k], dim=2), torch.cat([past.v, new.v], dim=2))

    def _forward_adaln(self, x: torch.Tensor, ctx: Context, past: KV | None) -> tuple[torch.Tensor, KV]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(ctx.cond)).chunk(6, -1)
        h = self.norms[0](x) * (1 + scale1) + shift1
        kv = self._self_kv(h, ctx, past)
        x = x + gate1 * self.drop(self.attn(h, kv, ctx.mask, ctx.pos_q, ctx.padded_rows))
        h = self.norms[1](x) * (1 + scale2) + shift2
        return x + gate2 * self.drop(self.ffn(h)), kv


class Transformer(nn.Module):
    def __init__(self, cfg: TrialConfig, n_blocks: int, positional: str, cross: bool = False,
                 adaln: bool = False):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.heads
        rotary = Rotary(head_dim) if positional == "rotary" else None
        self.blocks = nn.ModuleList(
            Block(cfg.hidden_size, cfg.heads, cfg.dropout, rotary, cross, adaln) for _ in range(n_blocks)
        )
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS) if adaln else None

    def forward(self, x: torch.Tensor, ctx: Context, past: list[KV] | None = None, kv_only: bool = False
                ) -> tuple[torch.Tensor, list[KV]]:
        """`kv_only`: the caller wants only the cache, so the last block computes just its keys and
        values (its output would be thrown away) and the returned tensor is that block's input."""
        cache = []
        for i, block in enumerate(self.blocks):
            block_past = None if past is None else past[i]
            if kv_only and i == len(self.blocks) - 1:
                cache.append(block.keys_values(x, ctx, block_past))
                return x, cache
            x, kv = block(x, ctx, block_past)
            cache.append(kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, cache


# ---------------------------------------------------------------------------------------------
# ADRec
# ---------------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """ADM: aggregates the history encoding c with the noisy target x_t and its timestep, then
    predicts x_0 (Transformer or MLP)."""

    def __init__(self, cfg: TrialConfig, steps: int):
        super().__init__()
        d = cfg.hidden_size
        self.cfg, self.steps = cfg, steps
        self.time_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.concat_proj = nn.Linear(2 * d, d) if cfg.aggregation == "concat" else None
        self.positions = AbsolutePositions(cfg.positional_encoding, cfg.max_len, d)
        if cfg.denoiser == "mlp":
            self.net = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d), nn.LayerNorm(d))
        else:
            self.net = Transformer(cfg, cfg.adm_blocks, cfg.positional_encoding,
                                   cross=cfg.aggregation == "cross_attention",
                                   adaln=cfg.aggregation == "adaln")

    def time_table(self, copies: int = 1) -> torch.Tensor:
        """(copies * T, D): the embedding of every timestep (`copies` times: one per member of a
        stacked model). The authors rescale t to [0, 1000) before the sinusoid
        (rescale_timesteps=True). t takes only T values, so the MLP runs on the T rows of a table
        instead of on every token."""
        device = self.time_mlp[0].weight.device
        steps = torch.arange(self.steps, device=device, dtype=torch.float32)
        return self.time_mlp(sinusoid(steps * (1000.0 / self.steps), self.cfg.hidden_size).repeat(copies, 1))

    def aggregate(self, c: torch.Tensor, x_t: torch.Tensor, t_emb: torch.Tensor,
                  lam: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Denoiser input (B, L, D) and the adaLN condition (or None); `lam` (B, 1, 1) replaces
        the config's λ row by row (a pack's members)."""
        agg = self.cfg.aggregation
        if agg == "linear":
            return c + (self.cfg.lambda_uncertainty if lam is None else lam) * (x_t + t_emb), None
        if agg == "concat":
            return self.concat_proj(torch.cat([c, x_t + t_emb], dim=-1)), None
        if agg == "cross_attention":
            return x_t + t_emb, None
        return x_t, c + t_emb  # adaln

    def forward(self, c: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, ctx: Context,
                c_memory: torch.Tensor | None = None, past: list[KV] | None = None, kv_only: bool = False,
                table: torch.Tensor | None = None, lam: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Predict x_0 for the query positions. `c`, `x_t`, `t` cover the queries only; with
        cross-attention `c_memory` is the whole history encoding the queries may attend to.
        `table` is what `t` indexes (default `time_table()`; a caller that runs many steps with
        fixed weights computes it once); `lam` as in `aggregate`."""
        z, cond = self.aggregate(c, x_t, (self.time_table() if table is None else table)[t], lam)
        pe = self.positions(ctx.pos_q)
        if pe is not None:
            z = z + pe
        if isinstance(self.net, nn.Sequential):
            return self.net(z), []
        ctx.cond, ctx.memory = cond, c_memory if c_memory is not None else c
        return self.net(z, ctx, past, kv_only)


class ADRec(nn.Module):
    def __init__(self, cfg: TrialConfig, num_items: int):
        super().__init__()
        d = cfg.hidden_size
        self.cfg, self.num_items = cfg, num_items
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.emb_dropout = Dropout(cfg.emb_dropout)
        self.hist_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.positions = AbsolutePositions(cfg.positional_encoding, cfg.max_len, d)
        self.cam = Transformer(cfg, cfg.cam_blocks, cfg.positional_encoding)
        schedule = NoiseSchedule.build(cfg.noise_schedule, cfg.diffusion_steps, cfg.beta_a, cfg.beta_b)
        self.steps = schedule.steps
        self.adm = Denoiser(cfg, schedule.steps)
        self._schedule = schedule
        self._tensors = schedule.tensors("cpu")

    def schedule(self) -> ScheduleTensors:
        device = self.item_emb.weight.device
        if self._tensors.sqrt_ab.device != device:
            self._tensors = self._schedule.tensors(device)
        return self._tensors

    # --- the history encoder (CAM) -------------------------------------------------------------
    def encode(self, seq: torch.Tensor, segment: torch.Tensor | None = None) -> tuple[torch.Tensor, Context]:
        """c = CAM(LN(drop(E[seq]) + pos)); returns (B, L, D) and the shared attention context.
        `segment` numbers packed sequences (default: one left-padded sequence per row)."""
        ctx = attention_context(seq, segment, self.cfg.padding_mask == "query")
        h = self.emb_dropout(self.item_emb(seq))
        pe = self.positions(ctx.pos_q)
        if pe is not None:
            h = h + pe
        c, _ = self.cam(self.hist_norm(h), ctx)
        return c, ctx

    # --- training ------------------------------------------------------------------------------
    def sample_timesteps(self, segment: torch.Tensor) -> torch.Tensor:
        """t ~ U{0..T-1}: one per token (ADRec) or one per sequence; padding keeps t = 0."""
        b, l = segment.shape
        if self.cfg.noise_level == "token":
            t = torch.randint(0, self.steps, (b, l), device=segment.device)
        else:  # one draw per segment id of each row
            t = torch.randint(0, self.steps, (b, l + 1), device=segment.device).gather(1, segment)
        return t * (segment > 0)

    def forward_train(self, seq: torch.Tensor, tgt: torch.Tensor, segment: torch.Tensor | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> "TrainingPass":
        """The training forward pass: CE over all N+1 items at every valid position and the masked
        MSE of x̂_0 to E[tgt]. Inputs and targets share their padding; `segment` as in `encode`.
        `t` (B, L) and `noise` (B, L, D) fix the draws (tests); t is zeroed at padding."""
        valid = tgt > 0  # (B, L)
        segment = segments(tgt, segment)
        c, ctx = self.encode(seq, segment)
        x0 = self.item_emb(tgt)  # (B, L, D)
        t = self.sample_timesteps(segment) if t is None else t * valid
        x_t = self.schedule().add_noise(x0, t, torch.randn_like(x0) if noise is None else noise)
        x_t = torch.where(valid.unsqueeze(-1), x_t, x0)
        x0_hat, _ = self.adm(c, x_t, t, ctx)
        # MSE: per sequence, mean over its positions and dims; then mean over sequences (authors).
        mse = sequence_mean(((x0_hat - x0) ** 2).mean(-1), segment)
        ce = linear_cross_entropy(x0_hat[valid], self.item_emb.weight, tgt[valid])  # over N+1 items
        return TrainingPass(c=c, t=t, x_t=x_t, x0_hat=x0_hat, ce=ce, mse=mse)

    def loss(self, seq: torch.Tensor, tgt: torch.Tensor, segment: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE + mse_weight * MSE and its two parts (see `forward_train`)."""
        out = self.forward_train(seq, tgt, segment)
        return out.ce + self.cfg.mse_weight * out.mse, {"ce": out.ce, "mse": out.mse}

    # --- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def score_all(self, seq: torch.Tensor, noise: torch.Tensor | None = None, naive: bool = False,
                  trace: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Scores (B, N+1) for the item after `seq`; id 0 gets -inf unless `score_padding_item`.

        `noise` (T+1, B, D) fixes the initial sample x_T (noise[0]) and the noise of the step at t
        (noise[t + 1]) (for tests); `naive` recomputes the whole denoiser at every step instead of
        caching the history; `trace` receives (x̂_0, x_{t-1}) of the last position per step.
        """
        x_last = self.sample_next(seq, noise, naive, trace)
        return padding_scored(x_last @ self.item_emb.weight.T, self.cfg.score_padding_item)

    @torch.no_grad()
    def sample_next(self, seq: torch.Tensor, noise: torch.Tensor | None = None, naive: bool = False,
                    trace: list | None = None, adm: Callable[..., tuple[torch.Tensor, list[KV]]] | None = None,
                    step: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor] | None = None
                    ) -> torch.Tensor:
        """The denoised embedding (B, D) of the item after `seq` (see `score_all`). `adm` (called as
        Denoiser.forward) and `step` (as ScheduleTensors.step) replace this model's own: a pack
        passes its members' λ and noise schedules, one per block of rows."""
        b, l = seq.shape
        if noise is None:
            noise = torch.randn(self.steps + 1, b, self.cfg.hidden_size, device=seq.device)
        c, ctx = self.encode(seq)
        denoise = self._denoise_naive if naive else self._denoise_cached
        adm = adm or functools.partial(self.adm, table=self.adm.time_table())  # weights fixed: one table
        return denoise(seq, c, ctx, noise, trace, adm, step or self.schedule().step)

    def _prefix_targets(self, seq: torch.Tensor) -> torch.Tensor:
        """Clean targets of the history positions: the next item of each, i.e. seq shifted left."""
        return self.item_emb(seq[:, 1:])  # (B, L-1, D)

    def _denoise_naive(self, seq: torch.Tensor, c: torch.Tensor, ctx: Context, noise: torch.Tensor,
                       trace: list | None, adm: Callable[..., tuple[torch.Tensor, list[KV]]],
                       step: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        b, l = seq.shape
        prefix = self._prefix_targets(seq)
        x = noise[0]
        for i in reversed(range(self.steps)):
            x_t = torch.cat([prefix, x.unsqueeze(1)], dim=1)  # (B, L, D), history at t = 0
            t = torch.zeros(b, l, dtype=torch.long, device=seq.device)
            t[:, -1] = i
            x0_hat, _ = adm(c, x_t, t, ctx)
            x = step(x0_hat[:, -1], x, i, noise[i + 1])
            if trace is not None:
                trace.append((x0_hat[:, -1], x))
        return x

    def _denoise_cached(self, seq: torch.Tensor, c: torch.Tensor, ctx: Context, noise: torch.Tensor,
                        trace: list | None, adm: Callable[..., tuple[torch.Tensor, list[KV]]],
                        step: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        b, l = seq.shape
        x = noise[0]
        past = None
        if l > 1 and self.cfg.denoiser == "transformer":
            # Run the history once at t = 0 and keep every layer's keys and values.
            p = l - 1
            pre_ctx = Context(mask=ctx.mask[:, :, :p, :p], pos_q=ctx.pos_q[:, :p],
                              memory_mask=ctx.memory_mask[:, :, :p, :],
                              padded_rows=_rows(ctx.padded_rows, slice(None, p)))
            t0 = torch.zeros(b, p, dtype=torch.long, device=seq.device)
            _, past = adm(c[:, :p], self._prefix_targets(seq), t0, pre_ctx, c_memory=c, kv_only=True)
            past = [kv.with_room(1) for kv in past]
        last_ctx = Context(mask=ctx.mask[:, :, -1:, :], pos_q=ctx.pos_q[:, -1:],
                           memory_mask=ctx.memory_mask[:, :, -1:, :],
                           padded_rows=_rows(ctx.padded_rows, slice(-1, None)))
        c_last = c[:, -1:]
        for i in reversed(range(self.steps)):
            t = torch.full((b, 1), i, dtype=torch.long, device=seq.device)
            x0_hat, _ = adm(c_last, x.unsqueeze(1), t, last_ctx, c_memory=c, past=past)
            x = step(x0_hat[:, 0], x, i, noise[i + 1])
            if trace is not None:
                trace.append((x0_hat[:, 0], x))
        return x


@dataclass
class TrainingPass:
    """What one training forward pass computed (ADRec.forward_train)."""

    c: torch.Tensor  # (B, L, D) CAM output
    t: torch.Tensor  # (B, L) timesteps used (0 at padding)
    x_t: torch.Tensor  # (B, L, D) noisy targets (E[tgt] at padding)
    x0_hat: torch.Tensor  # (B, L, D) denoiser output at every position
    ce: torch.Tensor
    mse: torch.Tensor


def _rows(padded_rows: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if padded_rows is None else padded_rows[:, :, rows]


def padding_scored(scores: torch.Tensor, score_padding_item: bool) -> torch.Tensor:
    """Scores with column 0, the padding item, ranked like the others (authors) or set to -inf."""
    if not score_padding_item:
        scores[:, 0] = -torch.inf
    return scores


# ---------------------------------------------------------------------------------------------
# Baselines: SASRec-style encoder (stage 1 of ADRec) and most-popular
# ---------------------------------------------------------------------------------------------
class SASRec(nn.Module):
    """Causal Transformer + CE over all items at every position; no positional embedding (the
    authors' pre-training run for ADRec's item embeddings). Initialised as the authors' SASRec:
    N(0, 0.1) weights, zero biases, LayerNorm before the embedding dropout."""

    def __init__(self, cfg: TrialConfig, num_items: int):
        super().__init__()
        d = cfg.hidden_size
        self.cfg = cfg
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.emb_dropout = Dropout(cfg.emb_dropout)
        self.encoder = Transformer(cfg, cfg.cam_blocks, "none")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.1)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, seq: torch.Tensor, segment: torch.Tensor | None = None) -> torch.Tensor:
        ctx = attention_context(seq, segment, self.cfg.padding_mask == "query")
        h, _ = self.encoder(self.emb_dropout(self.norm(self.item_emb(seq))), ctx)
        return h

    def loss(self, seq: torch.Tensor, tgt: torch.Tensor, segment: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        valid = tgt > 0
        ce = linear_cross_entropy(self.encode(seq, segment)[valid], self.item_emb.weight, tgt[valid])
        return ce, {"ce": ce}

    @torch.no_grad()
    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        return padding_scored(self.encode(seq)[:, -1] @ self.item_emb.weight.T, self.cfg.score_padding_item)


class MostPopular(nn.Module):
    """Scores every item by its count in the training histories."""

    def __init__(self, counts: torch.Tensor):
        super().__init__()
        self.register_buffer("counts", counts.float())

    @torch.no_grad()
    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        scores = self.counts.unsqueeze(0).expand(seq.shape[0], -1).clone()
        scores[:, 0] = -torch.inf
        return scores


def build_model(cfg: TrialConfig, num_items: int) -> nn.Module:
    if cfg.model == "adrec":
        return ADRec(cfg, num_items)
    if cfg.model == "sasrec":
        return SASRec(cfg, num_items)
    raise ValueError(f"model={cfg.model!r} has no trainable network; most_popular is built from counts")
