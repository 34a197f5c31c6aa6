"""The Ray Tune trainable: a thin shell that turns Ray's config into a `TrialConfig` and calls `fit`.

Every evaluation is reported with the full training state as a checkpoint, so a retry after a crash
(`FailureConfig`) or a resumed sweep continues from the last evaluation. Only validation metrics
reach the tuner: the test metrics of the selected model travel inside the final checkpoint
(`fit_result.json`), which no scheduler or searcher reads, and the trial table picks them up there.

A pack trial (`--pack-size`, a config with a `pack` list) trains its members with
`adrec.pack.fit_pack` (`run_pack`): it reports once, at the end, and in the optimise phase also
once per evaluation round (`PackProgress`).
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
from adrec.record import FIT_RESULT, PACK_KEY, PACK_PROGRESS, PACK_RESULTS, is_pack, member_id, split_config

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
    """Train a pack trial's members as one model (`adrec.pack.fit_pack`).

    A pack writes no model checkpoint while it trains: a retry or a resumed sweep trains it again
    from the start. Its final checkpoint holds every member's fit record (`pack_results.json`, in
    member order); the one report Ray sees there carries the best member's validation metrics as
    `objective` (only validation metrics reach the tuner, as for a solo trial) and each member's
    objective and status. In the optimise phase a pack also reports every evaluation round as it
    trains (`PackProgress`), so the scheduler can stop it as it stops a solo trial.
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
        reported_epoch = 0
        if restored is not None:
            folder = Path(restored.to_directory(str(scratch / "resume")))
            if (folder / PACK_RESULTS).exists():  # the pack had finished: report its end again
                results = json.loads((folder / PACK_RESULTS).read_text())
                tune.report(_pack_result(results, cfgs, node_id),
                            checkpoint=tune.Checkpoint.from_directory(str(folder)))
                return
            if (folder / PACK_PROGRESS).exists():  # it trains again, silent up to the round it had reported
                reported_epoch = int(json.loads((folder / PACK_PROGRESS).read_text())["epoch"])
                log.info("pack %s trains again; it reports again after epoch %d", trial_id, reported_epoch)
        live = (PackProgress(config, cfgs, context, trial_id, node_id, scratch, reported_epoch)
                if config.get("phase") == "optimize" else None)
        evaluations = live.evaluations if live else [[] for _ in cfgs]  # each member's reports, for TensorBoard
        results = fit_pack(cfgs, [_collector(e) for e in evaluations], stage1_cache=context.stage1_cache,
                           code_version=context.code_version, on_epoch=live.on_epoch if live else None)
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


class PackProgress:
    """An optimise-phase pack's reports while it trains: one Tune report per evaluation round.

    The pack is what the scheduler sees: a round's `objective` is the best member's best-so-far
    value, so ASHA stops a pack when even its best member falls behind the rung (members stop
    one by one only by their own patience and budget). `member_objectives` and `member_status`
    (null while the member trains) let the searcher report each member to its Optuna trial. Each
    report's checkpoint holds `pack_progress.json`: the members' evaluations so far and the records
    of those that finished, which give the rows of a pack the scheduler stopped, and each member's
    TensorBoard run so far. A pack that trains again after a crash stays silent up to the round it
    had reported (`reported_epoch`), so Ray's iteration count and the rounds agree.
    """

    def __init__(self, config: dict[str, Any], cfgs: list[TrialConfig], context: TrialContext, trial_id: str,
                 node_id: str, scratch: Path, reported_epoch: int = 0) -> None:
        self.members, self.cfgs, self.swept, self.trial_id = config[PACK_KEY], cfgs, context.swept, trial_id
        self.node_id, self.scratch, self.reported_epoch = node_id, scratch, reported_epoch
        self.evaluations: list[list[dict[str, Any]]] = [[] for _ in self.members]
        self.finished: dict[int, dict[str, Any]] = {}
        self._seen = 0  # evaluations counted at the last report

    def on_epoch(self, epoch: int, done: dict[int, dict[str, Any]]) -> None:
        from sweeps.progress import write_member_events

        self.finished.update(done)
        count = sum(map(len, self.evaluations))
        if count == self._seen:
            return
        self._seen = count
        if epoch <= self.reported_epoch:
            return
        folder = self.scratch / f"progress_{epoch:05d}"
        folder.mkdir(parents=True)
        (folder / PACK_PROGRESS).write_text(json.dumps(
            {"epoch": epoch, "evaluations": self.evaluations,
             "finished": {str(i): r for i, r in self.finished.items()}}, default=str))
        for i, member in enumerate(self.members):
            write_member_events(folder / member_id(self.trial_id, i), member["config"], self.swept, self.evaluations[i])
        tune.report(self.metrics(epoch), checkpoint=tune.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)

    def metrics(self, epoch: int) -> dict[str, Any]:
        # a finished member: its selected model's value (as its final report); else its best so far
        best = [_selected_value(self.finished[i], c) if i in self.finished else e[-1]["objective"] if e else None
                for i, (e, c) in enumerate(zip(self.evaluations, self.cfgs))]
        status = [self.finished[i].get("status") if i in self.finished else None for i in range(len(self.members))]
        finite = [v for v in best if v is not None and math.isfinite(v)]
        return {METRIC: max(finite) if finite else -math.inf, "epoch": epoch, "node_id": self.node_id,
                "pack_size": len(self.members), "member_objectives": best, "member_status": status}


def _collector(into: list[dict[str, Any]]) -> Any:
    """A fit_pack reporter that keeps a member's evaluations (a pack writes no checkpoint meanwhile)."""
    return lambda metrics, _checkpoint_dir: into.append(dict(metrics))


def _pack_result(results: list[dict[str, Any]], cfgs: list[TrialConfig], node_id: str) -> dict[str, Any]:
    """The pack's one report: the best member's validation metrics (`objective` is what Tune reads).
    Each member's own curves and HParams are TensorBoard runs in the final checkpoint."""
    values = [(_selected_value(r, c), i) for i, (r, c) in enumerate(zip(results, cfgs))]
    finite = [(float(v), i) for v, i in values if v is not None and math.isfinite(float(v))]
    best = max(finite, key=lambda pair: pair[0]) if finite else None
    val = (results[best[1]].get("val") or {}) if best else {}
    out: dict[str, Any] = {METRIC: best[0] if best else -math.inf, "final": 1,
                           "diverged": int(all(r.get("status") == "diverged" for r in results)),
                           "node_id": node_id, "pack_size": len(results), "best_member": best[1] if best else -1,
                           "member_objectives": [v for v, _ in values], "member_status": [r.get("status") for r in results]}
    out.update({f"val_{k}": v for k, v in val.items()})
    return out


def _selected_value(record: dict[str, Any], cfg: TrialConfig) -> float | None:
    """A finished member's objective: its selected model's validation value of the tuned metric."""
    return (record.get("val") or {}).get(cfg.select_metric)


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
