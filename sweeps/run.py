"""`python sweeps/run.py --space NAME`: the ADRec design-choice sweep on Ray Tune + Optuna.

One Tuner per phase (paired, optimize, confirm, baseline), each an experiment folder under
`<storage>/<name>/`; inside the optimise Tuner a dispatcher gives every dataset its own Optuna
study and its own ASHA rungs. Everything a restart needs is on disk (Ray's experiment state and
checkpoints, the Optuna journal, the job lists), so `--resume` (or the same command again) finishes
a sweep after Ctrl-C, SIGTERM or SIGKILL. Bad input fails with one message and exit code 2 before
any trial starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python sweeps/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Read by Ray Tune at import: a busy 2-core machine makes 0.5 s callbacks common, not a problem.
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")

from sweeps import preflight  # noqa: E402
from sweeps.plan import PHASES, Plan, SweepError, dataset_key, parse_metric, write_json  # noqa: E402
from sweeps.spaces import BUILTIN, SpaceError, load_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = REPO / "runs"
SWEEP_FILE = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python sweeps/run.py",
        description="Sweep ADRec's design choices with Ray Tune + Optuna: a paired space-filling phase on "
                    "every dataset, per-dataset TPE with ASHA, a confirm phase with fresh seeds and baselines. "
                    "Rows in trials.parquet = datasets x (paired x repeats + TPE + confirm x repeats + baselines).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--space", default="smoke", help=f"built-in space ({', '.join(BUILTIN)}) or a path to a YAML space file")
    a("--datasets", help="comma list of registry names or dataset file paths (default: the space's datasets)")
    a("--paired-samples", type=int, help="space-filling configs shared by all datasets (default: the space's)")
    a("--repeats", type=int, help="seeds per paired and per confirmed config (default: the space's)")
    a("--num-samples", type=int, help="TPE trials per dataset in the optimise phase (default: the space's)")
    a("--confirm-top", type=int, help="best configs per dataset re-run with fresh seeds (default: the space's)")
    a("--metric", default="val_NDCG@20", help="validation metric to maximise; each trial reports its best-so-far "
                                              "value as `objective`")
    a("--cpus-per-trial", type=float, default=1.0, help="CPUs each trial reserves")
    a("--gpus-per-trial", type=float, default=0.0, help="GPUs each trial reserves; fractions share one GPU")
    a("--max-concurrent", type=int, default=0, help="most trials running at once (0: as many as resources allow)")
    a("--max-failures", type=int, default=2, help="retries of a crashed trial, each from its last checkpoint")
    a("--address", help="Ray cluster to join ('auto' = the running one); default: RAY_ADDRESS, else a local Ray")
    a("--storage", default=str(DEFAULT_STORAGE), help="folder every node sees (NFS on a cluster); the sweep "
                                                      "folder is <storage>/<name>")
    a("--data-dir", help="folder with the dataset files (default: ADREC_DATA_DIR, shared/datasets, ~/.cache/adrec)")
    a("--name", help="sweep name (default: the space name)")
    a("--resume", action="store_true", help="finish the sweep in <storage>/<name> with its saved settings")
    a("--seed", type=int, default=2025, help="seed of the paired design, the TPE samplers and the trials")
    a("--time-budget", type=float, help="seconds after which the sweep stops as after Ctrl-C (resumable)")
    a("--max-users", type=int, default=0, help="keep the first N users of each dataset (tests, smoke runs)")
    a("--dry-run", action="store_true", help="print trials per phase and dataset and an estimated cost; run nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true", help="only errors and the final table")
    g.add_argument("--verbose", action="store_true", help="Ray's own progress output and trial logs too")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="run the analysis (python -m results) on the finished sweep")
    return p


# --------------------------------------------------------------------------------------------------
# Input checks (no Ray)
# --------------------------------------------------------------------------------------------------
def make_plan(args: argparse.Namespace) -> Plan:
    try:
        space = load_space(args.space)
    except SpaceError as exc:
        raise SweepError(str(exc)) from None
    from adrec.data import dataset_path, resolve_data_dir

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
    if args.max_users < 0:
        raise SweepError(f"--max-users={args.max_users} must be >= 0 (0 = all users)")
    error = preflight.resource_request_error(args.gpus_per_trial, args.cpus_per_trial)
    if error:
        raise SweepError(error)
    plan = Plan(name=args.name or space.name, space=space, datasets=tuple(datasets), baselines=space.baselines,
                metric=parse_metric(args.metric), seed=args.seed, max_users=args.max_users, data_dir=data_dir,
                **counts)
    if plan.total() == 0:
        raise SweepError("the sweep has no trials: every count is 0; raise --paired-samples or --num-samples")
    plan.paired_jobs(plan.paired_configs())  # builds every paired config as a TrialConfig: invalid ones stop here
    plan.baseline_jobs()
    return plan


def print_dry_run(plan: Plan, sweep_dir: Path) -> None:
    table = plan.cost_table()
    print(f"sweep {plan.name!r} in {sweep_dir}  space={plan.space.name} metric=val_{plan.metric} seed={plan.seed}")
    print(f"per dataset: paired {plan.paired_samples} configs x {plan.repeats} seeds, optimise {plan.num_samples} "
          f"TPE trials, confirm top {plan.confirm_top} x {plan.repeats} seeds, baselines {list(plan.baselines)}")
    wide = table.pivot(index="dataset", columns="phase", values="trials")[list(PHASES)]
    wide["total"] = wide.sum(axis=1)
    print(wide.to_string())
    print(f"total trials: {plan.total()}  estimated cost: at most {table['cpu_hours_at_most'].sum():.1f} CPU-hours "
          "(upper bound at full epoch budgets; early stopping and the stage-1 cache cut it)")


def prepare_sweep_dir(args: argparse.Namespace, plan: Plan) -> tuple[Plan, Path, bool]:
    """Create or reopen <storage>/<name>; returns (plan to run, folder, resumed?)."""
    storage = str(args.storage)
    if "://" in storage:
        raise SweepError(f"--storage={storage!r}: the sweep keeps its Optuna journal, stage-1 cache and table "
                         "next to the experiments, which needs a file system path; on a cluster use a folder "
                         "every node mounts (NFS)")
    sweep_dir = Path(storage).expanduser().resolve() / plan.name
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        probe = sweep_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SweepError(f"--storage={storage!r} is not writable ({exc.strerror or exc}); pick a folder you can "
                         "write to") from None
    saved_path = sweep_dir / SWEEP_FILE
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())["settings"]
        if args.resume:
            return Plan.from_settings(plan.name, saved), sweep_dir, True
        now = json.loads(json.dumps(plan.settings()))
        diff = [k for k in now if now[k] != saved.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff if k != "space")
            raise SweepError(f"sweep {plan.name!r} in {sweep_dir} was started with other settings "
                             f"({shown or 'space definition differs'}); finish it with --resume, or start a new "
                             "sweep with another --name")
        return plan, sweep_dir, True
    if args.resume:
        raise SweepError(f"--resume: there is no sweep in {sweep_dir} (no {SWEEP_FILE}); start it without --resume")
    return plan, sweep_dir, False


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------
def _preflight(check: Any, *args: Any, **kwargs: Any) -> None:
    """Run a `sweeps.preflight` check; its ValueError/RuntimeError becomes bad input (exit code 2)."""
    try:
        check(*args, **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise SweepError(str(exc)) from None


def connect(args: argparse.Namespace) -> bool:
    """Join or start Ray; True when this call did it (so the driver shuts it down at the end)."""
    import ray

    if ray.is_initialized():
        return False
    address = args.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": bool(args.verbose), "logging_level": logging.WARNING}
    if not address:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=args.address or None, **kwargs)
    except ConnectionError as exc:
        raise SweepError(f"cannot join Ray at {address!r}: {exc}; start a cluster with `ray start --head` or "
                         "leave --address out to start a local Ray") from None
    return True


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        plan = make_plan(args)
        if args.dry_run:
            sweep_dir = Path(args.storage).expanduser().resolve() / plan.name
            print_dry_run(plan, sweep_dir)
            return 0
        _preflight(preflight.check_address, args.address or os.environ.get("RAY_ADDRESS"), timeout_s=3)
        plan, sweep_dir, resumed = prepare_sweep_dir(args, plan)
        started_ray = connect(args)
    except SweepError as exc:
        print(f"sweeps: error: {exc}", file=sys.stderr)
        return 2
    from sweeps.driver import Driver

    try:
        # resources some node (or autoscaler node type) offers, same code on every node, storage
        # every node sees: all before the first trial
        _preflight(preflight.run_preflight, str(sweep_dir), args.gpus_per_trial, args.cpus_per_trial)
        if not resumed:  # only a sweep that passed every check is recorded (and can be resumed)
            write_json(sweep_dir / SWEEP_FILE, {"name": plan.name, "settings": plan.settings(),
                                               "created": time.time()})
        return Driver(plan, sweep_dir, args).run(resumed)
    except SweepError as exc:
        print(f"sweeps: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started_ray:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
