"""Durable searchers and a per-dataset scheduler for one Tuner per phase.

Ray pickles the searcher and scheduler into `tuner.pkl` once, and saves searcher state only every
few seconds; after a SIGKILL that state can be older than the Optuna journal. So these classes keep
nothing that matters in memory: the job lists live in JSON files the driver writes before each
(re)start, the studies live in Optuna's JournalStorage, and each Optuna trial carries the id of
the Ray trial that runs it (`ray_trial_id`). On restart the driver marks RUNNING Optuna trials
that no restored Ray trial owns as orphans (`reconcile_studies`) and the searcher hands an orphan
to the next new Ray trial before asking TPE again, so each study ends with exactly the trials
that ran and none left RUNNING.

They also keep no path: Ray pickles them with the experiment, and a sweep folder that was copied,
moved or mounted elsewhere must resume where it now lies. Files are named relative to the live
sweep folder (`sweeps.storage.current()`), and the journal is uploaded after every change when the
sweep folder is a URI (the searchers run in the driver, next to its local copy).
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from adrec.config import TrialConfig
from adrec.record import FINISHED, dataset_key, member_id, outcome
from sweeps import storage
from sweeps.plan import pack_job
from sweeps.spaces import Space

log = logging.getLogger("sweeps.searchers")
RUNTIME_FILE = "runtime.json"  # settings of the current driver run, read lazily by pickled objects
JOURNAL = "studies.journal"  # the Optuna studies, one per dataset, in the sweep folder


def read_runtime() -> dict[str, Any]:
    path = storage.current().path(RUNTIME_FILE)
    return json.loads(path.read_text()) if path.exists() else {}


class _LiveLimit:
    """`--max-concurrent` without Ray's ConcurrencyLimiter, whose saved live set goes stale on a kill.

    Also the searchers' durability: nothing is saved, and `_LAZY` (the attribute a subclass rebuilds
    from files on first use), the live set and the limit are dropped when pickled or restored.
    """

    _LAZY: str
    _live: set[str] | None = None
    _limit: int | None = None

    def _room(self) -> bool:
        if self._limit is None:  # runtime.json is written once per driver run, before any Tuner
            self._limit = int(read_runtime().get("max_concurrent") or 0)
        return not self._limit or len(self._live or ()) < self._limit

    def _track(self, trial_id: str, alive: bool) -> None:
        if self._live is None:
            self._live = set()
        (self._live.add if alive else self._live.discard)(trial_id)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps({}))

    def restore(self, checkpoint_path: str) -> None:
        setattr(self, self._LAZY, None)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, self._LAZY: None, "_live": None, "_limit": None}


class JobSearcher(_LiveLimit, Searcher):
    """Hands out a fixed list of trial configs (paired, confirm and baseline phases), in order.

    The driver writes the jobs not yet known to the (restored) experiment into `jobs_file` (a name
    in the sweep folder).
    """

    _LAZY = "_pending"

    def __init__(self, jobs_file: str) -> None:
        super().__init__()
        self.jobs_file = Path(jobs_file).name
        self._pending: list[dict[str, Any]] | None = None

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._pending is None:
            self._pending = json.loads(storage.current().path(self.jobs_file).read_text())["pending"]
        if not self._pending:
            return Searcher.FINISHED
        if not self._room():
            return None
        self._track(trial_id, True)
        return self._pending.pop(0)["config"]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._track(trial_id, True)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._track(trial_id, False)



class StudySearcher(_LiveLimit, Searcher):
    """The optimise phase: one seeded-TPE Optuna study per dataset, all in one Tuner (a dispatcher).

    Each new Ray trial goes to the dataset with the fewest trials so far, so every dataset
    progresses together; the study of that dataset suggests its config (define-by-run, conditional
    knobs under distinct names). Completed trials are told their objective, trials stopped by the
    scheduler are PRUNED, diverged and crashed ones FAIL.

    With `pack_size` K > 1 a Ray trial is a pack of up to K Optuna trials of one study, asked at
    once (constant liar): the first as TPE likes, the others with the first one's architecture
    knobs (`adrec.pack.PACK_FIELDS`) fixed (`optuna.samplers.PartialFixedSampler`), so they can
    share one network. Each member is its own Optuna trial (`ray_trial_id` = the member's trial id,
    `pack_id` = the Ray trial), told its own intermediate values, objective and outcome.
    """

    _LAZY = "_studies"

    def __init__(self, *, study_names: Mapping[str, str], space: Space, base_configs: Mapping[str, dict[str, Any]],
                 num_samples: int, seed: int, pack_size: int = 1) -> None:
        super().__init__()
        self.pack_size = pack_size
        self.study_names = dict(study_names)  # dataset -> study name
        self.space = space
        self.base_configs = {k: dict(v) for k, v in base_configs.items()}
        self.num_samples = num_samples
        self.seed = seed
        self._studies: dict[str, optuna.Study] | None = None

    # --- studies --------------------------------------------------------------------------------
    def studies(self) -> dict[str, optuna.Study]:
        if self._studies is None:
            # TPE's `group` (conditional knobs sampled jointly per branch) is marked experimental.
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            journal = journal_storage(str(storage.current().path(JOURNAL)))
            self._studies = {
                ds: optuna.create_study(
                    study_name=name, storage=journal, direction="maximize", load_if_exists=True,
                    sampler=optuna.samplers.TPESampler(seed=self.seed + i, multivariate=True, group=True,
                                                       constant_liar=True))
                for i, (ds, name) in enumerate(self.study_names.items())
            }
        return self._studies

    def _find(self, trial_id: str) -> tuple[optuna.Study, optuna.trial.FrozenTrial] | None:
        for study in self.studies().values():
            for t in study.get_trials(deepcopy=False):
                if t.user_attrs.get("ray_trial_id") == trial_id:
                    return study, t
        return None

    # --- Searcher API ---------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        studies = self.studies()
        claimed, orphans = {}, {}
        for ds, study in studies.items():
            trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("invalid")]
            orphans[ds] = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("orphan")]
            claimed[ds] = len(trials) - len(orphans[ds])
        open_ = [ds for ds in studies if claimed[ds] < self.num_samples]
        if not open_:
            return Searcher.FINISHED
        if not self._room():
            return None
        ds = min(open_, key=lambda d: (claimed[d], list(studies).index(d)))
        size = max(1, min(self.pack_size, self.num_samples - claimed[ds]))
        members: list[dict[str, Any]] = []
        for i in range(size):
            own_id = trial_id if size == 1 else member_id(trial_id, i)
            arch = _architecture(members[0]["config"]) if members else None
            members.append(self._claim(studies[ds], ds, own_id, orphans[ds], arch))
            if size > 1:
                optuna.trial.Trial(studies[ds], members[-1]["storage_id"]).set_user_attr("pack_id", trial_id)
        self._track(trial_id, True)
        storage.current().push(JOURNAL)  # before Ray records the trial: the bucket's journal knows it first
        jobs = [{"job": m["config"]["job"], "config": m["config"]} for m in members]
        return jobs[0]["config"] if size == 1 else pack_job(jobs)["config"]

    def _claim(self, study: optuna.Study, ds: str, own_id: str, orphans: list[optuna.trial.FrozenTrial],
               arch: tuple | None) -> dict[str, Any]:
        """One Optuna trial for the Ray trial (or pack member) `own_id`: an orphan of the architecture
        `arch` (any, when None) if there is one, else a new ask with that architecture fixed."""
        fits = [t for t in orphans if arch is None or _architecture(self._config(ds, t.user_attrs["config"])) == arch]
        if fits:
            frozen = fits[0]
            orphans.remove(frozen)
            trial = optuna.trial.Trial(study, frozen._trial_id)  # the storage id of that trial
            log.info("trial %s adopts orphaned Optuna trial %d of %s", own_id, frozen.number, ds)
            trial.set_user_attr("orphan", False)
            trial.set_user_attr("adopted_from", frozen.user_attrs.get("ray_trial_id"))
            values, number, storage_id = dict(frozen.user_attrs["config"]), frozen.number, frozen._trial_id
        else:
            trial, values = self._ask_valid(study, ds, arch)
            number, storage_id = trial.number, trial._trial_id
        trial.set_user_attr("ray_trial_id", own_id)
        config = {**self._config(ds, values), "phase": "optimize",
                  "config_id": optimize_config_id(dataset_key(ds), number), "job": f"optimize/{dataset_key(ds)}/{number}"}
        return {"config": config, "storage_id": storage_id}

    def _config(self, ds: str, values: Mapping[str, Any]) -> dict[str, Any]:
        return TrialConfig.from_dict({**self.base_configs[ds], **values}).to_dict()

    def _ask_valid(self, study: optuna.Study, ds: str, arch: tuple | None = None
                   ) -> tuple[optuna.Trial, dict[str, Any]]:
        """Ask TPE until the config is a valid TrialConfig; an invalid one is told FAIL (`invalid`).
        With `arch` (a pack's architecture) the space's architecture knobs are fixed to it.

        `validate_space` rejects spaces that can sample invalid configs before the sweep starts, so
        this loop is a guard, not a path taken in practice.
        """
        sampler = study.sampler
        if arch is not None:
            fixed = dict(zip(_arch_fields(), arch))
            study.sampler = optuna.samplers.PartialFixedSampler(
                {p.name: fixed[p.field] for p in self.space.params if p.field in fixed}, sampler)
        try:
            for _ in range(100):
                trial = study.ask()
                values = self.space.sample(trial)
                try:
                    config = self._config(ds, values)
                    if arch is not None and _architecture(config) != arch:  # a branch the fixed knobs did not reach
                        raise ValueError(f"architecture {_architecture(config)} is not the pack's {arch}")
                except ValueError as exc:
                    log.warning("study %s sampled an invalid config (%s); resampling", study.study_name, exc)
                    trial.set_user_attr("invalid", str(exc))
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                trial.set_user_attr("config", values)
                return trial, values
        finally:
            study.sampler = sampler
        raise RuntimeError(f"study {study.study_name!r}: 100 invalid configs in a row; the space is broken")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._track(trial_id, True)
        if result.get("final") or "objective" not in result:
            return
        step = int(result.get("training_iteration", 0))
        values = result.get("member_objectives")
        ids = [trial_id] if values is None else [member_id(trial_id, i) for i in range(len(values))]
        statuses = result.get("member_status") or [None] * len(ids)
        for i, (own_id, value, status) in enumerate(zip(ids, [result["objective"]] if values is None else values,
                                                        statuses)):
            found = self._find(own_id)
            if found is None or found[1].state != TrialState.RUNNING:
                continue
            if status is not None:  # a member that left its pack: TPE learns its outcome now, not at the pack's end
                tell(*found, *member_outcome(result, i, False))
                storage.current().push(JOURNAL)
            elif value is not None and math.isfinite(float(value)) and step not in found[1].intermediate_values:
                optuna.trial.Trial(found[0], found[1]._trial_id).report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._track(trial_id, False)
        ids = [t.user_attrs["ray_trial_id"] for study in self.studies().values()
               for t in study.get_trials(deepcopy=False) if t.user_attrs.get("pack_id") == trial_id] or [trial_id]
        for own_id in ids:
            found = self._find(own_id)
            if found is None:
                log.warning("Ray trial %s has no Optuna trial; nothing to tell", own_id)
                continue
            study, frozen = found
            if frozen.state.is_finished():  # told before a kill; the resumed trial re-finished
                continue
            tell(study, frozen, *member_outcome(result, member_index(own_id) if own_id != trial_id else None, error))
        storage.current().push(JOURNAL)


def tell(study: optuna.Study, frozen: optuna.trial.FrozenTrial, status: str, value: float) -> None:
    optuna.trial.Trial(study, frozen._trial_id).set_user_attr("status", status)
    if status == "completed" and math.isfinite(value):
        study.tell(frozen.number, value, skip_if_finished=True)
    elif status == "pruned":
        study.tell(frozen.number, state=TrialState.PRUNED, skip_if_finished=True)
    else:  # diverged, failed, or a completed run without a finite objective
        study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)


def member_outcome(result: Mapping[str, Any] | None, index: int | None, error: bool) -> tuple[str, float]:
    """(status, objective) of a solo trial (`index` None) or of member `index` of a pack trial, from
    the Ray trial's last result: a member that had finished keeps its own outcome, the others
    share the pack's (pruned when the scheduler stopped it, failed when it crashed)."""
    result = result or {}
    if index is None:
        return outcome(result, error), float(result.get("objective", math.nan))
    values, statuses = result.get("member_objectives") or [], result.get("member_status") or []
    value = values[index] if index < len(values) and values[index] is not None else math.nan
    status = statuses[index] if index < len(statuses) else None
    return str(status or ("failed" if error else "pruned")), float(value)


def member_index(own_id: str) -> int:
    """The member's position in its pack, from its trial id `<pack id>-m<i>`."""
    return int(own_id.rsplit("-m", 1)[1])


def _arch_fields() -> tuple[str, ...]:
    from adrec.pack import PACK_FIELDS  # imported here: the searchers' module does not load torch

    return PACK_FIELDS


def _architecture(config: Mapping[str, Any]) -> tuple:
    """What pack members must share (`adrec.pack.PACK_FIELDS`), from a full config."""
    return tuple(config.get(f) for f in _arch_fields())


def journal_storage(path: str) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(path))


