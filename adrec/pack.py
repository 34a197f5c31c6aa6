"""Packs: K ADRec trials of one dataset and one architecture trained as one model.

A pack stacks the K members' parameters along a leading member axis and runs their stage-2/3
epochs as one network: every activation keeps the members one after another along its first
(row) dimension, so attention, masks, norms and activations run unchanged, and only the layers
with parameters know the member axis (a Linear is one batched matmul over the K weight matrices,
an Embedding looks up in the K tables). Each member keeps everything else of its own: its batches
(own seed, own shuffle, own batch size and micro-batches, padded to the pack's common shape), its
random draws (dropout masks, timesteps and noise drawn from its own generator in the order and
shapes of its solo run), its noise schedule, λ, MSE weight, loss combination and PCGrad (its own
gradients projected in its own randperm order), its Adam state, learning rate, cosine schedule and
weight decay, its warm-up length, evaluation interval, patience and model selection. That is what
makes a member equal its solo run (`adrec.train.fit`, same seed): the same draws meet the same
numbers, up to float rounding of batched vs single matmuls. On an accelerator the members draw
from generators of their own on the device instead (`MemberRNG`): each member's run then depends
on its seed alone, not on its pack-mates, but is not its solo run's bit for bit.

A member that stops (patience, epoch budget, divergence) leaves the pack: every stacked tensor
is compacted to the members still training, and the pack ends when all have left.

How many members share one stacked network is the device's call (`default_stack`): all of them on
a GPU, where a small trial's step is bound by kernel launches; one on CPU, where a stacked step
streams K times larger activations through memory and runs slower per member than the K runs in
sequence (ml-100k, 8 members: 1.40x). `fit_pack` trains the networks in lock-step, epoch by
epoch (`run_lockstep`), so a pack reports and ends the same way in either layout.

Which configs may share a pack: `PACK_FIELDS` must be equal (the architecture, the data, the
padding mode that shapes the batches). Stages: `fit_pack` first runs stage 1 (the SASRec
pre-training of the item embeddings) of every member that needs it as one pack of SASRec members,
each to its own early stop, through the stage-1 cache as `fit` does (its key ignores the
stage-2/3 knobs, so with a cache members of one seed train it once); then stages 2 and 3 as one
pack of ADRec members, each crossing the warm-up boundary at its own epoch. Grouping by stage
keeps one network per pack; stage 1 is short against stages 2-3 and cached across trials.
Validation and test scoring stack the members due at one epoch into one network too
(`evaluate_members`): the same user batches for all, each member's λ, noise schedule, padding
score and sampling noise (from its own stream on CPU, as its solo run draws it), its own metrics.
A member evaluated alone takes the solo code path.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam

from adrec.batches import Packed
from adrec.config import TrialConfig
from adrec.losses import linear_cross_entropy
from adrec.metrics import RankingMetrics
from adrec.model import ADRec, Attention, SASRec, keep_scale, padding_scored, segments, sequence_mean
from adrec.schedule import NoiseSchedule, ScheduleTensors
from adrec.train import (DIVERGED_LOSS, LoopState, Reporter, Splits, _fmt, _report_metrics, environment, evaluate,
                         prepare, project_conflicts, seed_everything, select, stage1_key, train_rows)

log = logging.getLogger("adrec.pack")

# Fields every member of a pack shares: the network's shapes and wiring, the data, and the padding
# mode (it decides whether rows are packed or padded to max_len). Everything else may differ.
PACK_FIELDS = ("dataset", "data_dir", "max_users", "model", "device", "hidden_size", "cam_blocks", "adm_blocks",
               "heads", "max_len", "diffusion_steps", "aggregation", "positional_encoding", "denoiser",
               "padding_mask")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as make_optimizer uses them


def check_packable(cfgs: Sequence[TrialConfig]) -> None:
    """Raise ValueError naming the first field that keeps these configs out of one pack."""
    if not cfgs:
        raise ValueError("a pack needs at least one config; got none")
    for cfg in cfgs:
        if cfg.model != "adrec":
            raise ValueError(f"model={cfg.model!r} cannot be packed; packs train ADRec (use fit for baselines)")
    for name in PACK_FIELDS:
        values = sorted({repr(getattr(c, name)) for c in cfgs})
        if len(values) > 1:
            raise ValueError(f"{name} differs within the pack ({', '.join(values)}); a pack shares "
                             f"{', '.join(PACK_FIELDS)}: group the configs by these fields")


# ---------------------------------------------------------------------------------------------
# Per-member random streams
# ---------------------------------------------------------------------------------------------
class MemberRNG:
    """One member's random numbers. `state` is its torch CPU stream, continued from where its solo
    run would be; `active()` makes it the global generator for the draws inside, so the model's own
    sampling code draws exactly what it draws in a solo run. With `generator` (a torch.Generator on
    the pack's device: `start(draws_on=device)`) the member's training draws (timesteps, noise,
    dropout) and sampling noise come from that generator on the device instead, in one kernel each,
    with no host draw or copy per step; its results then depend on its own seed only, not on its
    pack-mates, but no longer equal the solo CPU run's bit for bit (a solo GPU run draws from the
    device's global generator, so it never did on a GPU)."""

    def __init__(self, state: torch.Tensor, generator: torch.Generator | None = None):
        self.state = state
        self.generator = generator

    @classmethod
    def start(cls, draws_on: torch.device | None = None) -> "MemberRNG":
        """The member's stream from torch's global CPU generator as it is now; with `draws_on`,
        plus a generator there seeded from that stream (the global generator does not move)."""
        state = torch.get_rng_state()
        if draws_on is None:
            return cls(state)
        seed = int(torch.randint(2**62, (1,), generator=torch.Generator().set_state(state)))
        return cls(state, torch.Generator(device=draws_on).manual_seed(seed))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)


def draw_device(device: torch.device, device_draws: bool | None = None) -> torch.device | None:
    """Where the members of a pack on `device` draw their random numbers: on the device from
    generators of their own (`device_draws`; default: on an accelerator, where host draws and
    copies would stall every step), or None: from their CPU streams, as their solo CPU runs."""
    on_device = device.type != "cpu" if device_draws is None else device_draws
    return device if on_device else None


@dataclass
class Layout:
    """Where each member's rows sit in the current forward pass: member m owns rows
    [m * rows_each, (m + 1) * rows_each); of those, its solo rows are the first `rows[m]`, each
    `width[m]` positions wide (rows[m] = 0: the member has nothing in this pass)."""

    rngs: list[MemberRNG]
    rows: list[int] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    # From the host copy of the pass's batch, so a GPU pass never waits to read them back:
    host_segment: torch.Tensor | None = None  # (K, r, w) segment ids
    target_index: list[torch.Tensor] = field(default_factory=list)  # per member, on the device: flat
    # indices into the pass's K * r * w positions of those with a target, in row-major order (the
    # positions, and the order, that boolean indexing with `tgt > 0` selects)


