"""The sweep driver: runs the phases as Ray Tune experiments, restores them after an interruption.

Decision: one Tuner per phase, run one after another; inside the optimise Tuner a dispatcher (one
`StudySearcher` over per-dataset Optuna studies, one `PerDatasetASHA` with rungs per dataset).
Why: early stopping and TPE stay strictly per dataset, yet trials of every dataset share the
cluster in one queue (no idle tail while the last trial of one dataset's Tuner finishes), and a
phase is one experiment folder that `Tuner.restore` resumes as a whole.

The sweep folder is a `sweeps.storage.SweepStore`: the driver's own files live in `store.local`
(uploaded after each write when the folder is a URI), the experiments in `store.experiments`.
A storage failure (full, read-only, vanished) stops the sweep like Ctrl-C, with the --resume line.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import optuna
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from adrec.record import (FINISHED, PACK_KEY, PHASES, TABLE_FILE, dataset_key, is_pack, member_jobs, write_json,
                          write_table)
from sweeps import storage
from sweeps.plan import PACKED_PHASES, Plan, SweepError, pack_jobs
from sweeps.progress import SweepProgress, SweepTensorBoard, best_table
from sweeps.searchers import (JOURNAL, RUNTIME_FILE, JobSearcher, PerDatasetASHA, StudySearcher, journal_storage,
                              reconcile_studies)
from sweeps.storage import EXIT_INTERRUPTED, EXIT_STORAGE, SweepStore, resume_command, storage_failure
from sweeps.table import build_rows, quiet_analysis, versions
from sweeps.trainable import FAULT_ENV, METRIC, MODE, TrialContext, run_trial

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("sweeps.driver")
NUM_SAMPLES_CAP = 10**9  # the searchers decide when a phase is done (Searcher.FINISHED)
TIME_BUDGET = "the time budget is spent"


def trial_dirname(trial: Any) -> str:
    c = trial.config
    return f"{c.get('phase', 'trial')}_{dataset_key(str(c.get('dataset', '')))}_{trial.trial_id}"


def trial_name(trial: Any) -> str:
    c = trial.config
    if is_pack(c):
        return f"{dataset_key(str(c.get('dataset', '')))}/pack{len(c[PACK_KEY])}/{c.get('config_id', '')}"
    return f"{dataset_key(str(c.get('dataset', '')))}/{c.get('config_id', '')}/s{c.get('seed', '')}"


class Driver:
    def __init__(self, plan: Plan, store: SweepStore, args: argparse.Namespace) -> None:
        self.plan, self.store, self.args = plan, store, args
        self.dir = store.local
        self.env = versions()
        self.ctx = TrialContext(stage1_cache=store.stage1_cache(), fault_once=os.environ.get(FAULT_ENV) or None,
                                code_version=self.env["code_version"],
                                swept=tuple(p.field for p in plan.space.params))
        self.deadline = time.time() + args.time_budget if args.time_budget else None
        self.pack_size = int(getattr(args, "pack_size", None) or 1)  # members per Ray trial (baselines: 1)
        self.study_names = {ds: f"{plan.name}/{dataset_key(ds)}" for ds in plan.datasets}
        self._in_fit = False
        self._signalled: str | None = None
        storage.activate(store)

    # --- the whole sweep -------------------------------------------------------------------------
    def run(self, resumed: bool) -> int:
        # A Ray job's driver starts inside its working_dir copy, which Ray deletes under it when nodes
        # share a temp dir (Ray's fake multi-node provider does), and Ray Tune resolves bucket paths
        # against the cwd: work from the sweep's own folder instead.
        try:
            cwd: str | None = os.getcwd()
        except FileNotFoundError:
            cwd = None
        os.chdir(self.dir)
        try:
            return self._run(resumed)
        finally:
            if cwd and os.path.isdir(cwd):
                os.chdir(cwd)

    def _run(self, resumed: bool) -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._quiet_ray()
        try:
            self._remove_leftovers()
            self.write_json(RUNTIME_FILE, {"max_concurrent": self.args.max_concurrent, "quiet": self.args.quiet,
                                           "started": time.time(), "pid": os.getpid(), "total": self.plan.total(),
                                           "pack_size": self.pack_size})
            self._say(f"sweep {self.plan.name!r}: {self.plan.total()} trials on {len(self.plan.datasets)} "
                      f"dataset(s) in {self.store.describe()}" + (" (resuming)" if resumed else ""))
            if resumed:
                self._check_table()
                self.rebuild_table()
            with self._signals():
                try:
                    for phase in PHASES:
                        if self.store.path(f"{phase}.done").exists():
                            continue
                        if self.deadline and time.time() >= self.deadline:
                            return self._stopped(TIME_BUDGET)
                        self._say(f"phase {phase}")
                        done = self.run_phase(phase)
                        if self.store.failed:
                            return self._stopped(f"storage: {self.store.failed}")
                        if not done:
                            return self._stopped(self._signalled or "interrupted")
                        self.write_text(f"{phase}.done", time.strftime("%Y-%m-%d %H:%M:%S\n"))
                except KeyboardInterrupt:
                    return self._stopped(self._signalled or "interrupted")
            df = self.rebuild_table()
        except Exception as exc:
            failure = storage_failure(exc)
            if failure is None:
                raise
            log.debug("storage failure", exc_info=True)
            return self._stopped(f"storage: {failure}")
        self._say(f"finished: {len(df)} trials in {self.store.describe()}/{TABLE_FILE}")
        print(best_table(df, self.plan.metric).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if self.args.report:
            self.report()
        return 0

    def _quiet_ray(self) -> None:
        """Our callback prints the progress; Ray's reporter, tensorboardX name notes and the
        snapshot-frequency warning (we snapshot after every checkpoint on purpose) stay quiet."""
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # With a custom searcher Tune keeps only one trial pending: trials would start one at a time
        # and the autoscaler would see one pending trial. Allow as many as may run at once.
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(self.args.max_concurrent or 64))
        if not self.args.verbose:
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter honours verbose=0
        logging.getLogger("tensorboardX").setLevel(logging.WARNING)
        if not self.args.verbose:  # "failed to fetch metrics" of trials that have not reported yet
            logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    def _remove_leftovers(self) -> None:
        """Temp files a killed writer left (`.<name>.<pid>.tmp`); never read, removed under the lock."""
        storage.remove_temp_files(self.dir)

    def _stopped(self, why: str) -> int:
        if not why.startswith("storage"):
            try:
                self.rebuild_table()
            except Exception as exc:  # noqa: BLE001 - the table is rebuilt on resume anyway
                failure = storage_failure(exc)
                if failure is None:
                    raise
                why = f"storage: {failure}"
        storage.remove_temp_files(self.dir)  # what writers that met the failure left behind
        fix = "free space or fix the storage, then finish it with" if why.startswith("storage") else "finish it with"
        print(f"sweep {self.plan.name!r} stopped ({why}); {fix}: "
              f"{resume_command(self.plan.name, str(self.args.storage))}", flush=True)
        if why == TIME_BUDGET:
            return 0
        return EXIT_STORAGE if why.startswith("storage") else EXIT_INTERRUPTED

    # --- files of the sweep folder ----------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        write_json(self.store.path(name), data)
        self.store.push(name)

    def write_text(self, name: str, text: str) -> None:
        from adrec.record import write_atomic

        write_atomic(self.store.path(name), lambda tmp: Path(tmp).write_text(text))
        self.store.push(name)

    def read_json(self, name: str) -> Any:
        path = self.store.path(name)
        try:
            return json.loads(path.read_text())
        except ValueError as exc:  # written atomically, so only a foreign edit gets here
            raise SweepError(f"{path} is not valid JSON ({exc}); restore it or delete it to recompute it") from None

    def rebuild_table(self) -> "pd.DataFrame":
        """The table from the experiment folders (authoritative after a restart), written atomically."""
        self.store.fetch_experiments(PHASES)
        df = build_rows([self.dir / p for p in PHASES], env=self.env, sweep=self.plan.name)
        write_table(df, self.store.path(TABLE_FILE))
        self.store.push(TABLE_FILE)
        return df

    def _check_table(self) -> None:
        """Say so when the table a previous run left cannot be read (it is rebuilt right after)."""
        from adrec.record import RecordError, read_table

        try:
            read_table(self.store.path(TABLE_FILE))
        except RecordError as exc:
            print(f"{exc.args[0].split(';')[0]}; rebuilding it from the experiment folders", flush=True)

    def report(self) -> None:
        try:
            from results.cli import main as results_main
        except ImportError as exc:
            log.info("no report: the results package is not importable (%s)", exc)
            return
        try:
            code = results_main([str(self.dir), "--metric", f"val_{self.plan.metric}", "--quiet"])
        except Exception:  # noqa: BLE001 - the sweep succeeded; a failing report must not hide that
            log.exception("the report failed; run `python -m results %s` to retry", self.dir)
            return
        if code:
            log.warning("python -m results %s exited with %s", self.dir, code)

    # --- one phase -------------------------------------------------------------------------------
    def experiment(self, phase: str) -> str:
        return f"{self.store.experiments.rstrip('/')}/{phase}"

    def run_phase(self, phase: str) -> bool:
        """Run (or restore) one phase; True when all its trials have finished."""
        exp = self.experiment(phase)
        restoring = self.store.has_experiment(phase) and tune.Tuner.can_restore(exp)
        fs = self.store.ray_filesystem()
        known = self.known(phase) if restoring else {}
        if phase == "optimize":
            if self.plan.num_samples == 0:
                return True
            counts = reconcile_studies(str(self.store.path(JOURNAL)), self.study_names, known)
            self.store.push(JOURNAL)
            if any(counts.values()):
                self._say(f"optimize: studies reconciled after a restart: {counts}")
            if restoring and self.optimize_done(known):
                return True
            searcher = StudySearcher(
                study_names=self.study_names, space=self.plan.space,
                base_configs={ds: self.plan.base_config(ds) for ds in self.plan.datasets},
                num_samples=self.plan.num_samples, seed=self.plan.seed, pack_size=self.pack_size)
            scheduler = self.asha()
        else:
            jobs = self.jobs(phase)
            if not jobs:
                return True
            known_jobs = {job for info in known.values() for job in info["jobs"]}
            pending = [j for j in jobs if j["job"] not in known_jobs]
            if self.pack_size > 1 and phase in PACKED_PHASES:  # the member jobs no known trial holds, in packs
                members = len(pending)
                pending = pack_jobs(pending, self.pack_size)
                if pending:
                    packs = sum(is_pack(j["config"]) for j in pending)
                    self._say(f"{phase}: {members} trial(s) to run as {len(pending)} Ray trial(s), {packs} of "
                              f"them packs of up to {self.pack_size}")
            self.write_json(f"{phase}_jobs.json", {"jobs": jobs, "pending": pending})
            if restoring and not pending and all(i["status"] in FINISHED for i in known.values()):
                return True
            searcher, scheduler = JobSearcher(f"{phase}_jobs.json"), FIFOScheduler()
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=self.ctx),
                                        {"cpu": self.args.cpus_per_trial, "gpu": self.args.gpus_per_trial})
        if restoring:
            self._say(f"{phase}: restoring {len(known)} known trial(s) from {exp}")
            tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, storage_filesystem=fs)
        else:
            tuner = tune.Tuner(
                trainable, param_space={},
                tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                            num_samples=NUM_SAMPLES_CAP, reuse_actors=True,
                                            trial_dirname_creator=trial_dirname, trial_name_creator=trial_name),
                run_config=tune.RunConfig(
                    name=phase, storage_path=self.store.experiments, storage_filesystem=fs,
                    failure_config=tune.FailureConfig(max_failures=self.args.max_failures),
                    # num_to_keep=1 also makes Ray sync the experiment state after every checkpoint,
                    # so a kill loses at most the evaluation in flight (the checkpoint it replaces
                    # stays until the stored state stops naming it: sweeps.storage).
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[SweepTensorBoard(tuple(p.field for p in self.plan.space.params)),
                               SweepProgress(self.plan.name, phase, self.env)],
                    verbose=2 if self.args.verbose else 0))
        with self._budget():
            self._in_fit = True
            try:
                tuner.fit()
            finally:
                self._in_fit = False
        if self.store.failed:
            return False
        return self.phase_done(phase)

    def known(self, phase: str) -> dict[str, dict[str, Any]]:
        self.store.fetch_experiments([phase])
        return known_trials(self.dir / phase)

    def jobs(self, phase: str) -> list[dict[str, Any]]:
        """The phase's job list, computed once and kept in the sweep folder (a resume reuses it)."""
        if phase == "paired":
            name = "paired_configs.json"
            if not self.store.path(name).exists():
                self.write_json(name, {"seed": self.plan.seed, "configs": self.plan.paired_configs()})
            return self.plan.paired_jobs(self.read_json(name)["configs"])
        if phase == "confirm":
            name = "confirm_jobs.json"
            if not self.store.path(name).exists():
                self.store.fetch_experiments(["paired", "optimize"])
                table = build_rows([self.dir / "paired", self.dir / "optimize"], env=self.env,
                                   sweep=self.plan.name)
                self.write_json(name, {"jobs": self.plan.confirm_jobs(table) if self.plan.confirm_top else []})
            return self.read_json(name)["jobs"]
        return self.plan.baseline_jobs()

    def asha(self) -> PerDatasetASHA:
        """Grace period: every evaluation of the warm-up and one after it; max_t above any budget."""
        space = self.plan.space
        every = int(space.base_values()["eval_every"])
        s1, s2, s3 = (int(space.max_value(f"stage{i}_epochs")) for i in (1, 2, 3))
        grace = math.ceil(s2 / every) + 1
        return PerDatasetASHA(grace_period=grace, max_t=max(math.ceil((s1 + s2 + s3) / every) + 1, grace + 1))

    # --- completeness ----------------------------------------------------------------------------
    def phase_done(self, phase: str) -> bool:
        known = self.known(phase)
        if any(i["status"] not in FINISHED for i in known.values()):
            return False
        if phase == "optimize":
            reconcile_studies(str(self.store.path(JOURNAL)), self.study_names, known)
            self.store.push(JOURNAL)
            return self.optimize_done(known)
        jobs = {j["job"] for j in self.jobs(phase)}
        return jobs <= {job for i in known.values() for job in i["jobs"]}

    def optimize_done(self, known: dict[str, dict]) -> bool:
        if any(i["status"] not in FINISHED for i in known.values()):
            return False
        store = journal_storage(str(self.store.path(JOURNAL)))
        for name in self.study_names.values():
            try:
                study = optuna.load_study(study_name=name, storage=store)
            except KeyError:
                return False
            finished = [t for t in study.get_trials(deepcopy=False)
                        if t.state.is_finished() and not t.user_attrs.get("invalid")]
            if len(finished) < self.plan.num_samples or any(not t.state.is_finished() for t in study.trials):
                return False
        return True

    # --- signals and the time budget -------------------------------------------------------------
    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM stops like Ctrl-C: inside Tuner.fit via Ray's graceful SIGUSR1 path."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_term(signum: int, frame: Any) -> None:
            self._signalled = "SIGTERM"
            if self._in_fit:
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, old)

    @contextmanager
    def _budget(self) -> Iterator[None]:
        if not self.deadline or threading.current_thread() is not threading.main_thread():
            yield
            return

        def expire() -> None:
            if self._in_fit:
                self._signalled = TIME_BUDGET
                os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's graceful stop, resumable

        timer = threading.Timer(max(self.deadline - time.time(), 0.0), expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _say(self, text: str) -> None:
        if not self.args.quiet:
            print(text, flush=True)


def known_trials(exp: Path) -> dict[str, dict[str, Any]]:
    """Ray trials recorded in an experiment folder: id -> status, last result, job key and the job
    keys of the member-trials it runs (`jobs`: a pack's members, else its own job)."""
    if not any(exp.glob("experiment_state-*.json")):
        return {}
    from ray.tune import ExperimentAnalysis

    try:
        with quiet_analysis():
            analysis = ExperimentAnalysis(str(exp))
    except (ValueError, OSError) as exc:
        log.warning("cannot read the experiment state in %s (%s); starting the phase's unknown jobs anew", exp, exc)
        return {}
    return {t.trial_id: {"status": t.status, "last_result": t.last_result or {}, "job": t.config.get("job"),
                         "jobs": member_jobs(t.config)} for t in analysis.trials}


__all__ = ["Driver", "SweepError", "known_trials", "trial_dirname", "trial_name"]