def optimize_config_id(key: str, number: int) -> str:
    return f"{key}-t{number:03d}"


def reconcile_studies(journal: str, study_names: Mapping[str, str], known: Mapping[str, dict]) -> dict[str, int]:
    """Before (re)starting the optimise phase: settle RUNNING Optuna trials left by a killed driver.

    `known` maps the Ray trial ids of the restored experiment to {"status", "last_result"}. A
    RUNNING Optuna trial whose Ray trial finished is told its outcome; one whose Ray trial is
    unknown (the kill came before Ray saved it) becomes an orphan for the next new Ray trial; one
    whose Ray trial will be resumed stays RUNNING. Returns counts per action.
    """
    store = journal_storage(journal)
    counts = {"told": 0, "orphaned": 0, "resumed": 0}
    summaries = set(optuna.study.get_all_study_names(store))
    for name in study_names.values():
        if name not in summaries:
            continue
        study = optuna.load_study(study_name=name, storage=store)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            info = known.get(t.user_attrs.get("pack_id") or t.user_attrs.get("ray_trial_id"))
            if info is None:
                optuna.trial.Trial(study, t._trial_id).set_user_attr("orphan", True)
                counts["orphaned"] += 1
            elif info["status"] in FINISHED:
                index = member_index(t.user_attrs["ray_trial_id"]) if t.user_attrs.get("pack_id") else None
                tell(study, t, *member_outcome(info.get("last_result"), index, info["status"] == "ERROR"))
                counts["told"] += 1
            else:
                counts["resumed"] += 1
    return counts


