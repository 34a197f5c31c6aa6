"""The Ray Tune trainable: a thin shell that turns Ray's config into a `TrialConfig` and calls `fit`.

Every evaluation is reported with the full training state as a checkpoint, so a retry after a crash
(`FailureConfig`) or a resumed sweep continues from the last evaluation. Only validation metrics
reach the tuner: the test metrics of the selected model travel inside the final checkpoint
(`fit_result.json`), which no scheduler or searcher reads, and the trial table picks them up there.

A pack trial (`--pack-size`, a config with a `pack` list) trains its members with
`adrec.pack.fit_pack` and reports once, at the end (`run_pack`).
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
from adrec.record import FIT_RESULT, PACK_KEY, PACK_RESULTS, is_pack, member_id, split_config

log = logging.getLogger("sweeps.trainable")

REPORT_FILE = "report.json"  # the metrics of the evaluation a checkpoint belongs to
FAULT_ENV = "ADREC_FAULT_ONCE"  # test hook: a marker folder; each trial raises once after its first checkpoint
# (a pack: once after training, before its final report)
METRIC = "objective"  # what schedulers and searchers read: best-so-far validation value, maximised
MODE = "max"


@dataclass(frozen=True)
class TrialContext:
    """Sweep-level settings every trial needs, handed over with `tune.with_parameters`."""

    stage1_cache: str
    fault_once: str | None = None  # the marker folder of the fault hook (from ADREC_FAULT_ONCE)
    code_version: str | None = None  # the driver's checkout: workers may run from a copy without .git
    swept: tuple[str, ...] = ()  # the space's knobs: a pack member's TensorBoard HParams


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Train one trial under Ray Tune (a pack trial when its config holds a pack: `run_pack`)."""
    from adrec.train import fit

    if is_pack(config):
        run_pack(config, context)
        return
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


def run_pack(config: dict[str, Any], context: TrialContext) -> None:
    """Train a pack trial's members as one model (`adrec.pack.fit_pack`) and report once at the end.

    A pack writes no checkpoint while it trains: a retry or a resumed sweep trains it again from
    the start. Its final checkpoint holds every member's fit record (`pack_results.json`, in member
    order); the one report Ray sees carries the best member's validation metrics as `objective`
    (only validation metrics reach the tuner, as for a solo trial).
    """
    from adrec.pack import fit_pack
    from sweeps.progress import write_member_events

    cfgs = [split_config(m["config"])[0] for m in config[PACK_KEY]]
    _limit_threads()
    trial_id = tune.get_context().get_trial_id()
    node_id = _node_id()
    restored = tune.get_checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix="adrec-pack-"))
    try:
        if restored is not None:  # only the final checkpoint exists: the pack had finished; report it again
            folder = Path(restored.to_directory(str(scratch / "resume")))
            if (folder / PACK_RESULTS).exists():
                results = json.loads((folder / PACK_RESULTS).read_text())
                tune.report(_pack_result(results, cfgs, node_id),
                            checkpoint=tune.Checkpoint.from_directory(str(folder)))
                return
        evaluations: list[list[dict[str, Any]]] = [[] for _ in cfgs]  # each member's reports, for TensorBoard
        results = fit_pack(cfgs, [_collector(e) for e in evaluations], stage1_cache=context.stage1_cache,
                           code_version=context.code_version)
        folder = scratch / "final"
        folder.mkdir(parents=True)
        for i, (result, cfg) in enumerate(zip(results, cfgs)):
            result["ray"] = {"trial_id": member_id(trial_id, i), "pack_id": trial_id, "node_id": node_id,
                             "resumed_from_epoch": 0}
            write_member_events(folder / member_id(trial_id, i), config[PACK_KEY][i]["config"], context.swept,
                                [*evaluations[i], final_metrics(result, cfg)])
        (folder / PACK_RESULTS).write_text(json.dumps(results, default=str))
        _maybe_fault(context.fault_once, trial_id)  # test hook: a crash after training, before the report
        tune.report(_pack_result(results, cfgs, node_id), checkpoint=tune.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _collector(into: list[dict[str, Any]]) -> Any:
    """A fit_pack reporter that keeps a member's evaluations (a pack writes no checkpoint meanwhile)."""
    return lambda metrics, _checkpoint_dir: into.append(dict(metrics))


def _pack_result(results: list[dict[str, Any]], cfgs: list[TrialConfig], node_id: str) -> dict[str, Any]:
    """The pack's one report: the best member's validation metrics (`objective` is what Tune reads).
    Each member's own curves and HParams are TensorBoard runs in the final checkpoint."""
    values = [((r.get("val") or {}).get(c.select_metric), i) for i, (r, c) in enumerate(zip(results, cfgs))]
    finite = [(float(v), i) for v, i in values if v is not None and math.isfinite(float(v))]
    best = max(finite, key=lambda pair: pair[0]) if finite else None
    val = (results[best[1]].get("val") or {}) if best else {}
    out: dict[str, Any] = {METRIC: best[0] if best else -math.inf, "final": 1,
                           "diverged": int(all(r.get("status") == "diverged" for r in results)),
                           "node_id": node_id, "pack_size": len(results), "best_member": best[1] if best else -1}
    out.update({f"val_{k}": v for k, v in val.items()})
    return out


def final_metrics(result: dict[str, Any], cfg: TrialConfig) -> dict[str, Any]:
    """A finished trial's last metrics for Tune: the selected model's validation values, `objective`,
    `final=1` and `diverged` (a diverged run: the searcher records it as failed)."""
    val = result.get("val") or {}
    return {METRIC: val.get(cfg.select_metric, -math.inf), "final": 1,
            "diverged": int(result.get("status") == "diverged"), **{f"val_{k}": v for k, v in val.items()}}


def _report_final(result: dict[str, Any], cfg: TrialConfig, node_id: str, scratch: Path) -> None:
    """The last report: validation metrics of the selected model and `final=1`; test metrics only in
    the checkpoint. A diverged run sets `diverged=1` and the searcher records it as failed."""
    out = {**final_metrics(result, cfg), "node_id": node_id}
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
