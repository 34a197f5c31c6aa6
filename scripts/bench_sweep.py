"""Trials per hour of the `smoke` trial settings at 1 and 2 concurrent trials on this machine.

The smoke space itself runs one trial per phase (nothing to run side by side), so the bench runs
its trial settings as one paired phase of `--trials` configs (ml-100k, one seed, no baselines),
once per concurrency level, each in a fresh sweep folder (so each pays for its stage-1 cache
once, as a real sweep does). Ray starts once, before the clock starts.

    python scripts/bench_sweep.py [--trials 4] [--concurrency 1,2] [--max-users 0]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.run import main as sweep_main  # noqa: E402
from sweeps.spaces import SMOKE  # noqa: E402


def bench(trials: int, concurrency: int, max_users: int, storage: Path) -> dict[str, float]:
    space = {**SMOKE, "baselines": [],
             "counts": {"paired_samples": trials, "repeats": 1, "num_samples": 0, "confirm_top": 0}}
    path = storage / f"bench-c{concurrency}.yaml"
    path.write_text(yaml.safe_dump(space))
    started = time.perf_counter()
    code = sweep_main(["--space", str(path), "--storage", str(storage), "--max-concurrent", str(concurrency),
                       "--max-users", str(max_users), "--no-report", "--quiet"])
    wall = time.perf_counter() - started
    if code:
        raise SystemExit(f"the bench sweep failed with exit code {code}")
    import pandas as pd

    df = pd.read_parquet(storage / path.stem / "trials.parquet")
    busy = df[["seconds_stage1", "seconds_stage2", "seconds_stage3"]].sum(axis=1)
    return {"concurrency": concurrency, "trials": len(df), "wall_s": round(wall, 1),
            "trials_per_hour": round(len(df) / wall * 3600, 1), "mean_trial_train_s": round(float(busy.mean()), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4, help="trials per concurrency level")
    p.add_argument("--concurrency", default="1,2", help="comma list of concurrent-trial limits")
    p.add_argument("--max-users", type=int, default=0, help="slice of ml-100k (0 = all users)")
    args = p.parse_args(argv)
    import ray

    levels = [int(c) for c in args.concurrency.split(",")]
    ray.init(num_cpus=max(levels), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for c in levels:
            rows.append(bench(args.trials, c, args.max_users, Path(tmp)))
            print(rows[-1], flush=True)
    ray.shutdown()
    print(f"{'concurrent':>10} {'trials':>6} {'wall s':>8} {'trials/hour':>12} {'mean train s':>13}")
    for r in rows:
        print(f"{r['concurrency']:>10} {r['trials']:>6} {r['wall_s']:>8} {r['trials_per_hour']:>12} "
              f"{r['mean_trial_train_s']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