class PerDatasetASHA(FIFOScheduler):
    """ASHA with one set of rungs per dataset: a trial is only ever compared with trials of its own
    dataset. Time is `training_iteration` = evaluations reported."""

    def __init__(self, *, grace_period: int, max_t: int, reduction_factor: float = 3) -> None:
        super().__init__()
        self.grace_period, self.max_t, self.reduction_factor = grace_period, max_t, reduction_factor
        self._metric, self._mode = None, None
        self._by_dataset: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _asha(self, trial: Any) -> ASHAScheduler:
        ds = trial.config.get("dataset", "")
        if ds not in self._by_dataset:
            self._by_dataset[ds] = ASHAScheduler(
                time_attr="training_iteration", metric=self._metric, mode=self._mode, max_t=self.max_t,
                grace_period=self.grace_period, reduction_factor=self.reduction_factor, stop_last_trials=False)
        return self._by_dataset[ds]

    def _known(self, trial: Any) -> ASHAScheduler:
        asha = self._asha(trial)
        if trial.trial_id not in asha._trial_info:  # a restored trial that reports before being added
            asha.on_trial_add(None, trial)
        return asha

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("final"):  # the end-of-fit record is not an evaluation
            return TrialScheduler.CONTINUE
        return self._known(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result.get("final"):
            self._known(trial)._trial_info.pop(trial.trial_id, None)
            return
        self._known(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._known(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._known(trial).on_trial_error(tune_controller, trial)

    def debug_string(self) -> str:
        return " | ".join(f"{ds}: {a.debug_string()}" for ds, a in self._by_dataset.items()) or "per-dataset ASHA"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_by_dataset": {}}
