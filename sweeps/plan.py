"""What a sweep will run: datasets x phases, the jobs of each phase, and their cost (no Ray here).

Phases, in order:
- paired: one seeded Latin-hypercube list of configs (`paired_configs.json`), the same on every
  dataset, `repeats` seeds each, no early stopping: the pairs importance and cross-dataset
  comparisons are built on;
- optimize: `num_samples` TPE trials per dataset (one Optuna study each), ASHA per dataset;
- confirm: the `confirm_top` best configs of each dataset (mean validation value over its completed
  paired/optimize runs) re-run with `repeats` fresh seeds, against the winner's curse;
- baseline: most_popular / sasrec once per dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from adrec.config import METRICS, TrialConfig
from adrec.record import PHASES, dataset_key, split_config, write_json
from sweeps.spaces import Space, parse_space

CONFIRM_SEED_OFFSET = 1000  # confirm seeds start here above --seed: never a seed the search used
# Interactions per registry dataset (shared/datasets/README.md), for the --dry-run cost estimate.
INTERACTIONS = {"ml-100k": 54_413, "baby": 92_823, "beauty": 94_148, "sports": 185_718, "toys": 95_420,
                "yelp": 316_354}
# Measured on this project's busy 2-core machine, one thread per trial, the authors' sizes: a stage-1
# epoch of ml-100k (54k interactions) took ~14 s, an ADRec epoch with its evaluation ~24 s (1.7x).
# Seconds per stage-1 epoch per 1000 interactions; an order of magnitude, not a promise.
CPU_SECONDS_PER_KILO_INTERACTION_EPOCH = 0.26
ADREC_EPOCH_COST = 1.7  # an ADRec epoch (denoising + evaluation) in stage-1 epochs


class SweepError(ValueError):
    """Bad input: reported as one message, exit code 2, before any trial starts."""


def parse_metric(text: str) -> str:
    """--metric: `val_NDCG@20` or `NDCG@20` -> `NDCG@20` (the TrialConfig.select_metric)."""
    name = text[4:] if text.startswith("val_") else text
    if text.startswith("test_"):
        raise SweepError(f"--metric={text!r} would select on the test set; use the validation metric "
                         f"val_{text[5:]}")
    if name not in METRICS:
        raise SweepError(f"--metric={text!r} is not one of {', '.join('val_' + m for m in METRICS)}")
    return name


@dataclass(frozen=True)
class Plan:
    name: str
    space: Space
    datasets: tuple[str, ...]
    paired_samples: int
    repeats: int
    num_samples: int
    confirm_top: int
    baselines: tuple[str, ...]
    metric: str  # TrialConfig.select_metric, e.g. NDCG@20
    seed: int
    max_users: int
    data_dir: str

    def settings(self) -> dict[str, Any]:
        """What identifies the sweep: saved in sweep.json; a re-run must match it to resume."""
        return {"space_name": self.space.name, "space": self.space.to_dict(), "datasets": list(self.datasets),
                "paired_samples": self.paired_samples, "repeats": self.repeats, "num_samples": self.num_samples,
                "confirm_top": self.confirm_top, "baselines": list(self.baselines), "metric": self.metric,
                "seed": self.seed, "max_users": self.max_users, "data_dir": self.data_dir}

    @classmethod
    def from_settings(cls, name: str, s: dict[str, Any]) -> "Plan":
        return cls(name=name, space=parse_space(s["space_name"], s["space"]), datasets=tuple(s["datasets"]),
                   paired_samples=s["paired_samples"], repeats=s["repeats"], num_samples=s["num_samples"],
                   confirm_top=s["confirm_top"], baselines=tuple(s["baselines"]), metric=s["metric"],
                   seed=s["seed"], max_users=s["max_users"], data_dir=s["data_dir"])

    # --- configs --------------------------------------------------------------------------------
    def base_config(self, dataset: str) -> dict[str, Any]:
        """TrialConfig values every trial on `dataset` shares (no None: TensorBoard hparams reject it)."""
        base = {**self.space.fixed, "dataset": dataset, "data_dir": self.data_dir, "select_metric": self.metric,
                "seed": self.seed, "model": "adrec"}
        if self.max_users:
            base["max_users"] = self.max_users
        return base

    def paired_configs(self) -> list[dict[str, Any]]:
        return [{"config_id": f"p{i:03d}", "values": v}
                for i, v in enumerate(self.space.space_filling(self.paired_samples, self.seed))]

    def paired_jobs(self, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        jobs = []
        for ds in self.datasets:
            for c in configs:
                for r in range(self.repeats):
                    jobs.append(self._job("paired", ds, c["config_id"], {**c["values"], "seed": self.seed + r}))
        return jobs

    def confirm_jobs(self, table: pd.DataFrame) -> list[dict[str, Any]]:
        jobs = []
        col = f"val_{self.metric}"
        fields = [f for f in TrialConfig().to_dict() if f not in ("seed",)]
        for ds in self.datasets:
            done = table[(table["dataset"] == ds) & (table["status"] == "completed") & (table["model"] == "adrec")
                         & table["phase"].isin(["paired", "optimize"])]
            if done.empty:
                continue
            ranked = done.groupby("config_id")[col].mean().sort_values(ascending=False, kind="stable")
            for cid in ranked.index[: self.confirm_top]:
                row = done[done["config_id"] == cid].iloc[0]
                values = {f: _plain(row[f]) for f in fields if f in row.index}
                values = {f: v for f, v in values.items() if v is not None}  # inactive knobs are null
                for r in range(self.repeats):
                    seed = self.seed + CONFIRM_SEED_OFFSET + r
                    jobs.append(self._job("confirm", ds, str(cid), {**values, "seed": seed}))
        return jobs

    def baseline_jobs(self) -> list[dict[str, Any]]:
        return [self._job("baseline", ds, f"b-{b}", {"model": b}) for ds in self.datasets for b in self.baselines]

    def _job(self, phase: str, ds: str, config_id: str, values: dict[str, Any]) -> dict[str, Any]:
        config = {**self.base_config(ds), **values, "phase": phase, "config_id": config_id}
        config["job"] = f"{phase}/{dataset_key(ds)}/{config_id}/s{config['seed']}"
        return {"job": config["job"], "config": full_config(config)}

    # --- counts and cost ------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Trials per dataset and phase (confirm: at most; it needs completed configs to pick from)."""
        return {"paired": self.paired_samples * self.repeats, "optimize": self.num_samples,
                "confirm": min(self.confirm_top, self.paired_samples + self.num_samples) * self.repeats,
                "baseline": len(self.baselines)}

    def total(self) -> int:
        return len(self.datasets) * sum(self.counts().values())

    def cost_table(self) -> pd.DataFrame:
        """Trials and an upper-bound epoch/CPU-hour estimate per dataset and phase."""
        cfg = TrialConfig.from_dict({k: v for k, v in self.base_config(self.datasets[0]).items()})
        s1 = self.space.max_value("stage1_epochs")
        s23 = self.space.max_value("stage2_epochs") + self.space.max_value("stage3_epochs")
        rows = []
        for ds in self.datasets:
            kilo = INTERACTIONS.get(ds, 100_000) / 1000 * (min(1.0, self.max_users / 1000) if self.max_users else 1.0)
            for phase, n in self.counts().items():
                if phase == "baseline":
                    epochs = n and sum(0 if b == "most_popular" else cfg.stage1_epochs for b in self.baselines)
                    per = epochs / max(n, 1)
                else:
                    per = s1 + ADREC_EPOCH_COST * s23
                hours = n * per * kilo * CPU_SECONDS_PER_KILO_INTERACTION_EPOCH / 3600
                rows.append({"dataset": ds, "phase": phase, "trials": n, "max_epochs_per_trial": math.ceil(per),
                             "cpu_hours_at_most": round(hours, 2)})
        return pd.DataFrame(rows)


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate a trial's Ray config and spell out every TrialConfig field (complete HParams in
    TensorBoard, the same keys for every trial); the sweep's own keys stay beside them."""
    cfg, meta = split_config(config)
    return {**cfg.to_dict(), **meta}


def _plain(value: Any) -> Any:
    """numpy/pandas scalars from a parquet row -> plain Python (bools stay bools, NaN -> None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


__all__ = ["PHASES", "Plan", "SweepError", "dataset_key", "full_config", "parse_metric", "write_json"]
