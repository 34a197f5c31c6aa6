"""`fit(cfg)`: ADRec's three training stages, evaluation, checkpoints and the result record.

Stage 1 pre-trains the item embeddings with a SASRec-style CE run (no positional embedding) to
early stopping; its result can be shared between trials through a cache (one writer per key).
Stage 2 trains CAM and ADM on CE + MSE with the embeddings frozen (no gradient; with the authors'
`warmup_embedding='decayed'` Adam's weight decay still moves them, as their PCGrad wrapper lets
it); stage 3 trains everything. Stages 2 and 3 are one run of the authors' loop: one optimiser,
one cosine schedule, an evaluation every `eval_every` epochs, early stopping after `patience`
evaluations without improvement, the best model kept.

Each loop iteration runs in a fixed order: train one epoch -> step the LR schedule -> evaluate
and checkpoint when due -> report -> stop when patience or the epoch budget runs out.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from adrec.batches import EvalSequences, Packed, TrainSequences, pack
from adrec.config import TrialConfig
from adrec.data import SplitData, load_dataset
from adrec.metrics import METRIC_NAMES, RankingMetrics
from adrec.model import ADRec, MostPopular, SASRec

log = logging.getLogger("adrec.train")

Reporter = Callable[[dict[str, Any], "Path | None"], None]
DIVERGED_LOSS = 1e4  # CE starts near ln(N) ~ 7-10; a loss this large only comes from blow-up
CHECKPOINT_FILE = "checkpoint.pt"


class Diverged(RuntimeError):
    """The training loss became NaN/inf or exploded."""


# ---------------------------------------------------------------------------------------------
# Environment and reproducibility
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(name)


def flush_denormals(device: torch.device) -> None:
    """On CPU, treat subnormal floats as zero. Late in training the softmax over thousands of items
    yields probabilities below 1e-38, and CPUs handle such operands in slow microcode; zeroing them
    changes results by less than 1e-38."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def use_tf32(device: torch.device) -> None:
    """TF32 matmuls on GPU, as the authors' trainer (`torch.set_float32_matmul_precision('high')`)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def code_version() -> str:
    """Git commit of this checkout (+'-dirty'), or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, version: str | None = None) -> dict[str, str]:
    """Where a trial ran; `version` is the code version (default: this checkout's)."""
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"code_version": version or code_version(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "accelerator": accelerator, "host": platform.node()}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Data views
# ---------------------------------------------------------------------------------------------
@dataclass
class Splits:
    train: TrainSequences
    val: EvalSequences
    test: EvalSequences
    num_items: int

    @classmethod
    def build(cls, data: SplitData, max_len: int) -> "Splits":
        return cls(
            train=TrainSequences.build(data.train, max_len),
            val=EvalSequences.build(data.train, data.val, max_len),
            test=EvalSequences.build([h + [v] for h, v in zip(data.train, data.val)], data.test, max_len),
            num_items=data.num_items,
        )


def evaluate(model: nn.Module, split: EvalSequences, batch_size: int, device: torch.device,
             full_width: bool = False) -> dict[str, float]:
    """Full-ranking HR@k / NDCG@k over all items, averaged over users. `full_width` keeps every
    batch padded to max_len (query-masked attention sees the padding, as in the authors' code)."""
    was_training = model.training
    model.eval()
    metrics = RankingMetrics()
    with torch.no_grad():
        for seq, target in split.batches(batch_size, full_width):
            metrics.update(model.score_all(seq.to(device)), target.to(device))
    model.train(was_training)
    return metrics.result()


# ---------------------------------------------------------------------------------------------
# One training loop, shared by stage 1 (SASRec) and stages 2+3 (ADRec)
# ---------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Everything that changes while a loop runs; saved in checkpoints."""

    epoch: int = 0  # epochs trained in this loop
    best_value: float = -math.inf
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_per_metric: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    bad_evals: int = 0
    last_loss: float = float("nan")
    seconds: float = 0.0


def improved(cfg: TrialConfig, state: LoopState, metrics: dict[str, float]) -> bool:
    """By `select_metric`, or as the authors do: any metric beat its own best so far (they compare
    percentages rounded to 4 decimals, strictly, against bests that start at 0)."""
    if cfg.selection == "any_metric":
        better = [k for k, v in metrics.items()
                  if round(v * 100, 4) > round(state.best_per_metric.get(k, 0.0) * 100, 4)]
        for k in better:
            state.best_per_metric[k] = metrics[k]
        return bool(better)
    return metrics[cfg.select_metric] > state.best_value