# ---------------------------------------------------------------------------------------------
# Layers with a member axis
# ---------------------------------------------------------------------------------------------
def _by_member(x: torch.Tensor, k: int) -> torch.Tensor:
    """(K * rows, ..., F) -> (K, rows * ..., F)."""
    return x.reshape(k, -1, x.shape[-1])


class PackedLinear(nn.Module):
    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([l.weight.detach() for l in layers]))  # (K, out, in)
        self.bias = nn.Parameter(torch.stack([l.bias.detach() for l in layers]))  # (K, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        if k == 1:  # a pack of one computes as the solo layer, to the bit
            return F.linear(x, self.weight[0], self.bias[0])
        y = torch.baddbmm(self.bias.unsqueeze(1), _by_member(x, k), self.weight.transpose(1, 2))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class PackedLayerNorm(nn.Module):
    def __init__(self, norms: Sequence[nn.LayerNorm]):
        super().__init__()
        self.eps, self.shape = norms[0].eps, norms[0].normalized_shape
        self.weight = nn.Parameter(torch.stack([n.weight.detach() for n in norms]))  # (K, D)
        self.bias = nn.Parameter(torch.stack([n.bias.detach() for n in norms]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        if k == 1:
            return F.layer_norm(x, self.shape, self.weight[0], self.bias[0], self.eps)
        y = _by_member(F.layer_norm(x, self.shape, None, None, self.eps), k)
        return torch.addcmul(self.bias.unsqueeze(1), y, self.weight.unsqueeze(1)).reshape(x.shape)  # one pass


class PackedEmbedding(nn.Module):
    """K tables (K, N, D); row 0 keeps no gradient from lookups where `padding_idx` is set, as
    nn.Embedding's padding_idx (the weight's other uses, the CE, still reach it)."""

    def __init__(self, tables: Sequence[nn.Embedding]):
        super().__init__()
        self.padding_idx = tables[0].padding_idx
        self.weight = nn.Parameter(torch.stack([t.weight.detach() for t in tables]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        k, n, d = self.weight.shape
        if k == 1:
            return F.embedding(idx, self.weight[0], self.padding_idx)
        flat = idx.reshape(k, -1)
        out = F.embedding(flat + torch.arange(k, device=idx.device).unsqueeze(1) * n, self.weight.reshape(k * n, d))
        if self.padding_idx is not None:
            out = torch.where((flat == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out.reshape(*idx.shape, d)


class PackedDropout(nn.Module):
    """Each member's dropout, drawn from its own stream at its solo shape: (rows, width, F) for
    token activations and (rows, H, width, width) for attention probabilities, placed in the
    member's corner of the padded tensor (1 elsewhere). A member with p = 0 still makes the draw
    nn.Dropout makes (torch's dropout consumes random numbers even at p = 0)."""

    def __init__(self, layers: Sequence[nn.Dropout], layout: Layout):
        super().__init__()
        self.ps = [float(l.p) for l in layers]
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.dim() not in (3, 4):
            raise ValueError(f"PackedDropout expects 3-d or 4-d activations; got shape {tuple(x.shape)}")
        k = len(self.ps)
        full = (k, x.shape[0] // k, *x.shape[1:])
        rows_all, width_all = self.layout.rows, self.layout.width
        whole = all(r == full[1] for r in rows_all) and all(w == x.shape[-2] for w in width_all)  # no padding
        scales = (torch.empty if whole else torch.ones)(full, dtype=x.dtype, device=x.device)
        for m, (p, rows, width) in enumerate(zip(self.ps, rows_all, width_all)):
            if rows == 0:
                continue
            if x.dim() == 3:
                shape, corner = (rows, width, x.shape[2]), (m, slice(rows), slice(width))
            else:
                shape = (rows, x.shape[1], width, width)
                corner = (m, slice(rows), slice(None), slice(width), slice(width))
            generator = self.layout.rngs[m].generator
            if generator is not None:  # on the device; drawn at the member's own shape, contiguous, since
                # a strided view may draw other numbers (torch's CPU kernels do) and the member's mask
                # must not depend on its pack-mates' shapes
                if p > 0:
                    scales[corner] = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(
                        1.0 - p, generator=generator).div_(1.0 - p)
                elif whole:
                    scales[corner] = 1.0
                continue
            with self.layout.rngs[m].active():
                if p > 0 and x.device.type == "cpu" and whole:
                    keep_scale(torch.Size(shape), p, out=scales[m])  # drawn into its slot: no copy of K masks
                    continue
                if p > 0 and x.device.type == "cpu":
                    mask = keep_scale(torch.Size(shape), p)
                else:
                    mask = F.dropout(torch.ones(shape, dtype=x.dtype), p, True)  # all ones at p = 0
            scales[corner] = mask.to(x.device)
        return x * scales.view(x.shape)


def stack_models(models: Sequence[nn.Module], layout: Layout) -> nn.Module:
    """One ADRec (or SASRec) whose layers hold the K models' parameters stacked along a leading member axis."""
    stacked = copy.deepcopy(models[0])
    replace: list[tuple[str, nn.Module]] = []
    for name, module in stacked.named_modules():
        peers = [m.get_submodule(name) for m in models]
        if isinstance(module, nn.Linear):
            replace.append((name, PackedLinear(peers)))
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            replace.append((name, PackedLayerNorm(peers)))
        elif isinstance(module, nn.Embedding):
            replace.append((name, PackedEmbedding(peers)))
        elif isinstance(module, nn.Dropout):
            replace.append((name, PackedDropout(peers, layout)))
        elif isinstance(module, Attention):
            module.explicit = True  # per-member attention dropout needs the explicit softmax path
    for name, new in replace:
        parent, _, child = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, child, new)
    solo_keys, packed_keys = set(models[0].state_dict()), set(stacked.state_dict())
    if solo_keys != packed_keys:
        raise RuntimeError(f"stacking left parameters without a member axis: {sorted(solo_keys ^ packed_keys)}")
    return stacked


def member_state(stacked: nn.Module, m: int) -> dict[str, torch.Tensor]:
    """Member m's parameters as a solo model's state_dict (views into the stacks)."""
    return {name: value[m] for name, value in stacked.state_dict().items()}


def compact(stacked: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the members `keep` (indices) in every stacked parameter and dropout."""
    for module in stacked.modules():
        if isinstance(module, (PackedLinear, PackedLayerNorm, PackedEmbedding)):
            for p in module.parameters(recurse=False):
                p.data = p.data[keep]
                p.grad = None
        elif isinstance(module, PackedDropout):
            module.ps = [module.ps[i] for i in keep.tolist()]


# ---------------------------------------------------------------------------------------------
# Per-member Adam over stacked tensors
# ---------------------------------------------------------------------------------------------
class _FromGrad:
    def __repr__(self) -> str:
        return "FROM_GRAD"


FROM_GRAD = _FromGrad()  # a member's gradient that is its slice of the stacked parameter's own .grad
Grad = torch.Tensor | _FromGrad | None  # one member's gradient of one parameter (None: it has none)


class MemberAdam:
    """torch.optim.Adam for each member over its slices of the stacked parameters: its own lr,
    weight decay, step counts and state (exp_avg, exp_avg_sq, stacked too). A (parameter, member)
    pair without a gradient is skipped, state and step count untouched, as torch.optim.Adam skips
    a parameter whose .grad is None.

    Several members update each stacked parameter in one set of tensor ops whatever K, their lr
    and bias corrections as a (K, 1, ...) column: torch's adam called per member costs host time
    per (parameter, member) tensor (16 members x 63 tensors: ~40 ms a step, against ~3 ms here;
    `docs/cluster.md`). The arithmetic is torch's single-tensor Adam's in its order, so a member
    equals a solo torch.optim.Adam to the bit but for weight decay (g + wd p, which torch may fuse).
    A network of one member calls torch's own adam function: bitwise, the solo run's step."""

    def __init__(self, params: Sequence[nn.Parameter], k: int, foreach: bool | None = None):
        self.params = list(params)
        self.foreach = self.params[0].device.type == "cuda" if foreach is None else foreach
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(len(self.params), k)  # (parameter, member) step counts, float32 as torch's

    @torch.no_grad()
    def step(self, updates: Sequence[tuple[int, Sequence[Grad], float, float]]) -> None:
        """One step of each member in `updates`: (member, its gradient per parameter, lr, weight decay)."""
        if self.steps.shape[1] == 1:
            self._step_one(updates)
            return
        settings = {m: (lr, weight_decay) for m, _, lr, weight_decay in updates}
        columns: dict[tuple, tuple[torch.Tensor | None, ...]] = {}  # shared by parameters with the same
        # members, step counts and dimensions (most of them)
        k = self.steps.shape[1]
        for i, p in enumerate(self.params):
            members = [m for m, grads, _, _ in updates if grads[i] is not None]
            if not members:
                continue
            whole = len(members) == k
            if whole:
                self.steps[i] += 1
                counts = tuple(self.steps[i].tolist())
            else:
                self.steps[i, members] += 1
                counts = tuple(self.steps[i, members].tolist())
            key = (tuple(members), counts, p.dim())
            if key not in columns:
                columns[key] = self._columns(members, counts, settings, p)
            rows = None if whole else members
            grad = self._stacked_grad(i, rows, [grads[i] for _, grads, _, _ in updates if grads[i] is not None])
            self._update(i, rows, grad, *columns[key])

    def _columns(self, members: list[int], counts: tuple[float, ...], settings: dict[int, tuple[float, float]],
                 p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Weight decay (None: all 0), -step size and sqrt(bias correction 2) per member, as
        (K', 1, ...) columns broadcasting against p, from Python floats as torch's adam computes them."""
        b1, b2 = ADAM_BETAS
        lr = [settings[m][0] for m in members]
        decay = [settings[m][1] for m in members]
        values = [decay, [-lr_m / (1 - b1 ** n) for lr_m, n in zip(lr, counts)],
                  [math.sqrt(1 - b2 ** n) for n in counts]]
        shape = (3, len(members)) + (1,) * (p.dim() - 1)
        cols = torch.tensor(values, dtype=p.dtype).view(shape).to(p.device, non_blocking=True)
        return (cols[0] if any(decay) else None), cols[1], cols[2]

    def _stacked_grad(self, i: int, rows: list[int] | None, grads: list[Grad]) -> torch.Tensor:
        """(K', ...) gradients of parameter i for the members `rows` (None: all): the stacked .grad
        itself where it can be."""
        stacked = self.params[i].grad
        if all(g is FROM_GRAD for g in grads):
            return stacked if rows is None else stacked[rows]
        members = range(len(grads)) if rows is None else rows
        return torch.stack([stacked[m] if g is FROM_GRAD else g for m, g in zip(members, grads)])

    def _update(self, i: int, rows: list[int] | None, grad: torch.Tensor, decay: torch.Tensor | None,
                neg_step_size: torch.Tensor, bias2_sqrt: torch.Tensor) -> None:
        """Adam on parameter i of the members `rows` (None: all, in place)."""
        p, avg, avg_sq = self.params[i].data, self.exp_avg[i], self.exp_avg_sq[i]
        if rows is not None:  # update copies of the members' rows, then put them back
            index = torch.tensor(rows, device=p.device)
            p, avg, avg_sq = p[index], avg[index], avg_sq[index]
        if decay is not None:
            grad = grad + decay * p
        b1, b2 = ADAM_BETAS
        avg.lerp_(grad, 1 - b1)
        avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (avg_sq.sqrt() / bias2_sqrt).add_(ADAM_EPS)
        p.add_(neg_step_size * avg / denom)  # addcdiv's p + value * avg / denom
        if rows is not None:
            self.params[i].data[index], self.exp_avg[i][index], self.exp_avg_sq[i][index] = p, avg, avg_sq

    def _step_one(self, updates: Sequence[tuple[int, Sequence[Grad], float, float]]) -> None:
        for m, grads, lr, weight_decay in updates:
            chosen = [i for i, g in enumerate(grads) if g is not None]
            if not chosen:
                continue
            adam([self.params[i].data[m] for i in chosen],
                 [self.params[i].grad[m] if grads[i] is FROM_GRAD else grads[i] for i in chosen],
                 [self.exp_avg[i][m] for i in chosen], [self.exp_avg_sq[i][m] for i in chosen], [],
                 [self.steps[i, m] for i in chosen], foreach=self.foreach,
                 amsgrad=False, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], lr=lr, weight_decay=weight_decay,
                 eps=ADAM_EPS, maximize=False)

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the members `keep`; call after the parameters were compacted."""
        self.exp_avg = [e[keep] for e in self.exp_avg]
        self.exp_avg_sq = [e[keep] for e in self.exp_avg_sq]
        self.steps = self.steps[:, keep.cpu()]


def cosine_lrs(cfg: TrialConfig) -> Iterator[float]:
    """The learning rate of each epoch (1, 2, ...) as make_optimizer's CosineAnnealingLR gives it
    (its recursive form, so the floats are the solo run's)."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, T_max=cfg.cosine_t_max)
    while True:
        yield dummy.param_groups[0]["lr"]
        dummy.step()
        scheduler.step()


# ---------------------------------------------------------------------------------------------
# Members and the pack
# ---------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One trial inside a pack: its config, solo model (the evaluation copy), stream and state."""

    index: int  # position in the caller's list of configs
    cfg: TrialConfig
    solo: nn.Module  # ADRec, or SASRec in a stage-1 pack
    rng: MemberRNG
    result: dict[str, Any]
    stage1: dict[str, Any]
    report: Reporter | None
    lrs: Iterator[float]
    lr: float = 0.0
    state: LoopState = field(default_factory=LoopState)
    best_state_dict: dict[str, torch.Tensor] | None = None
    sched: Any = None  # ScheduleTensors
    diverged: str | None = None
    pretraining: bool = False  # stage 1: the member is the config's SASRec pre-training run
    embedding: torch.Tensor | None = None  # stage 1's result: the best model's item embeddings

    @property
    def max_epochs(self) -> int:
        s1, s2, s3 = self.cfg.stage_epochs()
        return s1 if self.pretraining else s2 + s3

    def stage_of_epoch(self, epoch: int) -> int:
        return 1 if self.pretraining else 2 if epoch <= self.cfg.stage_epochs()[1] else 3

    def warm_up(self, epoch: int) -> bool:
        """The item embeddings get no gradient at this epoch (stage 2)."""
        return not self.pretraining and epoch <= self.cfg.stage_epochs()[1]


@dataclass
class Part:
    """One member's micro-batch of the current step, with the weights of its loss terms."""

    rows: Packed
    ce_share: float
    mse_share: float


OnEpoch = Callable[[int, dict[int, dict[str, Any]]], None]  # (epoch, {member index: its finished record})


# ---------------------------------------------------------------------------------------------
# A stacked ADRec's denoiser and sampler, each member with its own λ and noise schedule
# ---------------------------------------------------------------------------------------------
def stacked_timesteps(t: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    """Timesteps (K * rows, ...) of member-major rows as indices into a table of K stacked blocks
    of `steps` rows (member m's t indexes block m)."""
    offset = torch.arange(k, device=t.device) * steps
    return t + offset.repeat_interleave(t.shape[0] // k).view(-1, *([1] * (t.dim() - 1)))


class MemberDenoiser:
    """Denoiser.forward on a stacked model whose rows are `members`' blocks (member-major), with
    each member's λ and its own rows of a stacked timestep table (computed once per instance: per
    training step, or per evaluation with fixed parameters). Called as Denoiser.forward."""

    def __init__(self, model: ADRec, members: Sequence[Member]):
        adm, k = model.adm, len(members)
        self.adm, self.k, self.steps = adm, k, adm.steps
        self.table = adm.time_table(copies=k)  # (K*T, D)
        self.lams = torch.tensor([m.cfg.lambda_uncertainty for m in members], dtype=torch.float32,
                                 device=self.table.device)

    def __call__(self, c: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, ctx, c_memory: torch.Tensor | None = None,
                 past: list | None = None, kv_only: bool = False) -> tuple[torch.Tensor, list]:
        lam = self.lams.repeat_interleave(c.shape[0] // self.k).view(-1, 1, 1)
        return self.adm(c, x_t, stacked_timesteps(t, self.k, self.steps), ctx, c_memory, past, kv_only,
                        table=self.table, lam=lam)


class MemberSampler:
    """ScheduleTensors.step on member-major rows, each block of rows with its member's schedule."""

    def __init__(self, schedules: Sequence[ScheduleTensors]):
        self.coef_x0, self.coef_xt, self.sigma = (torch.stack([getattr(s, name) for s in schedules], 1)  # (T, K)
                                                  for name in ("coef_x0", "coef_xt", "sigma"))

    def __call__(self, x0_pred: torch.Tensor, x_t: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        k, d = self.sigma.shape[1], x_t.shape[-1]

        def per_member(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return coef[t].view(k, 1, 1) * x.view(k, -1, d)

        mean = per_member(self.coef_x0, x0_pred) + per_member(self.coef_xt, x_t)
        if t > 0:
            mean = mean + per_member(self.sigma, noise)
        return mean.view(x_t.shape)


# ---------------------------------------------------------------------------------------------
# Evaluation of several members at once
# ---------------------------------------------------------------------------------------------
EVAL_ROWS = 1 << 15  # rows of one stacked evaluation pass (members x eval batch): bounds its activations
# (baby, 32 members x 1024 users: ~5 GB of encodings and key/value caches on a GPU)


def evaluate_members(members: Sequence[Member], states: Sequence[dict[str, torch.Tensor]], split,
                     device: torch.device) -> list[dict[str, float]]:
    """`evaluate` of each member with the parameters `states[i]`, its metrics in order. Members
    with one evaluation batch size are stacked into one network, up to EVAL_ROWS rows per pass,
    and scored on the same batches; each draws its sampling noise from its generator on the device
    (MemberRNG) or else where its solo run draws it (its CPU stream). A member alone with no device
    generator is evaluated by the solo code path."""
    out: dict[int, dict[str, float]] = {}
    by_size: dict[int, list[int]] = {}
    for i, member in enumerate(members):
        by_size.setdefault(member.cfg.eval_batch_size, []).append(i)
    for size, chosen in by_size.items():
        per_pass = max(1, EVAL_ROWS // size)
        for start in range(0, len(chosen), per_pass):
            group = chosen[start:start + per_pass]
            metrics = _evaluate_stacked([members[i] for i in group], [states[i] for i in group], split, device)
            out.update(zip(group, metrics))
    return [out[i] for i in range(len(members))]


def _evaluate_stacked(members: list[Member], states: list[dict[str, torch.Tensor]], split,
                      device: torch.device) -> list[dict[str, float]]:
    cfg = members[0].cfg
    full_width = cfg.padding_mask == "query"
    for member, state in zip(members, states):
        member.solo.load_state_dict(state)
    if len(members) == 1 and members[0].rng.generator is None:
        with members[0].rng.active():
            return [evaluate(members[0].solo, split, cfg.eval_batch_size, device, full_width)]
    k = len(members)
    model = stack_models([m.solo for m in members], Layout(rngs=[m.rng for m in members])).to(device).eval()
    adrec = isinstance(model, ADRec)
    if adrec:
        denoiser, sampler = MemberDenoiser(model, members), MemberSampler([m.sched for m in members])
    metrics = [RankingMetrics() for _ in members]
    with torch.no_grad():
        for seq, target in split.batches(cfg.eval_batch_size, full_width):
            seq, target = seq.to(device), target.to(device)
            rows = seq.repeat(k, 1)
            if adrec:
                noise = _eval_noise(members, model, seq.shape[0], device)
                h = model.sample_next(rows, noise, adm=denoiser, step=sampler)
            else:
                h = model.encode(rows)[:, -1]
            h = h.view(k, seq.shape[0], -1)
            for m, member in enumerate(members):
                scores = padding_scored(h[m] @ model.item_emb.weight[m].T, member.cfg.score_padding_item)
                metrics[m].update(scores, target)
    return [m.result() for m in metrics]


def _eval_noise(members: list[Member], model: ADRec, b: int, device: torch.device) -> torch.Tensor:
    """(T+1, K*b, D): each member's `score_all` draw for a batch of b users, member-major: from its
    generator on the device, else where its solo run draws (its CPU stream; a device's global generator)."""
    steps, d = model.steps + 1, model.cfg.hidden_size
    noise = torch.empty(steps, len(members) * b, d, device=device)
    for m, member in enumerate(members):
        if member.rng.generator is not None:
            draw = torch.randn(steps, b, d, generator=member.rng.generator, device=device)
        elif device.type == "cpu":
            with member.rng.active():
                draw = torch.randn(steps, b, d)
        else:
            draw = torch.randn(steps, b, d, device=device)
        noise[:, m * b:(m + 1) * b] = draw
    return noise


# ---------------------------------------------------------------------------------------------
# The pack
# ---------------------------------------------------------------------------------------------
class Pack:
    """The members still training and their stacked model; `train_epoch` trains them one epoch
    (`run_lockstep` trains packs to their ends)."""

    def __init__(self, members: list[Member], splits: Splits, device: torch.device):
        self.members, self.splits, self.device = members, splits, device
        self.layout = Layout(rngs=[m.rng for m in members])
        self.model = stack_models([m.solo for m in members], self.layout).to(device)
        self.params = list(self.model.parameters())
        self.optimizer = MemberAdam(self.params, len(members))
        self.emb_index = next(i for i, p in enumerate(self.params) if p is self.model.item_emb.weight)
        self.pretraining = members[0].pretraining
        for m in members:
            m.lr = next(m.lrs)
        self.started = time.perf_counter()

    # --- one forward pass over every member's part -----------------------------------------------
    def _lay_out(self, parts: list[Part | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = len(parts)
        rows = [p.rows.seq.shape[0] if p else 0 for p in parts]
        width = [p.rows.seq.shape[1] if p else 0 for p in parts]
        r, w = max(rows), max(width)
        pinned = self.device.type == "cuda"  # page-locked: the copies below do not block the host
        out = torch.zeros(3, k, r, w, dtype=torch.long, pin_memory=pinned)
        for m, p in enumerate(parts):
            if p:
                out[0, m, :rows[m], :width[m]] = p.rows.seq
                out[1, m, :rows[m], :width[m]] = p.rows.tgt
                out[2, m, :rows[m], :width[m]] = p.rows.segment
        valid = out[1] > 0
        self.layout.rows, self.layout.width, self.layout.host_segment = rows, width, out[2]
        index = valid.view(-1).nonzero().squeeze(1)
        index = (index.pin_memory() if pinned else index).to(self.device, non_blocking=True)
        self.layout.target_index = list(index.split(valid.view(k, -1).sum(1).tolist()))
        seq, tgt, seg = out.to(self.device, non_blocking=True).view(3, k * r, w)  # one copy for the three
        return seq, tgt, seg

    def _draws(self, segment: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's timesteps and noise at its solo shape (ADRec.forward_train's draws, in
        its order), placed in its corner; zero elsewhere."""
        k, steps = len(self.members), self.model.steps
        seg = segment.view(k, -1, segment.shape[1])
        t = torch.zeros_like(seg)
        noise = torch.zeros(*seg.shape, d, device=segment.device)
        for m, member in enumerate(self.members):
            rows, width = self.layout.rows[m], self.layout.width[m]
            if rows == 0:
                continue
            generator = member.rng.generator
            if generator is not None:  # on the device, from the member's generator there
                seg_m = seg[m, :rows, :width]
                size = (rows, width) if member.cfg.noise_level == "token" else (rows, width + 1)
                t_m = torch.randint(0, steps, size, generator=generator, device=segment.device)
                if member.cfg.noise_level != "token":
                    t_m = t_m.gather(1, seg_m)
                t[m, :rows, :width] = t_m * (seg_m > 0)
                noise[m, :rows, :width] = torch.randn(rows, width, d, generator=generator, device=segment.device)
                continue
            seg_m = self.layout.host_segment[m, :rows, :width]
            with member.rng.active():
                if member.cfg.noise_level == "token":
                    t_m = torch.randint(0, steps, (rows, width))
                else:
                    t_m = torch.randint(0, steps, (rows, width + 1)).gather(1, seg_m)
                noise_m = torch.randn(rows, width, d)
            t[m, :rows, :width] = (t_m * (seg_m > 0)).to(segment.device)
            noise[m, :rows, :width] = noise_m.to(segment.device)
        return t.view_as(segment), noise.view(*segment.shape, d)

    def _losses(self, parts: list[Part | None], epoch: int
                ) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
        """ADRec.forward_train (or SASRec.loss in stage 1) on every member's part at once; (CE, MSE)
        per member (MSE None in stage 1; None: no part)."""
        model, k = self.model, len(self.members)
        seq, tgt, segment = self._lay_out(parts)
        if self.pretraining:
            return self._pretraining_losses(seq, tgt, segment)
        valid = tgt > 0
        segment = segments(tgt, segment)
        c, ctx = model.encode(seq, segment)
        x0 = model.item_emb(tgt)
        t, noise = self._draws(segment, x0.shape[-1])
        at = stacked_timesteps(t, k, model.steps)
        sqrt_ab = torch.cat([m.sched.sqrt_ab for m in self.members])[at]
        sqrt_1m = torch.cat([m.sched.sqrt_one_minus_ab for m in self.members])[at]
        x_t = sqrt_ab.unsqueeze(-1) * x0 + sqrt_1m.unsqueeze(-1) * noise
        x_t = torch.where(valid.unsqueeze(-1), x_t, x0)
        x0_hat, _ = MemberDenoiser(model, self.members)(c, x_t, t, ctx)
        shape = (k, seq.shape[0] // k, seq.shape[1])
        flat_hat, flat_tgt = x0_hat.reshape(-1, x0_hat.shape[-1]), tgt.view(-1)
        x0_hat, x0, segment = x0_hat.view(*shape, -1), x0.view(*shape, -1), segment.view(shape)
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for m, member in enumerate(self.members):
            rows, width = self.layout.rows[m], self.layout.width[m]
            if rows == 0:
                out.append(None)
                continue
            corner = (m, slice(rows), slice(width))
            mse = sequence_mean(((x0_hat[corner] - x0[corner]) ** 2).mean(-1), segment[corner])
            weight = model.item_emb.weight[m]
            if member.warm_up(epoch):
                weight = weight.detach()  # as the solo run's frozen table: no gradient computed
            at = self.layout.target_index[m]
            out.append((linear_cross_entropy(flat_hat[at], weight, flat_tgt[at]), mse))
        return out

    def _pretraining_losses(self, seq: torch.Tensor, tgt: torch.Tensor, segment: torch.Tensor
                            ) -> list[tuple[torch.Tensor, None] | None]:
        h = self.model.encode(seq, segment)
        flat_h, flat_tgt = h.reshape(-1, h.shape[-1]), tgt.view(-1)
        out: list[tuple[torch.Tensor, None] | None] = []
        for m, at in enumerate(self.layout.target_index):
            out.append(None if self.layout.rows[m] == 0 else
                       (linear_cross_entropy(flat_h[at], self.model.item_emb.weight[m], flat_tgt[at]), None))
        return out

    # --- one optimiser step per member ----------------------------------------------------------
    def _step(self, batches: list[tuple[torch.Tensor, torch.Tensor] | None], where: int
              ) -> list[tuple[float, int] | None]:
        """One training step of every member that has a batch: (batch loss, sequences) per member
        (None: no batch, or it diverged)."""
        parts: list[list[Part]] = []
        counts: list[int] = []
        for member, batch in zip(self.members, batches):
            counts.append(0)
            if batch is None or member.diverged:
                parts.append([])
                continue
            cfg, packed = member.cfg, train_rows(member.cfg, *batch)
            n_positions, n_sequences = int((packed.tgt > 0).sum()), packed.n_sequences
            counts[-1] = n_sequences
            max_tokens = cfg.max_tokens_per_step if not cfg.pcgrad else 2**62  # as train_epoch
            parts.append([Part(p, int((p.tgt > 0).sum()) / n_positions, p.n_sequences / n_sequences)
                          for p in packed.split(max_tokens)])
        for p in self.params:
            p.grad = None
        self.projected: dict[int, dict[int, torch.Tensor]] = {}
        batch_loss: list[float | None] = [0.0 if p else None for p in parts]
        for j in range(max(map(len, parts))):
            current = [p[j] if j < len(p) and not member.diverged else None
                       for p, member in zip(parts, self.members)]
            weighted = {}  # member -> (CE, MSE or None, loss) of this part
            for m, (member, part, losses) in enumerate(zip(self.members, current, self._losses(current, where))):
                if losses is not None:
                    ce = losses[0] * part.ce_share
                    mse = losses[1] * part.mse_share if losses[1] is not None else None
                    weighted[m] = (ce, mse, ce if mse is None else ce + member.cfg.mse_weight * mse)
            # Every member's loss value in one host sync (on a GPU, one per member would stall it K times).
            values = torch.stack([loss.detach() for _, _, loss in weighted.values()]).tolist() if weighted else []
            total, tasks = None, {}
            for (m, (ce, mse, _)), value in zip(weighted.items(), values):
                member = self.members[m]
                if not math.isfinite(value):
                    member.diverged = f"training loss became {value:.4g} at epoch {where}"
                    continue
                batch_loss[m] += value
                if mse is None:  # stage 1: CE alone (PCGrad has nothing to project)
                    total = ce if total is None else total + ce
                    continue
                if member.cfg.pcgrad:
                    tasks[m] = (ce, member.cfg.mse_weight * mse)
                    continue
                combined = (ce + member.cfg.mse_weight * mse) / (2 if member.cfg.loss_combination == "mean" else 1)
                total = combined if total is None else total + combined
            if total is not None:
                total.backward(retain_graph=bool(tasks))
            if tasks:
                self._pcgrad(tasks, where)
        updates = []
        for m, member in enumerate(self.members):
            if batch_loss[m] is None or member.diverged:
                continue
            if batch_loss[m] > DIVERGED_LOSS:
                member.diverged = f"training loss became {batch_loss[m]:.4g} at epoch {where}"
                continue
            updates.append((m, self._grads(m, member, where), member.lr, member.cfg.weight_decay))
        self.optimizer.step(updates)
        return [None if loss is None or member.diverged else (loss, n)
                for loss, n, member in zip(batch_loss, counts, self.members)]

    def _pcgrad(self, tasks: dict[int, tuple[torch.Tensor, torch.Tensor]], epoch: int) -> None:
        """train.pcgrad_backward for each member in `tasks` (m -> (CE, w * MSE) of its whole
        batch): the two task gradients of its own parameters (all but the frozen table in the
        warm-up), each projected off the other where they conflict in the order of a randperm
        from its stream, then summed or averaged; kept in self.projected[m] per parameter."""
        per_task = [torch.autograd.grad(sum(t[i] for t in tasks.values()), self.params,
                                        retain_graph=i == 0, allow_unused=True) for i in range(2)]
        for m, member in ((m, self.members[m]) for m in tasks):
            used = [i for i in range(len(self.params)) if not (i == self.emb_index and member.warm_up(epoch))]
            grads = [torch.cat([(g[i][m] if g[i] is not None else torch.zeros_like(self.params[i].data[m])).flatten()
                                for i in used]) for g in per_task]
            with member.rng.active():
                total = project_conflicts(grads, member.cfg.loss_combination == "mean")
            self.projected[m] = dict(zip(used, total.split([self.params[i].data[m].numel() for i in used])))

    def _grads(self, m: int, member: Member, epoch: int) -> list[Grad]:
        """Member m's gradient of each parameter (FROM_GRAD: its slice of the stacked .grad), None
        where its solo run has none (the frozen table in the warm-up); with
        warmup_embedding='decayed' those get a zero one, as train.optimizer_step does, so Adam's
        weight decay still moves them."""
        if member.cfg.pcgrad and not self.pretraining:  # stage 1 has one loss: nothing to project
            projected = self.projected.pop(m)
            return [projected[i].view_as(p.data[m]) if i in projected
                    else (torch.zeros_like(p.data[m]) if member.cfg.warmup_embedding == "decayed" else None)
                    for i, p in enumerate(self.params)]
        grads: list[Grad] = []
        for i, p in enumerate(self.params):
            g = None if p.grad is None or (i == self.emb_index and member.warm_up(epoch)) else FROM_GRAD
            if g is None and member.cfg.warmup_embedding == "decayed":
                g = torch.zeros_like(p.data[m])
            grads.append(g)
        return grads

    # --- epochs -----------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> None:
        """Train every member one epoch, in lock-step batch by batch; set each member's last_loss."""
        self.model.train()
        full_width = self.model.cfg.padding_mask == "query"
        streams = [self.splits.train.batches(m.cfg.batch_size, m.cfg.seed, epoch + 1000 * m.stage_of_epoch(epoch),
                                             m.cfg.bucketed_batches, full_width) for m in self.members]
        totals = [[0.0, 0] for _ in self.members]
        for batches in itertools.zip_longest(*streams):
            for m, done in enumerate(self._step(list(batches), epoch)):
                if done is not None:
                    totals[m][0] += done[0] * done[1]
                    totals[m][1] += done[1]
        for member, (total, count) in zip(self.members, totals):
            member.state.last_loss = total / max(count, 1)

    def _after_epoch(self, epoch: int) -> list[int]:
        """LR schedules, the evaluations due (all in one stacked pass), selection and reports; the
        members (by position) that stop."""
        leaving, due = [], []
        for m, member in enumerate(self.members):
            member.state.seconds = time.perf_counter() - self.started
            if member.diverged:
                leaving.append(m)
                continue
            member.lr = next(member.lrs)
            member.state.epoch = epoch
            if epoch % member.cfg.eval_every == 0 or epoch == member.max_epochs:
                due.append(m)
        results = evaluate_members([self.members[m] for m in due], [member_state(self.model, m) for m in due],
                                   self.splits.val, self.device)
        for m, metrics in zip(due, results):
            if self._select(self.members[m], m, epoch, metrics):
                leaving.append(m)
        return sorted(leaving)

    def _select(self, member: Member, m: int, epoch: int, metrics: dict[str, float]) -> bool:
        """Model selection and the report of one member's evaluation; True when it stops."""
        state = member.state
        if select(member.cfg, state, metrics, epoch, member.best_state_dict is not None):
            member.best_state_dict = {k: v.clone() for k, v in member_state(self.model, m).items()}
        stage = member.stage_of_epoch(epoch)
        log.info("pack member %d epoch %d (stage %d) loss %.4f val %s", member.index, epoch, stage,
                 state.last_loss, _fmt(metrics))
        if member.report is not None:
            member.report(_report_metrics(stage, epoch, metrics, state.best_value, state.last_loss, state.seconds),
                          None)
        return state.bad_evals >= member.cfg.patience or epoch == member.max_epochs

    def _leave(self, leaving: list[int]) -> None:
        members = [self.members[m] for m in leaving]
        for member in members:
            self._finish(member)
        tested = [m for m in members if m.result.get("val") is not None and not self.pretraining]
        for member, metrics in zip(tested, evaluate_members(tested, [m.best_state_dict for m in tested],
                                                             self.splits.test, self.device)):
            member.result["test"] = metrics
        keep = torch.tensor([m for m in range(len(self.members)) if m not in leaving], dtype=torch.long)
        self.members = [self.members[m] for m in keep.tolist()]
        self.layout.rngs = [m.rng for m in self.members]
        if self.members:
            compact(self.model, keep.to(self.device))
            self.optimizer.compact(keep.to(self.device))

    def _finish(self, member: Member) -> None:
        """A leaving member's record, all but its test metrics (`_leave` scores the leavers together)."""
        result, state = member.result, member.state
        if self.pretraining:  # train_stage1's summary; a divergence is fit's "stage 1: ..." error
            member.stage1 = {"epochs": state.epoch, "seconds": state.seconds, "val": state.best_metrics,
                             "best_epoch": state.best_epoch}
            if not member.diverged:
                member.embedding = member.best_state_dict["item_emb.weight"].detach().cpu().clone()
            return
        s2 = member.cfg.stage_epochs()[1]
        if member.diverged:
            log.warning("pack member %d: %s", member.index, member.diverged)
            result["status"], result["error"] = "diverged", member.diverged
        result["epochs"].update(stage2=min(state.epoch, s2), stage3=max(state.epoch - s2, 0))
        frac2 = min(state.epoch, s2) / max(state.epoch, 1)
        result["seconds"].update(stage2=state.seconds * frac2, stage3=state.seconds * (1 - frac2))
        result["best_epoch"] = state.best_epoch
        if member.best_state_dict is None:
            result["val"] = result["test"] = None
            return
        result["val"] = state.best_metrics

    def train_epoch(self, epoch: int) -> dict[int, dict[str, Any]]:
        """One epoch of every member still training, its evaluations and departures; returns the
        records of the members that left (by member index)."""
        self._epoch(epoch)
        leaving = self._after_epoch(epoch)
        done = {self.members[m].index: self.members[m].result for m in leaving}
        if leaving:
            self._leave(leaving)
        return done


def default_stack(device: torch.device, k: int) -> int:
    """Members per stacked network: all of them on a GPU, where a small trial's step is launch-bound;
    one on CPU, where a stacked step streams K times larger activations through memory (a pack of 8
    ml-100k members: 1.40x the seconds per member-epoch of the 8 run in sequence, README "Packs")."""
    return k if device.type == "cuda" else 1


def make_packs(members: list[Member], splits: Splits, device: torch.device, stack: int | None = None) -> list[Pack]:
    """The members as networks of `stack` members each (`default_stack` when None)."""
    stack = stack or default_stack(device, len(members))
    return [Pack(members[i:i + stack], splits, device) for i in range(0, len(members), stack)]


def run_lockstep(packs: Sequence[Pack], on_epoch: OnEpoch | None = None) -> None:
    """Train the packs epoch by epoch together, each to its members' ends; `on_epoch(epoch, done)`
    after each epoch with the records of the members that left in it."""
    epoch = 0
    while any(p.members for p in packs):
        epoch += 1
        done: dict[int, dict[str, Any]] = {}
        for pack in packs:
            if pack.members:
                done.update(pack.train_epoch(epoch))
        if on_epoch is not None:
            on_epoch(epoch, done)


# ---------------------------------------------------------------------------------------------
# fit_pack
# ---------------------------------------------------------------------------------------------
def fit_pack(cfgs: Sequence[TrialConfig], reports: Sequence[Reporter | None] | None = None, *,
             stage1_cache: str | Path | None = None, code_version: str | None = None,
             on_epoch: OnEpoch | None = None, stack: int | None = None, device_draws: bool | None = None
             ) -> list[dict[str, Any]]:
    """Train the configs as one pack (see the module docstring) and return one record per config,
    in order, as `fit` returns it. Checkpoints are not written: each report's path is None.

    `stack`: members per stacked network, the networks trained in lock-step epoch by epoch
    (`default_stack` when None: all on a GPU, one on CPU); on CPU each member equals its solo run either way.
    `device_draws`: the members draw on the device from generators of their own (default: on an
    accelerator; see MemberRNG), not from their CPU streams (which make each equal its solo CPU run).

    `on_epoch(epoch, done)` is called after every stage-2/3 epoch of the pack, once the members'
    reports of that epoch are made, with the records of the members that left the pack in it (by
    member index; complete: a caller may keep them before the pack ends). Members that never join
    (stage 1 diverged) are handed over at epoch 0.
    """
    cfgs = list(cfgs)
    check_packable(cfgs)
    reports = list(reports) if reports is not None else [None] * len(cfgs)
    if len(reports) != len(cfgs):
        raise ValueError(f"reports has {len(reports)} entries for {len(cfgs)} configs; give one per config or None")
    device, data, splits = prepare(cfgs[0])  # the members share dataset and device (PACK_FIELDS)
    env = environment(device, code_version)
    pretrained = _pretrain(cfgs, data, splits, device, Path(stage1_cache) if stage1_cache else None, stack,
                           device_draws)
    members, results = [], []
    for i, (cfg, report) in enumerate(zip(cfgs, reports)):
        member = _start_member(i, cfg, report, splits, device, env, pretrained.get(i), device_draws)
        results.append(member.result)
        if member.result["status"] == "completed":
            members.append(member)
    never_joined = {i: r for i, r in enumerate(results) if r["status"] != "completed"}
    if never_joined and on_epoch is not None:
        on_epoch(0, never_joined)
    if members:
        run_lockstep(make_packs(members, splits, device, stack), on_epoch)
    return results


Stage1 = tuple[torch.Tensor, dict[str, Any]]  # (item embeddings, summary), as cached_stage1 returns them


def _pretrain(cfgs: list[TrialConfig], data, splits: Splits, device: torch.device, cache: Path | None,
              stack: int | None = None, device_draws: bool | None = None) -> dict[int, Stage1 | str]:
    """Stage 1 of every config that has one: read from the cache where it is there, else trained
    in one stage-1 pack (SASRec members; with a cache, one member per stage-1 key, the others read
    its result as a later fit would read the cache) and written to the cache. Config index ->
    (embedding, summary), or the error of a diverged stage 1."""
    out: dict[int, Stage1 | str] = {}
    trainers: dict[str, int] = {}  # stage-1 key -> the config that trains it
    for i, cfg in enumerate(cfgs):
        if cfg.stage_epochs()[0] == 0:
            continue
        key = stage1_key(cfg, data) if cache is not None else str(i)
        path = cache / f"{key}.pt" if cache is not None else None
        if path is not None and path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            out[i] = saved["embedding"], {**saved["summary"], "cached": True, "seconds": 0.0}
        elif key not in trainers:
            trainers[key] = i
    if not trainers:
        return _share(cfgs, data, cache, out)
    members = []
    for i in trainers.values():
        cfg = cfgs[i]
        seed_everything(cfg.seed)  # as train_stage1
        model = SASRec(cfg, splits.num_items).to(device)
        members.append(Member(index=i, cfg=cfg, solo=model, rng=MemberRNG.start(draw_device(device, device_draws)),
                              result={},
                              stage1={}, report=None, lrs=cosine_lrs(cfg), pretraining=True))
    run_lockstep(make_packs(members, splits, device, stack))
    for member in members:
        if member.diverged:
            out[member.index] = member.diverged
            continue
        out[member.index] = member.embedding, member.stage1
        if cache is not None:
            _write_stage1(cache, stage1_key(member.cfg, data), member)
    return _share(cfgs, data, cache, out)


def _share(cfgs: list[TrialConfig], data, cache: Path | None, out: dict[int, Stage1 | str]
           ) -> dict[int, Stage1 | str]:
    """Give configs that share a trainer's stage-1 key its result, marked as read from the cache."""
    if cache is None:
        return out
    by_key = {stage1_key(cfgs[i], data): v for i, v in out.items()}
    for i, cfg in enumerate(cfgs):
        if i not in out and cfg.stage_epochs()[0] > 0:
            done = by_key[stage1_key(cfg, data)]
            out[i] = done if isinstance(done, str) else (done[0], {**done[1], "cached": True, "seconds": 0.0})
    return out


def _write_stage1(cache: Path, key: str, member: Member) -> None:
    """The cache file cached_stage1 writes (under its lock, atomically)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = cache / f"{key}.pt"
        if path.exists():  # another process trained the same key meanwhile: keep its file
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"embedding": member.embedding, "summary": member.stage1, "config": member.cfg.to_dict()}, tmp)
        os.replace(tmp, path)


def _start_member(index: int, cfg: TrialConfig, report: Reporter | None, splits: Splits, device: torch.device,
                  env: dict[str, str], stage1: Stage1 | str | None, device_draws: bool | None = None) -> Member:
    """What `fit` does before its stage-2/3 loop: init, stage 1's embedding, the seed for stage 2."""
    result: dict[str, Any] = {"config": cfg.to_dict(), "status": "completed", "error": None,
                              "epochs": {"stage1": 0, "stage2": 0, "stage3": 0},
                              "seconds": {"stage1": 0.0, "stage2": 0.0, "stage3": 0.0}, "env": dict(env)}
    seed_everything(cfg.seed)
    solo = ADRec(cfg, splits.num_items).to(device)
    summary: dict[str, Any] = {"epochs": 0, "seconds": 0.0, "val": {}}
    if isinstance(stage1, str):  # the member never joins the pack; its record is fit's
        result.update(status="diverged", error=f"stage 1: {stage1}", val=None, test=None, best_epoch=0)
    elif stage1 is not None:
        embedding, summary = stage1
        with torch.no_grad():
            solo.item_emb.weight.copy_(embedding.to(device))
        result["epochs"]["stage1"], result["seconds"]["stage1"] = summary["epochs"], summary["seconds"]
        seed_everything(cfg.seed + 1)
    if result["status"] == "completed":
        result["stage1_val"] = summary.get("val", {})
        result["stage1_cached"] = bool(summary.get("cached", False))
    schedule = NoiseSchedule.build(cfg.noise_schedule, cfg.diffusion_steps, cfg.beta_a, cfg.beta_b)
    return Member(index=index, cfg=cfg, solo=solo, rng=MemberRNG.start(draw_device(device, device_draws)), result=result,
                  stage1=summary, report=report, lrs=cosine_lrs(cfg), sched=schedule.tensors(device))
