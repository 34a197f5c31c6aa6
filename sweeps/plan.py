"""What a sweep will run: datasets x phases, the jobs of each phase, and their cost (no Ray here).

Phases, in order:
- paired: one seeded Latin-hypercube list of configs (`paired_configs.json`), the same on every
  dataset, `repeats` seeds each, no early stopping: the pairs importance and cross-dataset
  comparisons are built on;
- optimize: `num_samples` TPE trials per dataset (one Optuna study each), ASHA per dataset;
- confirm: the `confirm_top` best configs of each dataset (mean validation value over its completed
  paired/optimize runs) re-run with `repeats` fresh seeds, against the winner's curse, and the
  authors' default config (`config_id` "default") with the same seeds, so that the report's
  default-vs-tuned comparison has both on an equal footing;
- baseline: most_popular / sasrec once per dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd

from adrec.config import METRICS, TrialConfig
from adrec.data import REGISTRY
from adrec.record import PACK_KEY, PHASES, dataset_key, split_config, write_json
from sweeps.spaces import Space, parse_space

CONFIRM_SEED_OFFSET = 1000  # confirm seeds start here above --seed: never a seed the search used
DEFAULT_CONFIG_ID = "default"  # the authors' default config, re-run in the confirm phase
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
            picked: list[tuple[str, dict[str, Any]]] = []
            for cid in ranked.index[: self.confirm_top]:
                row = done[done["config_id"] == cid].iloc[0]
                values = {f: _plain(row[f]) for f in fields if f in row.index}
                picked.append((str(cid), {f: v for f, v in values.items() if v is not None}))  # inactive: null
            if not any(self.is_default(values) for _, values in picked):
                picked.append((DEFAULT_CONFIG_ID, {}))
            for cid, values in picked:
                for r in range(self.repeats):
                    seed = self.seed + CONFIRM_SEED_OFFSET + r
                    jobs.append(self._job("confirm", ds, cid, {**values, "seed": seed}))
        return jobs

    def is_default(self, values: Mapping[str, Any]) -> bool:
        """Whether a config has the authors' default for every knob the space sweeps (an inactive,
        absent knob counts as default: another knob already differs or it cannot act)."""
        default = TrialConfig.from_dict(self.base_config(self.datasets[0])).to_dict()
        for param in self.space.params:
            value, want = values.get(param.field), default[param.field]
            if isinstance(want, float) and value is not None:
                if not math.isclose(float(value), want, rel_tol=1e-9):
                    return False
            elif value is not None and value != want:
                return False
        return True

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
                "confirm": self.confirm_configs() * self.repeats,
                "baseline": len(self.baselines)}

    def confirm_configs(self) -> int:
        """At most: the top configs, and the authors' default unless it is among them."""
        top = min(self.confirm_top, self.paired_samples + self.num_samples)
        return top + 1 if top else 0

    def total(self) -> int:
        return len(self.datasets) * sum(self.counts().values())

    def cost_table(self, pack_size: int = 1) -> pd.DataFrame:
        """Trials and cost per dataset and phase: see `estimate_cost`."""
        return estimate_cost(self, pack_size=pack_size)


# --------------------------------------------------------------------------------------------------
# Packs: the fixed phases' jobs grouped into pack trials (--pack-size)
# --------------------------------------------------------------------------------------------------
PACKED_PHASES = ("paired", "confirm")  # fixed job lists (optimise packs are asked of TPE: StudySearcher)