def select(cfg: TrialConfig, state: LoopState, metrics: dict[str, float], epoch: int, have_model: bool) -> bool:
    """Record one evaluation in `state` (best metrics, patience); True when this model is now the kept one.

    Under any_metric a run whose metrics stay at 0 never "improves"; it still keeps its first
    evaluated model (and its metrics) rather than ending with none, while patience counts as usual.
    """
    better = improved(cfg, state, metrics)
    keep = better or not have_model
    if keep:
        state.best_value = metrics[cfg.select_metric]
        state.best_metrics, state.best_epoch = metrics, epoch
    state.bad_evals = 0 if better else state.bad_evals + 1
    return keep


def make_optimizer(cfg: TrialConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.cosine_t_max)
    return optimizer, scheduler


def project_conflicts(grads: list[torch.Tensor], mean: bool) -> torch.Tensor:
    """PCGrad (Yu et al. 2020): each task's flat gradient loses its component along every other task's
    gradient it conflicts with (negative dot), visited in random order; then they are averaged or summed."""
    projected = []
    for i, g in enumerate(grads):
        g = g.clone()
        for j in torch.randperm(len(grads)).tolist():
            dot = torch.dot(g, grads[j])
            if j != i and dot < 0:
                g -= dot / grads[j].pow(2).sum().clamp(min=1e-12) * grads[j]
        projected.append(g)
    return torch.stack(projected).mean(0) if mean else torch.stack(projected).sum(0)


