"""Time `python -m results` on a full-size synthetic sweep: seconds and peak RSS on one core.

    python scripts/bench_results.py [--configs 960] [--datasets 6] [--seeds 3] [--keep DIR]

Builds a trial table the size of a full sweep (960 paired configs x 6 datasets x 3 seeds, about
17k rows, plus confirm/optimize/baseline rows) over the `full` space's knobs with a planted truth
(`results.synthetic`), then runs the report CLI on it in a child process pinned to one CPU core
with single-threaded BLAS, and prints the child's wall-clock and CPU seconds (the CPU figure is
what a free core needs on a busy machine) and its peak RSS.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results.synthetic import BASE, FULL_SPACE, make_table, mlp_branch  # noqa: E402


def truth(dataset: str, cfg: dict) -> float:
    """A plausible sweep: lr matters everywhere, aggregation and positional encoding interact,
    the schedule matters a little on half of the datasets, the rest is noise."""
    mean = BASE[dataset] - 0.02 * (np.log10(cfg["lr"]) + 3) ** 2
    if cfg["aggregation"] == "cross_attention" and cfg["positional_encoding"] == "rotary":
        mean += 0.02
    if cfg["noise_schedule"] in ("cosine", "sqrt") and dataset in ("d1", "d3", "d5"):
        mean -= 0.006
    if cfg["denoiser"] == "mlp":
        mean -= 0.004
    return mean


def diverge(dataset: str, cfg: dict) -> float:
    return 0.5 if dataset == "d6" and cfg["aggregation"] == "adaln" else 0.01


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=int, default=960)
    p.add_argument("--datasets", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--keep", type=Path, default=None, help="folder to keep the table and report in")
    args = p.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_results_"))
    folder.mkdir(parents=True, exist_ok=True)
    datasets = tuple(sorted(BASE))[:args.datasets]
    table = make_table(truth, n_configs=args.configs, seeds=args.seeds, datasets=datasets,
                       space=FULL_SPACE, confound=mlp_branch, diverge=diverge, seed=0)
    table.to_parquet(folder / "trials.parquet")
    paired = int((table["phase"] == "paired").sum())
    print(f"table: {len(table)} rows ({paired} paired: {args.configs} configs x {len(datasets)} "
          f"datasets x {args.seeds} seeds) in {folder}", flush=True)
    env = {**os.environ, **{v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                              "MKL_NUM_THREADS")}}
    pin = ["taskset", "-c", "0"] if sys.platform.startswith("linux") and _has("taskset") else []
    start = time.perf_counter()
    done = subprocess.run([*pin, sys.executable, "-m", "results", str(folder), "-q"], cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    # CPU seconds say what one free core needs; wall seconds also count other processes' turns
    print(f"python -m results: exit {done.returncode}, {seconds:.1f} s wall, "
          f"{usage.ru_utime + usage.ru_stime:.1f} s CPU on one core "
          f"({'taskset -c 0' if pin else 'not pinned'}), peak RSS {peak:.0f} MiB")
    return done.returncode


def _has(tool: str) -> bool:
    return any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(os.pathsep))


if __name__ == "__main__":
    sys.exit(main())