def pack_jobs(jobs: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Group a fixed phase's jobs into pack jobs of at most `size` members; deterministic.

    Jobs may share a pack only when `adrec.pack.PACK_FIELDS` agree (dataset, architecture, padding):
    they are grouped by those values, in order of first appearance, and each group is filled in
    job order with whole configs (all seeds of one `config_id`) while they fit, so the seeds of a
    config share a pack whenever `size` >= their number (a config with more seeds is cut into
    chunks of `size`). Choose `size` a multiple of the seeds per config for full packs. A job that
    is not ADRec (a baseline) or ends up alone stays a plain job, trained by `fit` as without packs.
    A pack job is `{"job": <first member's job>+<others>, "config": {phase, dataset, model, job,
    config_id, "pack": [member jobs]}}`.
    """
    from adrec.pack import PACK_FIELDS, check_packable  # imported here: only packing needs torch

    if size < 1:
        raise SweepError(f"--pack-size={size} must be >= 1 (1 = one trial per Ray trial, no packs)")
    out: list[dict[str, Any]] = []
    groups: dict[tuple, list[list[dict[str, Any]]]] = {}  # PACK_FIELDS values -> configs -> their jobs
    for job in jobs:
        cfg = job["config"]
        if size == 1 or cfg.get("model") != "adrec":
            out.append(job)
            continue
        configs = groups.setdefault(tuple(repr(cfg.get(f)) for f in PACK_FIELDS), [])
        if configs and configs[-1][0]["config"].get("config_id") == cfg.get("config_id"):
            configs[-1].append(job)
        else:
            configs.append([job])
    for configs in groups.values():
        for members in _fill(configs, size):
            check_packable([split_config(m["config"])[0] for m in members])
            out.append(members[0] if len(members) == 1 else pack_job(members))
    return out


def _fill(configs: list[list[dict[str, Any]]], size: int) -> list[list[dict[str, Any]]]:
    """Next fit: whole configs into the current pack while they fit, chunks of `size` for a larger one."""
    packs: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for config_jobs in configs:
        if len(current) + len(config_jobs) > size and current:
            packs.append(current)
            current = []
        for job in config_jobs:
            current.append(job)
            if len(current) == size:
                packs.append(current)
                current = []
    if current:
        packs.append(current)
    return packs


def pack_job(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Member jobs ({"job", "config"}) -> one pack job: `{"job": <first job>+<others>, "config": ...}`."""
    first = members[0]["config"]
    ids = list(dict.fromkeys(str(m["config"].get("config_id")) for m in members))
    key = f"{members[0]['job']}+{len(members) - 1}"
    config = {"phase": first["phase"], "dataset": first["dataset"], "model": first["model"], "job": key,
              "config_id": "+".join(ids), PACK_KEY: [{"job": m["job"], "config": m["config"]} for m in members]}
    return {"job": key, "config": config}


def confirm_ray_trials(plan: "Plan", size: int) -> tuple[int, int]:
    """Least and most Ray trials of the confirm phase (all datasets): its configs are picked during the
    sweep; all of one architecture fill packs, all of different ones get a pack (or more) each."""
    configs = plan.confirm_configs()
    if not configs:
        return 0, 0
    seeds = [{}] * plan.repeats
    least = len(_fill([list(seeds) for _ in range(configs)], size))
    most = configs * len(_fill([list(seeds)], size))
    return len(plan.datasets) * least, len(plan.datasets) * most


def pack_counts(jobs: list[dict[str, Any]], size: int) -> tuple[int, int]:
    """(Ray trials, of which packs) for a job list with `size`."""
    packed = pack_jobs(jobs, size)
    return len(packed), sum(PACK_KEY in j["config"] for j in packed)


# --------------------------------------------------------------------------------------------------
# Cost: what --dry-run prints
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """Seconds one trial spends on one dataset when it has its node to itself."""

    stage1: float  # a stage-1 (SASRec) epoch
    adrec: float  # a stage-2/3 epoch
    eval: float  # a validation pass (ADRec: T = 32 reverse steps)


@dataclass(frozen=True)
class NodeType:
    name: str
    unit: str  # what its hours are counted in
    units_per_node: int  # GPUs (or CPU cores) of one node
    trials_per_unit: int  # trials sharing one GPU (or core)
    share_speedup: float  # their throughput together against one trial alone
    speeds: Mapping[str, Speed]
    # K -> throughput of a pack of K members on one unit against one trial alone (`bench --pack K`)
    pack_speedups: Mapping[int, float] = field(default_factory=dict)

    def sharing(self, pack_size: int = 1) -> tuple[float, float, str]:
        """(a unit's throughput against one trial alone, how much longer one trial takes, how trials
        share a unit) when ADRec trials run as packs of `pack_size`; without a measurement for that
        size, one trial per process."""
        if pack_size > 1 and pack_size in self.pack_speedups:
            speedup = self.pack_speedups[pack_size]
            return speedup, pack_size / speedup, f"packs of {pack_size}, measured x{speedup:.2f} per unit"
        how = f"no pack figures for size {pack_size} here: one trial per process" if pack_size > 1 else ""
        return self.share_speedup, self.trials_per_unit / self.share_speedup, how


# GPU: one H200, `python -m adrec bench --device cuda` (README, docs/cluster.md): stage-3 s per epoch and
# per validation pass; stage 1 (not measured there) at 0.6 of an ADRec epoch, its ratio on the CPU. Four
# trials sharing the GPU ran 402 short baby trials per hour against 218 alone (docs/cluster.md): x1.84.
_H200 = {"ml-100k": (0.07, 0.06), "baby": (0.42, 0.80), "beauty": (0.48, 0.58), "toys": (0.49, 0.66),
         "sports": (0.75, 0.83), "yelp": (1.21, 1.15)}
# CPU: README's figures for this 2-core machine (one trial on both cores: ml-100k 2.3 / 3.6 / 1.72 s,
# baby 5.4 / 9.7 / 7.74 s) times 1.5 for one trial per core as a sweep runs them (measured: 3.3 s per
# ml-100k stage-1 epoch on one thread of a busy machine against 2.3 s on two); the other datasets scale
# from baby as they do on the GPU.
_CPU = {"ml-100k": Speed(3.45, 5.4, 2.6), "baby": Speed(8.1, 14.6, 11.6)}
for _name, (_epoch, _eval) in _H200.items():
    _CPU.setdefault(_name, Speed(_CPU["baby"].stage1 * _epoch / _H200["baby"][0], _CPU["baby"].adrec * _epoch /
                                 _H200["baby"][0], _CPU["baby"].eval * _eval / _H200["baby"][1]))
NODE_TYPES: dict[str, NodeType] = {
    # A pack of 8 ml-100k trials on this machine (networks of one in lock-step, the CPU layout): 1.07x the
    # seconds per member-epoch of the same 8 run one after another (`python -m adrec bench --dataset
    # ml-100k --pack 8`, median of 3 rounds; README "Packs").
    "cpu": NodeType("2-core CPU machine, one trial per core", "CPU-core-hours", 2, 1, 1.0, _CPU, {8: 1 / 1.07}),
    "h200": NodeType("H200 GPU node, 4 trials per GPU (--gpus-per-trial 0.25)", "GPU-hours", 1, 4, 1.84,
                     {k: Speed(0.6 * e, e, v) for k, (e, v) in _H200.items()}),
}
TRIAL_OVERHEAD_S = 10.0  # a trial's process, imports and data loading (the smoke sweep: 8-12 s on CPU)
# Where trials stop by patience (eval_every 5, patience 4), README's accuracy runs: ml-100k's stage 1 at
# 85-125 epochs (mean 109) and stage 3 at 65-85 (75); baby's at 50 and 30, taken for the other datasets.
TYPICAL_STOP = {"ml-100k": (109, 75), "baby": (50, 30)}
ASHA_REDUCTION = 3  # sweeps.searchers.PerDatasetASHA's reduction factor


def trial_epochs(cfg: TrialConfig, dataset: str, expected: bool) -> tuple[int, int, int]:
    """Epochs per stage a trial trains: at most its budget; expected, where patience usually stops it."""
    s1, s2, s3 = cfg.stage_epochs() if cfg.model == "adrec" else (cfg.stage1_epochs * (cfg.model == "sasrec"), 0, 0)
    if not expected:
        return s1, s2, s3
    stop1, stop3 = TYPICAL_STOP.get(dataset_key(dataset), TYPICAL_STOP["baby"])
    return min(s1, stop1), s2, min(s3, stop3)


def asha_fraction(epochs: int, eval_every: int, grace: int) -> float:
    """Expected share of `epochs` ADRec epochs an optimise trial trains under ASHA: every trial reaches
    the first rung (`grace` evaluations), one in 3 the next, one in 9 the one after, ..."""
    if epochs <= 0:
        return 1.0
    done, rung, share, total = 0, grace * eval_every, 1.0, 0.0
    while done < epochs:
        stop = min(epochs, rung)
        total += share * (stop - done)
        done, rung, share = stop, rung * ASHA_REDUCTION, share / ASHA_REDUCTION
    return total / epochs


def trial_seconds(cfg: TrialConfig, node: NodeType, expected: bool, asha: bool = False,
                  stage1: bool = True) -> float:
    """Seconds of one trial alone on a unit of `node`; `stage1=False` when the stage-1 cache has it.

    Each trial ends with a test pass; SASRec's evaluations (stage 1, the baseline) count half an
    ADRec pass, which runs T reverse steps (measured at T = 32); most_popular's two passes are
    scoring only (a tenth).
    """
    key = dataset_key(cfg.dataset)
    speed = node.speeds.get(key, node.speeds["baby"])
    users = REGISTRY[key].users if key in REGISTRY else None
    size = min(1.0, cfg.max_users / users) if cfg.max_users and users else 1.0
    if cfg.model == "most_popular":
        return TRIAL_OVERHEAD_S + size * 2 * 0.1 * speed.eval
    e1, e2, e3 = trial_epochs(cfg, cfg.dataset, expected)
    every = cfg.eval_every
    steps = 1 + (512 / cfg.batch_size - 1) / 7  # per-step costs: batch 64 took ~2x batch 512's epoch (ml-100k)
    seconds = 0.0
    if stage1 or cfg.model != "adrec":
        seconds += e1 * speed.stage1 * steps + math.ceil(e1 / every) * 0.5 * speed.eval
    if cfg.model == "adrec":
        epochs = e2 + e3
        if asha:
            epochs *= asha_fraction(epochs, every, math.ceil(e2 / every) + 1)
        seconds += (epochs * speed.adrec * steps
                    + (math.ceil(epochs / every) + 1) * speed.eval * cfg.diffusion_steps / 32)
    else:
        seconds += 0.5 * speed.eval
    return TRIAL_OVERHEAD_S + seconds * size


def estimate_cost(plan: Plan, node_types: Mapping[str, NodeType] = NODE_TYPES, pack_size: int = 1) -> pd.DataFrame:
    """Per dataset and phase: trials, and per node type the expected and the ceiling unit-hours and the
    longest trial.

    expected: trials stop where README's runs stopped by patience, optimise trials are pruned by
    ASHA (one in 3 passes each rung), stage 1 is trained once per stage-1 key (settings and seed) and
    shared through the stage-1 cache. ceiling: every trial trains every epoch of its budget and its
    own stage 1. Optimise and confirm configs are not known before the run: the space's own
    space-filling sample stands in for them. A unit-hour is a GPU-hour (trials sharing a GPU count
    their share) or a CPU-core-hour. With `pack_size` > 1 the ADRec phases share units as packs
    where the node type has a figure for that size (`NodeType.sharing`).
    """
    stand_ins = plan.space.space_filling(max(8, plan.num_samples, plan.confirm_top), plan.seed + 1)
    rows = []
    for ds in plan.datasets:
        key = dataset_key(ds)
        jobs = {"paired": [j["config"] for j in plan.paired_jobs(plan.paired_configs()) if f"/{key}/" in j["job"]],
                "optimize": [plan._job("optimize", ds, "o", v)["config"] for v in stand_ins],
                "confirm": [plan._job("confirm", ds, "c", {**v, "seed": plan.seed + CONFIRM_SEED_OFFSET + i % plan.repeats})
                            ["config"] for i, v in enumerate(stand_ins)],
                "baseline": [j["config"] for j in plan.baseline_jobs() if f"/{key}/" in j["job"]]}
        for phase, n in plan.counts().items():
            configs = [split_config(c)[0] for c in jobs[phase]]
            row: dict[str, Any] = {"dataset": ds, "phase": phase, "trials": n}
            for node_key, node in node_types.items():
                speedup, slow, _ = node.sharing(pack_size if phase != "baseline" else 1)
                for what, seconds in _phase_seconds(configs, phase, node).items():
                    row[f"{node_key}_{what}_h"] = n * float(np.mean(seconds)) / speedup / 3600 if n else 0.0
                    row[f"{node_key}_{what}_longest_s"] = max(seconds) * slow if n else 0.0
            rows.append(row)
    return pd.DataFrame(rows)


def _phase_seconds(configs: list[TrialConfig], phase: str, node: NodeType) -> dict[str, list[float]]:
    """Seconds of each stand-in trial of a phase: expected (stage 1 only for a new stage-1 key) and ceiling."""
    from adrec.train import STAGE1_FIELDS  # imported here: only an estimate needs torch

    seen: set[tuple] = set()
    out: dict[str, list[float]] = {"expected": [], "ceiling": []}
    for cfg in configs or [TrialConfig()]:
        key = tuple(getattr(cfg, f) for f in STAGE1_FIELDS)
        out["expected"].append(trial_seconds(cfg, node, True, asha=phase == "optimize", stage1=key not in seen))
        out["ceiling"].append(trial_seconds(cfg, node, False))
        seen.add(key)
    return out


def wall_hours(table: pd.DataFrame, node_key: str, node: NodeType, nodes: int, what: str) -> float:
    """Hours on `nodes` nodes: phase after phase, each as long as its unit-hours spread over every unit
    (trials packed) but never shorter than its longest trial."""
    hours = 0.0
    for _, part in table.groupby("phase", sort=False):
        spread = part[f"{node_key}_{what}_h"].sum() / (node.units_per_node * nodes)
        hours += max(spread, part[f"{node_key}_{what}_longest_s"].max() / 3600) if part["trials"].sum() else 0.0
    return hours


def cost_lines(plan: Plan, table: pd.DataFrame | None = None,
               node_types: Mapping[str, NodeType] = NODE_TYPES, pack_size: int = 1) -> list[str]:
    """--dry-run's cost summary: per node type, expected and ceiling unit-hours and wall-clock (the
    table from `estimate_cost` with the same `pack_size`)."""
    table = estimate_cost(plan, node_types, pack_size) if table is None else table
    lines = ["cost (expected: typical early stopping, ASHA pruning, shared stage 1; ceiling: every epoch of "
             "every trial):"]
    for key, node in node_types.items():
        exp_h, ceil_h = table[f"{key}_expected_h"].sum(), table[f"{key}_ceiling_h"].sum()
        how = node.sharing(pack_size)[2]
        lines.append(f"  {node.name}{f' ({how})' if how else ''}: expected {_amount(exp_h)} {node.unit}, "
                     f"ceiling {_amount(ceil_h)}")
        for count in (1, 8):
            lines.append(f"    wall-clock on {count} such node{'s' * (count > 1)}: expected "
                         f"{_duration(wall_hours(table, key, node, count, 'expected'))}, ceiling "
                         f"{_duration(wall_hours(table, key, node, count, 'ceiling'))}")
    lines.append("  from README's bench figures (H200 and this 2-core machine) and its early-stopping epochs; "
                 "an order of magnitude, not a promise")
    return lines


def _amount(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.2g}" if hours < 1 else f"{hours:.1f}"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


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


__all__ = ["NODE_TYPES", "PACKED_PHASES", "PHASES", "NodeType", "Plan", "Speed", "SweepError", "cost_lines", "dataset_key",
           "estimate_cost", "full_config", "pack_counts", "pack_job", "pack_jobs", "parse_metric", "trial_seconds", "write_json"]