def pcgrad_backward(model: nn.Module, losses: list[torch.Tensor], mean: bool = False) -> None:
    """PCGrad (Yu et al. 2020): project each task gradient off the others it conflicts with, then
    sum them (or average them: `mean`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i, loss in enumerate(losses):
        g = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]))
    total = project_conflicts(grads, mean)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = total[offset:offset + n].view_as(p).clone()
        offset += n


def backward(cfg: TrialConfig, model: nn.Module, ce: torch.Tensor, mse: torch.Tensor | None) -> None:
    """Accumulate the gradients of CE and mse_weight * MSE into `.grad`, combined as the authors'
    PCGrad wrapper does with `loss_combination='mean'` ((g_CE + w g_MSE) / 2, also without
    projection) or summed; with `pcgrad`, projected first (the caller passes whole batches)."""
    losses = [ce] if mse is None else [ce, cfg.mse_weight * mse]
    mean = cfg.loss_combination == "mean"
    if cfg.pcgrad and len(losses) > 1:
        pcgrad_backward(model, losses, mean)
    else:
        (sum(losses) / (len(losses) if mean else 1)).backward()


def optimizer_step(cfg: TrialConfig, optimizer: torch.optim.Optimizer) -> None:
    """One optimiser step. With `warmup_embedding='decayed'`, as the authors' PCGrad wrapper, every
    parameter without a gradient (the frozen warm-up embedding) first gets a zero one, so Adam's
    weight decay still moves it; with 'frozen' Adam skips it and it stays bitwise unchanged."""
    if cfg.warmup_embedding == "decayed":
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
    optimizer.step()


def train_rows(cfg: TrialConfig, seq: torch.Tensor, tgt: torch.Tensor) -> Packed:
    """A batch's rows: its sequences packed end to end (key masking), or as given, one
    left-padded sequence per row (query masking: padding is attended, so it stays)."""
    if cfg.padding_mask == "query":
        return Packed(seq, tgt, (tgt > 0).long())
    return pack(seq, tgt)


def train_epoch(cfg: TrialConfig, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainSequences,
                epoch_seed: int, device: torch.device, epoch: int | None = None) -> float:
    """One pass over the training sequences; returns the mean loss. Raises Diverged on blow-up.

    Each batch is packed (short sequences share a row; see `train_rows`) and processed in micro-batches of at most
    `cfg.max_tokens_per_step` positions whose gradients accumulate into one optimiser step; the
    parts are weighted so the step equals the full batch's (CE is a mean over positions, MSE a
    mean over sequences). `epoch_seed` fixes the batch order; `epoch` only names the epoch in
    messages."""
    model.train()
    where = epoch if epoch is not None else epoch_seed
    total, count = 0.0, 0
    max_tokens = cfg.max_tokens_per_step if not cfg.pcgrad else 2**62  # PCGrad needs whole-batch task gradients
    full_width = cfg.padding_mask == "query"
    for seq, tgt in train.batches(cfg.batch_size, cfg.seed, epoch_seed, cfg.bucketed_batches, full_width):
        packed = train_rows(cfg, seq, tgt)
        optimizer.zero_grad(set_to_none=True)
        n_positions, n_sequences = int((packed.tgt > 0).sum()), packed.n_sequences
        batch_loss = 0.0
        for part in packed.split(max_tokens):
            seq_m, tgt_m = part.seq.to(device, non_blocking=True), part.tgt.to(device, non_blocking=True)
            _, parts = model.loss(seq_m, tgt_m, part.segment.to(device, non_blocking=True))
            ce = parts["ce"] * (int((part.tgt > 0).sum()) / n_positions)
            mse = parts["mse"] * (part.n_sequences / n_sequences) if "mse" in parts else None
            loss = ce if mse is None else ce + cfg.mse_weight * mse
            if not torch.isfinite(loss):
                raise Diverged(f"training loss became {loss.item():.4g} at epoch {where}")
            backward(cfg, model, ce, mse)
            batch_loss += loss.item()
        if batch_loss > DIVERGED_LOSS:
            raise Diverged(f"training loss became {batch_loss:.4g} at epoch {where}")
        optimizer_step(cfg, optimizer)
        total += batch_loss * n_sequences
        count += n_sequences
    return total / max(count, 1)


@dataclass
class Loop:
    """A model, its optimiser and a state, trained with periodic evaluation and early stopping."""

    cfg: TrialConfig
    model: nn.Module
    splits: Splits
    device: torch.device
    max_epochs: int
    stage_of_epoch: Callable[[int], int]  # epoch number (1-based) -> stage it belongs to
    on_epoch_start: Callable[[int], None] = lambda epoch: None
    state: LoopState = field(default_factory=LoopState)
    best_state_dict: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.optimizer, self.scheduler = make_optimizer(self.cfg, self.model)

    def run(self, on_eval: Callable[["Loop", dict[str, float]], None], progress: bool = False,
            label: str = "") -> None:
        started = time.perf_counter() - self.state.seconds
        bar = _progress(progress, self.max_epochs, self.state.epoch, label)
        while self.state.epoch < self.max_epochs:
            epoch = self.state.epoch + 1
            self.on_epoch_start(epoch)
            self.state.last_loss = train_epoch(self.cfg, self.model, self.optimizer, self.splits.train,
                                               epoch + 1000 * self.stage_of_epoch(epoch), self.device, epoch)
            self.scheduler.step()
            self.state.epoch = epoch
            bar.update(1)
            bar.set_postfix(loss=f"{self.state.last_loss:.3f}", best=f"{max(self.state.best_value, 0):.4f}")
            if epoch % self.cfg.eval_every == 0 or epoch == self.max_epochs:
                metrics = evaluate(self.model, self.splits.val, self.cfg.eval_batch_size, self.device,
                                   self.cfg.padding_mask == "query")
                if select(self.cfg, self.state, metrics, epoch, self.best_state_dict is not None):
                    self.best_state_dict = copy.deepcopy(self.model.state_dict())
                self.state.seconds = time.perf_counter() - started
                on_eval(self, metrics)
                if self.state.bad_evals >= self.cfg.patience:
                    break
        self.state.seconds = time.perf_counter() - started
        bar.close()

    def restore_best(self) -> None:
        if self.best_state_dict is not None:
            self.model.load_state_dict(self.best_state_dict)

    # checkpoints ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "state": self.state.__dict__.copy(),
                "best_state_dict": self.best_state_dict, "rng": rng_state()}

    def load(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.state = LoopState(**snap["state"])
        self.on_epoch_start(self.state.epoch + 1)  # freeze/unfreeze as at that epoch, before the optimiser loads
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        self.best_state_dict = snap["best_state_dict"]
        set_rng_state(snap["rng"])


def _progress(enabled: bool, total: int, initial: int, label: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="epoch", leave=False)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Stage 1: pre-trained item embeddings (cached)
# ---------------------------------------------------------------------------------------------
STAGE1_FIELDS = ("dataset", "max_users", "seed", "hidden_size", "cam_blocks", "heads", "max_len", "dropout",
                 "emb_dropout", "lr", "weight_decay", "cosine_t_max", "batch_size", "bucketed_batches",
                 "stage1_epochs", "eval_every", "patience", "selection", "select_metric", "padding_mask",
                 "score_padding_item")


def stage1_key(cfg: TrialConfig, data: SplitData) -> str:
    values = {name: getattr(cfg, name) for name in STAGE1_FIELDS}
    values["data"] = data.source
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:20]


def train_stage1(cfg: TrialConfig, splits: Splits, device: torch.device, epochs: int, progress: bool
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train SASRec to early stopping; return the best model's item embeddings and a summary."""
    seed_everything(cfg.seed)
    model = SASRec(cfg, splits.num_items).to(device)
    loop = Loop(cfg, model, splits, device, epochs, stage_of_epoch=lambda e: 1)
    loop.run(lambda lp, m: log.info("stage 1 epoch %d val %s", lp.state.epoch, _fmt(m)), progress, "stage 1")
    loop.restore_best()
    summary = {"epochs": loop.state.epoch, "seconds": loop.state.seconds, "val": loop.state.best_metrics,
               "best_epoch": loop.state.best_epoch}
    return model.item_emb.weight.detach().cpu().clone(), summary


