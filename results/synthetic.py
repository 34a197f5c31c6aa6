"""Trial tables whose truth is known: the planted tables of the tests and the benchmark.

`make_table(truth, ...)` writes what a sweep writes (the trial record's columns, every TrialConfig
field, inactive knobs null): paired configs on every dataset with seed repeats, and optionally
the rest of a sweep (confirm runs, optimize trials completed and pruned, baselines, a failed
trial, the authors' default config). `truth(dataset, config) -> mean metric` plants the effects;
`diverge(dataset, config) -> probability` plants runs that diverge.

`PLANTED` is the standard truth (`planted_truth`, `planted_divergence`, `planted_space`) on d1, d2, d3,
seed noise sd 0.004:
- lr: a peak at 1e-3, -0.02 per squared decade away from it, on every dataset  -> matters
- positional_encoding x aggregation: +0.03 only for rotary AND cross_attention  -> both matter
  through an interaction (neither has any other effect)
- lambda_uncertainty (active only with aggregation=linear): -0.02 above 0.01, on d1 only
- noise_level: token +0.00125 / sequence -0.00125 everywhere  -> real but below the seed noise
- mse_weight: no effect, but sampled higher when positional_encoding=rotary (confounded)
- noise_schedule, beta_a (only with noise_schedule=beta), diffusion_steps, stage_plan,
  stage2_epochs (only with three_stage): no effect
- aggregation=adaln diverges in half of its d2 runs
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from adrec.config import KNOBS, METRICS, TrialConfig, active_values
from adrec.record import columns

SEED_SD = 0.004
BASE = {"d1": 0.05, "d2": 0.03, "d3": 0.08, "d4": 0.06, "d5": 0.04, "d6": 0.07}

Truth = Callable[[str, Mapping[str, Any]], float]


@dataclass(frozen=True)
class Space:
    """What the synthetic sweep samples: categorical choices or a numeric (low, high)."""

    params: Mapping[str, tuple]

    def sample(self, n: int, rng: np.random.Generator,
               confound: Callable[[dict, np.random.Generator], dict] | None = None) -> list[dict]:
        configs = []
        for _ in range(n):
            cfg: dict[str, Any] = {}
            for name, spec in self.params.items():
                knob = KNOBS[name]
                if knob.scale == "categorical":
                    cfg[name] = spec[int(rng.integers(len(spec)))]
                    continue
                low, high = spec
                u = rng.uniform()
                value = (np.exp(np.log(low) + u * (np.log(high) - np.log(low)))
                         if knob.scale == "log" else low + u * (high - low))
                cfg[name] = int(round(value)) if knob.kind == "int" else float(value)
            if confound is not None:
                cfg.update(confound(cfg, rng))
            configs.append(cfg)
        return configs


PLANTED_SPACE = Space({
    "lr": (1e-4, 1e-2), "positional_encoding": ("none", "learned", "sinusoidal", "rotary"),
    "aggregation": ("linear", "cross_attention", "adaln", "concat"),
    "lambda_uncertainty": (1e-4, 1.0), "noise_level": ("token", "sequence"),
    "mse_weight": (0.1, 10.0), "noise_schedule": ("trunc_lin", "cosine", "beta"),
    "beta_a": (0.2, 5.0), "diffusion_steps": (24, 200),
    "stage_plan": ("three_stage", "no_warmup"), "stage2_epochs": (1, 20)})

# the full space of sweeps/spaces.py (MLP denoisers only with linear/concat), for the benchmark
FULL_SPACE = Space({
    "lambda_uncertainty": (1e-4, 1.0),
    "noise_schedule": ("linear", "cosine", "sqrt", "trunc_lin", "trunc_cos", "pw_lin", "beta"),
    "beta_a": (0.2, 5.0), "beta_b": (0.5, 20.0), "diffusion_steps": (24, 200),
    "stage_plan": ("three_stage", "no_warmup", "no_pretrain"), "stage1_epochs": (20, 200),
    "stage2_epochs": (1, 20), "positional_encoding": ("none", "learned", "sinusoidal", "rotary"),
    "noise_level": ("token", "sequence"), "denoiser": ("transformer", "mlp"),
    "aggregation": ("linear", "cross_attention", "adaln", "concat"), "mse_weight": (0.1, 10.0),
    "lr": (1e-4, 1e-2)})


def mlp_branch(cfg: dict, rng: np.random.Generator) -> dict:
    """An MLP denoiser has no attention: only linear or concat aggregation."""
    if cfg.get("denoiser") == "mlp" and cfg.get("aggregation") not in ("linear", "concat"):
        return {"aggregation": ("linear", "concat")[int(rng.integers(2))]}
    return {}


def planted_confound(cfg: dict, rng: np.random.Generator) -> dict:
    """mse_weight (no effect) drawn from its upper decade when positional_encoding=rotary."""
    if cfg["positional_encoding"] == "rotary":
        return {"mse_weight": float(10 ** rng.uniform(0.0, 1.0))}
    return {}


def planted_truth(dataset: str, cfg: Mapping[str, Any]) -> float:
    mean = BASE[dataset] - 0.02 * (np.log10(cfg["lr"]) + 3) ** 2
    if cfg["positional_encoding"] == "rotary" and cfg["aggregation"] == "cross_attention":
        mean += 0.03
    if dataset == "d1" and cfg["aggregation"] == "linear" and cfg["lambda_uncertainty"] > 0.01:
        mean -= 0.02
    mean += 0.00125 * (1 if cfg["noise_level"] == "token" else -1)
    return mean


def planted_divergence(dataset: str, cfg: Mapping[str, Any]) -> float:
    return 0.5 if dataset == "d2" and cfg["aggregation"] == "adaln" else 0.0


def _metrics(val: float, rng: np.random.Generator, test: bool = True) -> dict[str, float]:
    out = {}
    test_value = val + rng.normal(0, 0.002)
    for split, v in (("val", val), ("test", test_value if test else np.nan)):
        for m in METRICS:
            k = int(m.split("@")[1])
            f = {5: 0.5, 10: 0.75, 20: 1.0}.get(k, 1.0)
            out[f"{split}_{m}"] = (2 if m.startswith("HR") else 1) * v * f
    return out


def make_table(truth: Truth = planted_truth, n_configs: int = 160, seeds: int = 3,
               datasets: tuple[str, ...] = ("d1", "d2", "d3"), space: Space = PLANTED_SPACE,
               confound: Callable | None = planted_confound,
               diverge: Callable[[str, Mapping[str, Any]], float] | None = planted_divergence,
               extras: bool = True, noise_sd: float = SEED_SD, seed: int = 0) -> pd.DataFrame:
    """A trial table in the sweep's format with the planted truth (module docstring)."""
    rng = np.random.default_rng(seed)
    defaults = TrialConfig().to_dict()
    configs = [{"config_id": f"c{i:04d}", **c}
               for i, c in enumerate(space.sample(n_configs, rng, confound))]
    rows: list[dict] = []

    def add(dataset: str, cfg: dict, phase: str, seed_: int, status: str | None = None,
            value: float | None = None, **more: Any) -> None:
        full = active_values({**defaults, **{k: v for k, v in cfg.items() if k != "config_id"}})
        if status is None:
            p = diverge(dataset, full) if diverge is not None else 0.0
            status = "diverged" if rng.uniform() < p else "completed"
        val = truth(dataset, full) + rng.normal(0, noise_sd) if value is None else value
        metrics = _metrics(val, rng, test=status == "completed")
        if status in ("diverged", "failed"):
            metrics = {k: np.nan for k in metrics}
        rows.append({**full, "sweep": "synthetic", "dataset": dataset,
                     "trial_id": f"t{len(rows):06d}", "phase": phase, "status": status,
                     "seed": seed_, "config_id": cfg.get("config_id"), "model": "adrec",
                     **metrics, "error": {"diverged": "diverged: loss is NaN at epoch 3",
                                          "failed": "RuntimeError: boom"}.get(status), **more})

    default_cfg = {"config_id": "default", **{k: defaults[k] for k in space.params}}
    for dataset in datasets:
        for cfg in configs:
            for s in range(seeds):
                add(dataset, cfg, "paired", 100 + s)
        if not extras:
            continue
        for s in range(seeds):
            add(dataset, default_cfg, "paired", 100 + s)
        best = max(configs, key=lambda c: truth(dataset, active_values({**defaults, **c})))
        for s in range(3):
            add(dataset, {**best, "config_id": f"best_{dataset}"}, "confirm", 200 + s)
        for j in range(min(4, len(configs))):
            opt = {**configs[j], "config_id": None}
            add(dataset, opt, "optimize", 300 + j, status="completed")
            add(dataset, opt, "optimize", 400 + j, status="pruned", value=BASE[dataset] * 3)
        for model in ("most_popular", "sasrec"):
            add(dataset, {"config_id": None}, "baseline", 1, status="completed", model=model,
                value=BASE[dataset] * (0.3 if model == "most_popular" else 0.8))
        add(dataset, configs[0], "optimize", 500, status="failed")
    table = pd.DataFrame(rows)
    for stage in ("stage1", "stage2", "stage3"):
        table[f"epochs_{stage}"] = 5.0
        table[f"seconds_{stage}"] = 1.0
    table = table.assign(node_id="n0", accelerator="cpu", code_version="synthetic",
                         torch_version="", ray_version="", optuna_version="")
    return table.reindex(columns=[c for c in columns() if c in table] +
                         [c for c in table if c not in columns()])
