"""`python sweeps/run.py --space NAME`: the ADRec design-choice sweep on Ray Tune + Optuna.

One Tuner per phase (paired, optimize, confirm, baseline), each an experiment folder under
`<storage>/<name>/`; inside the optimise Tuner a dispatcher gives every dataset its own Optuna
study and its own ASHA rungs. Everything a restart needs is on disk or in the bucket (Ray's
experiment state and checkpoints, the Optuna journal, the job lists), so `--resume` (or the same
command again) finishes a sweep after Ctrl-C, SIGTERM, SIGKILL, a full disk or a replaced head.

Exit codes: 0 finished (or the time budget is spent), 2 bad input or a Ray that would not start
(one line on stderr, before any trial), 3 the storage failed mid-run, 130 interrupted; 3 and 130
print the `--resume` command.

This module imports nothing heavy at import time: `--help` answers without torch, Ray or Optuna.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # `python sweeps/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from sweeps.plan import Plan
    from sweeps.storage import SweepStore

from sweeps.storage import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STORAGE, resume_command  # noqa: E402 (stdlib only)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = REPO / "runs"
SWEEP_FILE = "sweep.json"
AUTO = "auto"  # --pack-size auto: measured before the sweep (sweeps.pack_probe)
BUILTIN_SPACES = ("smoke", "paper", "full")  # sweeps.spaces.BUILTIN (a test keeps them equal)


class SweepError(ValueError):
    """Bad input or an environment the sweep cannot start in: one line, exit code 2."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default once: only where the help text does not already say it, and never `None`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or not action.option_strings
                or isinstance(action, argparse.BooleanOptionalAction)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python sweeps/run.py",
        description="Sweep ADRec's design choices with Ray Tune + Optuna: a paired space-filling phase on "
                    "every dataset, per-dataset TPE with ASHA, a confirm phase with fresh seeds and baselines.\n"
                    "Rows in trials.parquet = datasets x (paired x repeats + TPE + confirm x repeats + baselines).",
        epilog="exit codes: 0 finished, 2 bad input (nothing ran), 3 storage failed mid-run, 130 interrupted "
               "(3 and 130 print the --resume command)",
        formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--space", default="smoke", help=f"built-in space ({', '.join(BUILTIN_SPACES)}) or a path to a YAML space file")
    a("--datasets", help="comma list of registry names or dataset file paths (default: the space's datasets)")
    a("--paired-samples", type=int, help="space-filling configs shared by all datasets (default: the space's)")
    a("--repeats", type=int, help="seeds per paired and per confirmed config (default: the space's)")
    a("--num-samples", type=int, help="TPE trials per dataset in the optimise phase (default: the space's)")
    a("--confirm-top", type=int, help="best configs per dataset re-run with fresh seeds (default: the space's)")
    a("--metric", default="val_NDCG@20", help="validation metric to maximise; each trial reports its best-so-far "
                                              "value as `objective`")
    a("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial reserves")
    a("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial reserves; fractions share one GPU")
    a("--pack-size", help="train up to K ADRec trials as one pack (one Ray trial, one process, one model with a "
                          "member axis; same dataset and architecture): the paired and confirm phases' jobs, and K "
                          "configs asked of TPE at once in the optimise phase; 1 = one trial per Ray trial; "
                          "'auto' = measured on a trial's node before the sweep (default: auto with "
                          "--gpus-per-trial, else 1; a resume keeps the size it ran with)")
    a("--max-concurrent", type=int, default=0, help="most trials running at once (0 = as many as resources allow)")
    a("--max-failures", type=int, default=2, help="retries of a crashed trial, each from its last checkpoint")
    a("--address", help="Ray cluster to join: host:port of its head, or 'auto' for the cluster `ray start` "
                        "runs on this machine (default: RAY_ADDRESS if set, else a new private local Ray; "
                        "never a cluster found by chance)")
    a("--storage", default=str(DEFAULT_STORAGE),
      help="where the sweep folder <storage>/<name> lives: a folder (every node must see it on a cluster: "
           "NFS) or a URI pyarrow opens, e.g. s3://BUCKET/adrec (default: runs/ in this repository)")
    a("--data-dir", help="folder with the dataset files (default: ADREC_DATA_DIR, shared/datasets, ~/.cache/adrec)")
    a("--name", help="sweep name (default: the space name)")
    a("--resume", action="store_true", help="finish the sweep in <storage>/<name> with its saved settings")
    a("--seed", type=int, default=2025, help="seed of the paired design, the TPE samplers and the trials")
    a("--time-budget", type=float, help="seconds after which the sweep stops as after Ctrl-C (resumable)")
    a("--max-users", type=int, default=0, help="keep the first N users of each dataset (0 = all; tests, smoke runs)")
    a("--dry-run", action="store_true", help="print trials per phase and dataset and an estimated cost; run nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true", help="only errors, the stop line and the final table")
    g.add_argument("--verbose", action="store_true", help="Ray's own progress output and trial logs too")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="run the analysis (python -m results) on the finished sweep (default: on)")
    return p