def cached_stage1(cfg: TrialConfig, data: SplitData, splits: Splits, device: torch.device, epochs: int,
                  cache: Path | None, progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Stage 1 through the cache: the first trial with a key trains and writes, the others wait and read."""
    if cache is None:
        return train_stage1(cfg, splits, device, epochs, progress)
    cache.mkdir(parents=True, exist_ok=True)
    key = stage1_key(cfg, data)
    path = cache / f"{key}.pt"
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per key; readers wait for it
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            return saved["embedding"], {**saved["summary"], "cached": True, "seconds": 0.0}
        embedding, summary = train_stage1(cfg, splits, device, epochs, progress)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"embedding": embedding, "summary": summary, "config": cfg.to_dict()}, tmp)
        os.replace(tmp, path)
        return embedding, summary


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------
def prepare(cfg: TrialConfig) -> tuple[torch.device, Any, Splits]:
    """What every run of `cfg` sets up first: its device (subnormals flushed, TF32 as the authors)
    and its dataset (`SplitData`) with the splits."""
    device = resolve_device(cfg.device)
    flush_denormals(device)
    use_tf32(device)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.max_users)
    return device, data, Splits.build(data, cfg.max_len)


def fit(cfg: TrialConfig, report: Reporter | None = None, *, resume_from: str | Path | None = None,
        stage1_cache: str | Path | None = None, progress: bool = False,
        code_version: str | None = None) -> dict[str, Any]:
    """Train one trial end to end and return its record (see README, "The result record").
    `code_version` names the code in the record (a sweep passes its driver's checkout; default:
    `git describe` of this one)."""
    device, data, splits = prepare(cfg)
    result: dict[str, Any] = {"config": cfg.to_dict(), "status": "completed", "error": None,
                              "epochs": {"stage1": 0, "stage2": 0, "stage3": 0},
                              "seconds": {"stage1": 0.0, "stage2": 0.0, "stage3": 0.0},
                              "env": environment(device, code_version)}
    if cfg.model == "most_popular":
        return _fit_most_popular(cfg, data, splits, device, result, report)
    if cfg.model == "sasrec":
        return _fit_sasrec(cfg, splits, device, result, report, progress)
    return _fit_adrec(cfg, data, splits, device, result, report, resume_from,
                      Path(stage1_cache) if stage1_cache else None, progress)


def _fit_most_popular(cfg, data, splits, device, result, report):
    counts = torch.zeros(splits.num_items + 1)
    for history in data.train:
        counts += torch.bincount(torch.as_tensor(history), minlength=splits.num_items + 1)[: splits.num_items + 1]
    model = MostPopular(counts).to(device)
    result["val"] = evaluate(model, splits.val, cfg.eval_batch_size, device)
    # For the test split the validation items are history too: count them.
    counts += torch.bincount(torch.as_tensor(data.val), minlength=splits.num_items + 1)[: splits.num_items + 1]
    result["test"] = evaluate(MostPopular(counts).to(device), splits.test, cfg.eval_batch_size, device)
    result["best_epoch"] = 0
    if report is not None:
        report(_report_metrics(1, 0, result["val"], result["val"][cfg.select_metric], 0.0, 0.0), None)
    return result


def _fit_sasrec(cfg, splits, device, result, report, progress):
    seed_everything(cfg.seed)
    model = SASRec(cfg, splits.num_items).to(device)
    loop = Loop(cfg, model, splits, device, cfg.stage1_epochs, stage_of_epoch=lambda e: 1)
    return _run_and_finish(cfg, loop, splits, device, result, report, progress, "sasrec",
                           stage_epochs=lambda lp: {"stage1": lp.state.epoch},
                           stage_seconds=lambda lp: {"stage1": lp.state.seconds})


def _fit_adrec(cfg, data, splits, device, result, report, resume_from, cache, progress):
    s1, s2, s3 = cfg.stage_epochs()
    snapshot = _load_checkpoint(resume_from) if resume_from else None
    seed_everything(cfg.seed)
    model = ADRec(cfg, splits.num_items).to(device)
    if snapshot is not None:
        result["epochs"]["stage1"], result["seconds"]["stage1"] = snapshot["stage1"]["epochs"], snapshot["stage1"]["seconds"]
        stage1 = snapshot["stage1"]
    elif s1 > 0:
        try:
            embedding, stage1 = cached_stage1(cfg, data, splits, device, s1, cache, progress)
        except Diverged as exc:
            result.update(status="diverged", error=f"stage 1: {exc}", val=None, test=None, best_epoch=0)
            return result
        with torch.no_grad():
            model.item_emb.weight.copy_(embedding.to(device))
        result["epochs"]["stage1"], result["seconds"]["stage1"] = stage1["epochs"], stage1["seconds"]
        seed_everything(cfg.seed + 1)  # stage 2 starts from the same RNG state whether stage 1 was cached or not
    else:
        stage1 = {"epochs": 0, "seconds": 0.0, "val": {}}

    def freeze_for(epoch: int) -> None:
        # The embedding leaves autograd during the warm-up; what Adam then does with it is
        # `warmup_embedding`'s choice (optimizer_step).
        model.item_emb.weight.requires_grad_(epoch > s2)

    loop = Loop(cfg, model, splits, device, s2 + s3, stage_of_epoch=lambda e: 2 if e <= s2 else 3,
                on_epoch_start=freeze_for)
    if snapshot is not None:
        loop.load(snapshot["loop"])
    result["stage1_val"] = stage1.get("val", {})
    result["stage1_cached"] = bool(stage1.get("cached", False))

    def epochs(lp: Loop) -> dict[str, int]:
        return {"stage1": stage1["epochs"], "stage2": min(lp.state.epoch, s2), "stage3": max(lp.state.epoch - s2, 0)}

    def seconds(lp: Loop) -> dict[str, float]:
        frac2 = min(lp.state.epoch, s2) / max(lp.state.epoch, 1)
        return {"stage1": stage1["seconds"], "stage2": lp.state.seconds * frac2,
                "stage3": lp.state.seconds * (1 - frac2)}

    return _run_and_finish(cfg, loop, splits, device, result, report, progress, "adrec", epochs, seconds,
                           extra_checkpoint={"stage1": stage1})


def _run_and_finish(cfg, loop: Loop, splits, device, result, report, progress, label,
                    stage_epochs, stage_seconds, extra_checkpoint=None) -> dict[str, Any]:
    def on_eval(lp: Loop, metrics: dict[str, float]) -> None:
        stage = lp.stage_of_epoch(lp.state.epoch)
        log.info("%s epoch %d (stage %d) loss %.4f val %s", label, lp.state.epoch, stage, lp.state.last_loss, _fmt(metrics))
        if report is None:
            return
        payload = _report_metrics(stage, lp.state.epoch, metrics, lp.state.best_value, lp.state.last_loss,
                                  lp.state.seconds)
        with _checkpoint_dir(lp, extra_checkpoint) as path:
            report(payload, path)

    try:
        loop.run(on_eval, progress, label)
    except Diverged as exc:
        log.warning("%s: %s", label, exc)
        result["status"], result["error"] = "diverged", str(exc)
    result["epochs"].update(stage_epochs(loop))
    result["seconds"].update(stage_seconds(loop))
    result["best_epoch"] = loop.state.best_epoch
    if loop.best_state_dict is None:  # diverged before the first evaluation
        result["val"] = result["test"] = None
        return result
    loop.restore_best()
    result["val"] = loop.state.best_metrics
    result["test"] = evaluate(loop.model, splits.test, cfg.eval_batch_size, device, cfg.padding_mask == "query")
    return result


def _report_metrics(stage: int, epoch: int, metrics: dict[str, float], best: float, loss: float,
                    seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"stage": stage, "epoch": epoch, "objective": best, "loss": loss, "seconds": seconds}
    out.update({f"val_{k}": v for k, v in metrics.items()})
    return out


@contextlib.contextmanager
def _checkpoint_dir(loop: Loop, extra: dict[str, Any] | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="adrec-ckpt-"))
    try:
        torch.save({"loop": loop.snapshot(), **(extra or {})}, path / CHECKPOINT_FILE)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CHECKPOINT_FILE if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise ValueError(f"resume_from={str(path)!r} holds no {CHECKPOINT_FILE}; pass a directory handed to report()")
    return torch.load(file, map_location="cpu", weights_only=False)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={metrics[k]:.4f}" for k in METRIC_NAMES if k in metrics)
