"""The Ray Tune trainable: a thin shell that turns Ray's config into a `TrialConfig` and calls `fit`.

Every evaluation is reported with the full training state as a checkpoint, so a retry after a crash
(`FailureConfig`) or a resumed sweep continues from the last evaluation. Only validation metrics
reach the tuner: the test metrics of the selected model travel inside the final checkpoint
(`fit_result.json`), which no scheduler or searcher reads, and the trial table picks them up there.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from adrec.config import TrialConfig
from adrec.record import FINISHED, FIT_RESULT, META_KEYS, split_config

log = logging.getLogger("sweeps.trainable")

REPORT_FILE = "report.json"  # the metrics of the evaluation a checkpoint belongs to
FAULT_ENV = "ADREC_FAULT_ONCE"  # test hook: a marker folder; each trial raises once after its first checkpoint
METRIC = "objective"  # what schedulers and searchers read: best-so-far validation value, maximised
MODE = "max"


@dataclass(frozen=True)
class TrialContext:
    """Sweep-level settings every trial needs, handed over with `tune.with_parameters`."""

    stage1_cache: str
    fault_once: str | None = None  # the marker folder of the fault hook (from ADREC_FAULT_ONCE)
    code_version: str | None = None  # the driver's checkout: workers may run from a copy without .git


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Train one trial under Ray Tune."""
    from adrec.train import fit

    cfg, _ = split_config(config)
    _limit_threads()
    trial_id = tune.get_context().get_trial_id()
    node_id = _node_id()
    restored = tune.get_checkpoint()
    resume_dir: Path | None = None
    resumed_epoch = 0
    scratch = Path(tempfile.mkdtemp(prefix="adrec-trial-"))
    try:
        if restored is not None:
            resume_dir = Path(restored.to_directory(str(scratch / "resume")))
            if (resume_dir / FIT_RESULT).exists():  # the trial had finished: report its end again
                _report_final(json.loads((resume_dir / FIT_RESULT).read_text()), cfg, node_id, scratch)
                return
            resumed_epoch = int(json.loads((resume_dir / REPORT_FILE).read_text()).get("epoch", 0))
            log.info("trial %s resumes from its checkpoint at epoch %d", trial_id, resumed_epoch)

        def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            out = {**metrics, "resumed_from_epoch": resumed_epoch, "node_id": node_id}
            if checkpoint_dir is None:
                tune.report(out)
                return
            (Path(checkpoint_dir) / REPORT_FILE).write_text(json.dumps(metrics))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
            _maybe_fault(context.fault_once, trial_id)

        result = fit(cfg, report, resume_from=resume_dir, stage1_cache=context.stage1_cache,  # blow-ups -> "diverged"
                     code_version=context.code_version)
        result["ray"] = {"trial_id": trial_id, "node_id": node_id, "resumed_from_epoch": resumed_epoch}
        _report_final(result, cfg, node_id, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _report_final(result: dict[str, Any], cfg: TrialConfig, node_id: str, scratch: Path) -> None:
    """The last report: validation metrics of the selected model and `final=1`; test metrics only in
    the checkpoint. A diverged run sets `diverged=1` and the searcher records it as failed."""
    val = result.get("val") or {}
    objective = val.get(cfg.select_metric, -math.inf)
    out: dict[str, Any] = {METRIC: objective, "final": 1, "diverged": int(result.get("status") == "diverged"),
                           "node_id": node_id}
    out.update({f"val_{k}": v for k, v in val.items()})
    folder = scratch / "final"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FIT_RESULT).write_text(json.dumps(result, default=str))
    tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(folder)))


def _maybe_fault(marker_dir: str | None, trial_id: str) -> None:
    if not marker_dir:
        return
    marker = Path(marker_dir) / f"{trial_id}.fault"
    try:
        with open(marker, "x") as f:  # exclusive create: once per trial, even across retries
            f.write("raised\n")
    except FileExistsError:
        return
    raise RuntimeError(f"{FAULT_ENV}: injected fault in trial {trial_id} after its first checkpoint")


def _limit_threads() -> None:
    """Use the CPUs Ray gave this trial, not every core of the node."""
    import torch

    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # noqa: BLE001 - outside Ray (direct calls in tests) keep torch's default
        return
    torch.set_num_threads(max(1, int(cpus)))


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return os.uname().nodename