# --------------------------------------------------------------------------------------------------
# Input checks (no Ray)
# --------------------------------------------------------------------------------------------------
def make_plan(args: argparse.Namespace) -> "Plan":
    from adrec.data import dataset_path, resolve_data_dir
    from adrec.record import dataset_key
    from sweeps import preflight
    from sweeps.plan import Plan, SweepError as PlanError, parse_metric
    from sweeps.spaces import SpaceError, load_space

    try:
        space = load_space(args.space)
    except SpaceError as exc:
        raise SweepError(str(exc)) from None
    try:
        data_dir = str(resolve_data_dir(args.data_dir))
    except ValueError as exc:
        raise SweepError(f"--data-dir: {exc}") from None
    names = [d.strip() for d in args.datasets.split(",")] if args.datasets else list(space.datasets)
    if not names or not all(names):
        raise SweepError(f"--datasets={args.datasets!r} names no dataset; give e.g. ml-100k,baby")
    datasets = []
    for name in names:
        try:
            path = dataset_path(name, data_dir)
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        datasets.append(name if name == dataset_key(name) and not Path(name).is_file() else str(path))
    keys = [dataset_key(d) for d in datasets]
    if len(set(keys)) != len(keys):
        raise SweepError(f"--datasets {names} repeat a dataset (or two files share a name); list each once")
    counts = space.counts()
    for key in counts:
        value = getattr(args, key)
        if value is not None:
            if value < (1 if key == "repeats" else 0):
                raise SweepError(f"--{key.replace('_', '-')}={value} must be >= {1 if key == 'repeats' else 0}")
            counts[key] = value
    args.pack_size = parse_pack_size(args.pack_size)
    if args.max_users < 0:
        raise SweepError(f"--max-users={args.max_users} must be >= 0 (0 = all users)")
    error = preflight.resource_request_error(args.gpus_per_trial, args.cpus_per_trial)
    if error:
        raise SweepError(error)
    try:
        metric = parse_metric(args.metric)
    except PlanError as exc:
        raise SweepError(str(exc)) from None
    plan = Plan(name=args.name or space.name, space=space, datasets=tuple(datasets), baselines=space.baselines,
                metric=metric, seed=args.seed, max_users=args.max_users, data_dir=data_dir, **counts)
    if plan.total() == 0:
        raise SweepError("the sweep has no trials: every count is 0; raise --paired-samples or --num-samples")
    plan.paired_jobs(plan.paired_configs())  # builds every paired config as a TrialConfig: invalid ones stop here
    plan.baseline_jobs()
    return plan


def pack_lines(plan: "Plan", size: int) -> list[str]:
    """--dry-run with --pack-size: Ray trials per phase (all datasets) when packs run."""
    from sweeps.plan import confirm_ray_trials, pack_counts

    ray_trials, packs = pack_counts(plan.paired_jobs(plan.paired_configs()), size)
    n, counts = len(plan.datasets), plan.counts()
    least, most = confirm_ray_trials(plan, size)
    single = f", {ray_trials - packs} single" if ray_trials > packs else ""
    per_study = -(-counts["optimize"] // size)  # each study's trials, asked K at a time
    return [f"packs (--pack-size {size}; a pack is one Ray trial):",
            f"  paired: {n * counts['paired']} trials in {ray_trials} Ray trials ({packs} packs{single})",
            f"  optimize: {n * counts['optimize']} trials in {n * per_study} Ray trials (TPE asks up to {size} "
            "configs of one architecture at once)",
            f"  confirm: {n * counts['confirm']} trials in {least}..{most} Ray trials (its configs are chosen "
            "during the sweep; configs of another architecture never share a pack)",
            f"  baseline: {n * counts['baseline']} single trials",
            "  (the cost below counts packs where a node type has figures for this size)"]


def print_dry_run(plan: "Plan", where: str, pack_size: int | str = 1) -> None:
    """Trials and cost per phase and dataset; with `pack_size` > 1 also the Ray trials packs make."""
    from adrec.record import PHASES

    packed = pack_size if isinstance(pack_size, int) else 1  # auto: the size is not known before the sweep
    table = plan.cost_table(packed)
    print(f"sweep {plan.name!r} in {where}  space={plan.space.name} metric=val_{plan.metric} seed={plan.seed}")
    seeds = "1 seed" if plan.repeats == 1 else f"{plan.repeats} seeds"
    confirm = f"top {plan.confirm_top} and the authors' default x {seeds}" if plan.confirm_top else "none"
    print(f"per dataset: paired {plan.paired_samples} configs x {seeds}, optimise {plan.num_samples} "
          f"TPE trials, confirm {confirm}, baselines {list(plan.baselines)}")
    wide = table.pivot(index="dataset", columns="phase", values="trials")[list(PHASES)]
    wide["total"] = wide.sum(axis=1)
    print(wide.to_string())
    from sweeps.plan import cost_lines

    print(f"total trials: {plan.total()}")
    if pack_size == AUTO:
        print("packs: the pack size is measured on a trial's node before the sweep (--pack-size auto); "
              "--dry-run --pack-size K shows the Ray trials of a size K")
    elif pack_size > 1:
        print("\n".join(pack_lines(plan, pack_size)))
    print("\n".join(cost_lines(plan, table, pack_size=packed)))


def open_store(args: argparse.Namespace, name: str) -> "SweepStore":
    """The sweep folder (a local copy of it for a URI), created and checked writable."""
    from sweeps.storage import StorageError, SweepStore

    store = SweepStore.open(str(args.storage), name)
    try:
        store.check_writable()
    except StorageError as exc:
        raise SweepError(f"--storage={args.storage!r}: {exc}; pick a location you can write to") from None
    return store


def load_settings(args: argparse.Namespace, plan: "Plan", store: "SweepStore") -> tuple["Plan", bool]:
    """The plan to run and whether the sweep folder already holds this sweep (called with the lock)."""
    from sweeps.plan import Plan

    try:
        store.pull()  # a URI's driver files win over whatever a previous run left locally
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise SweepError(f"--storage={args.storage!r}: cannot read {store.uri} ({exc})") from None
    saved_path = store.path(SWEEP_FILE)
    if not saved_path.exists():
        if args.resume:
            raise SweepError(f"--resume: there is no sweep in {store.describe()} (no {SWEEP_FILE}); start it "
                             "without --resume")
        return plan, False
    try:
        saved = json.loads(saved_path.read_text())["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise SweepError(f"{saved_path} is unreadable ({exc}); restore it from a copy of the sweep folder, or "
                         "start a new sweep with another --name") from None
    if args.resume:
        return Plan.from_settings(plan.name, saved), True
    now = json.loads(json.dumps(plan.settings()))
    diff = [k for k in now if now[k] != saved.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff if k not in ("space", "data_dir"))
        if diff == ["data_dir"]:  # the same sweep on another machine or mount: data found elsewhere
            return Plan.from_settings(plan.name, {**saved, "data_dir": plan.data_dir}), True
        raise SweepError(f"sweep {plan.name!r} in {store.describe()} was started with other settings "
                         f"({shown or 'space definition differs'}); finish it with --resume, or start a new sweep "
                         "with another --name")
    return plan, True


def parse_pack_size(text: str | None) -> int | str | None:
    """--pack-size: a whole number >= 1, 'auto', or None (not given)."""
    if text is None or text == AUTO:
        return text
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise SweepError(f"--pack-size={text} must be a whole number >= 1 (1 = no packs: one trial per Ray trial) "
                         "or 'auto'")
    return size


def resolve_pack_size(given: int | str | None, store: "SweepStore", resumed: bool, gpus_per_trial: float = 0.0
                      ) -> int | str:
    """--pack-size; else the one the sweep's last run used (runtime.json) when it resumes; else
    `default_pack_size` ('auto' is measured before the sweep: `sweeps.pack_probe`)."""
    from sweeps.searchers import RUNTIME_FILE

    if given is not None:
        return given
    path = store.path(RUNTIME_FILE)
    if resumed and path.exists():
        try:
            return int(json.loads(path.read_text()).get("pack_size") or 1)
        except (OSError, ValueError):
            return 1
    return default_pack_size(gpus_per_trial)


def default_pack_size(gpus_per_trial: float) -> int | str:
    """Without --pack-size: 'auto' for GPU trials, 1 on CPU, where a pack saves little (README, "Packs")."""
    return AUTO if gpus_per_trial > 0 else 1


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
def ray_address(args: argparse.Namespace) -> str | None:
    """The cluster to join: --address, else RAY_ADDRESS (set by `ray job submit`); None = a new local Ray."""
    return args.address or os.environ.get("RAY_ADDRESS") or None


def connect(args: argparse.Namespace) -> tuple[bool, str | None]:
    """Join `ray_address(args)` or start a private local Ray. Returns (this call started or joined
    Ray, the temp dir of a local Ray we started)."""
    import ray

    from sweeps import local_ray

    if ray.is_initialized():
        return False, None
    address = ray_address(args)
    if not address or address == "local":
        try:
            return True, local_ray.start(log_to_driver=bool(args.verbose))
        except local_ray.LocalRayError as exc:
            raise SweepError(str(exc)) from None
    try:
        ray.init(address=address, log_to_driver=bool(args.verbose), logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, auth errors, version mismatches: one line each
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SweepError(f"cannot join Ray at {address!r} ({type(exc).__name__}: {first}); check that its head "
                         "runs (`ray status --address HOST:PORT`), RAY_AUTH_MODE and the token match the cluster, "
                         "or leave --address out to start a private local Ray") from None
    return True, None


def _preflight(check: Any, *args: Any, **kwargs: Any) -> None:
    """Run a `sweeps.preflight` check; its ValueError/RuntimeError becomes bad input (exit code 2)."""
    try:
        check(*args, **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise SweepError(str(exc)) from None


class _NoTunerRestoreHint(logging.Filter):
    """Ray Tune ends an interrupted run with 'Resume experiment with: Tuner.restore(...)'; following it
    skips this sweep's Optuna reconciliation. The driver prints its own --resume line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


class _OneLineStorageFailures(logging.Filter):
    """A trial that fails because the storage is full or gone makes Ray log its whole traceback;
    the sweep stops on it with the --resume line, so one line per failure is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        from sweeps.storage import storage_failure

        exc = record.exc_info[1] if record.exc_info else None
        failure = storage_failure(exc) if exc is not None else None
        if failure:
            record.msg, record.args = f"{record.getMessage()}: {failure}", ()
            record.exc_info, record.exc_text = None, None
        return True


def configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ray.tune.tune").addFilter(_NoTunerRestoreHint())
    import ray  # noqa: F401 - only when running a sweep: Ray installs its own log handlers at import

    for logger in (logging.getLogger(), logging.getLogger("ray")):
        for handler in logger.handlers:
            handler.addFilter(_OneLineStorageFailures())
    # Read by Ray Tune at import: a busy 2-core machine makes 0.5 s callbacks common, not a problem.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    from sweeps import preflight
    from sweeps.plan import SweepError as PlanError
    from sweeps.storage import DriverLock, StorageError, SweepLocked, storage_failure

    bad_input = (SweepError, PlanError)

    try:
        plan = make_plan(args)
        if args.dry_run:
            from sweeps.storage import SweepStore

            size = args.pack_size or default_pack_size(args.gpus_per_trial)
            print_dry_run(plan, SweepStore.open(str(args.storage), plan.name).describe(), size)
            return 0
        _preflight(preflight.check_address, ray_address(args), timeout_s=3)
        store = open_store(args, plan.name)
    except bad_input as exc:
        return _fail(exc)
    lock = DriverLock(store)
    try:
        lock.acquire()
    except (SweepLocked, StorageError) as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(f"cannot lock the sweep folder {store.describe()} ({exc}); check the storage")
    if lock.took_over:
        logging.getLogger("sweeps.run").info("took over the sweep lock of a driver that is gone (%s)",
                                             lock.took_over)
    joined, ray_tmp = False, None
    code = EXIT_BAD_INPUT
    try:
        plan, resumed = load_settings(args, plan, store)
        asked_auto = args.pack_size == AUTO  # explicit: measure even where trials get no GPU
        args.pack_size = resolve_pack_size(args.pack_size, store, resumed, args.gpus_per_trial)
        joined, ray_tmp = connect(args)
        from sweeps.driver import Driver

        # resources some node (or autoscaler node type) offers, same code on every node, storage
        # every node sees: all before the first trial
        _preflight(preflight.run_preflight, store.experiments, args.gpus_per_trial, args.cpus_per_trial)
        if args.pack_size == AUTO:
            from sweeps.pack_probe import auto_pack_size

            args.pack_size = auto_pack_size(plan, store, cpus=args.cpus_per_trial, gpus=args.gpus_per_trial,
                                            say=(lambda _: None) if args.quiet else print, measure_cpu=asked_auto)
        if not resumed:  # only a sweep that passed every check is recorded (and can be resumed)
            from adrec.record import write_json

            write_json(store.path(SWEEP_FILE), {"name": plan.name, "settings": plan.settings(), "created": time.time()})
            store.push(SWEEP_FILE)
        code = Driver(plan, store, args).run(resumed)
        return code
    except bad_input as exc:
        return _fail(exc)
    except Exception as exc:
        failure = storage_failure(exc)
        if failure is None:
            raise
        print(f"sweeps: error: the storage failed before the sweep started ({failure}); free space or fix the "
              f"storage, then run: {resume_command(plan.name, str(args.storage))}", file=sys.stderr)
        return EXIT_STORAGE
    finally:
        if joined:
            import ray

            ray.shutdown()
        if ray_tmp:
            from sweeps import local_ray

            if code in (0, EXIT_INTERRUPTED, EXIT_STORAGE):
                local_ray.cleanup(ray_tmp)  # else kept: its logs say why Ray failed
        lock.release()


def _fail(exc: BaseException | str) -> int:
    print(f"sweeps: error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
