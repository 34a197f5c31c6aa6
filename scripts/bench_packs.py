"""Trials per hour on one device: K trials as one pack against K separate processes side by side.

No Ray, no Optuna: what it measures is the device, so it runs where only torch is installed (the
GPU machine). Each trial is a real `python -m adrec train` run to its end (validation passes and
the test pass included) of `--epochs` stage-3 epochs without pre-training (the issue's "8-epoch
baby trial"), seeds seed .. seed+K-1. For each K:

- pack:      one process, `python -m adrec train --seeds S..S+K-1` (one model with a member axis);
- processes: K processes started together on the same device (on CPU each gets cores // K threads).

Wall-clock runs from the launch to the last exit, so process start-up and data loading count as a
sweep would pay them. Members equal their solo runs, so the two modes' mean val NDCG@20 must agree;
the table prints both.

    python scripts/bench_packs.py --dataset baby --device cuda --sizes 1,4,16,64
    python scripts/bench_packs.py --dataset ml-100k --device cpu --sizes 1,2 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def trial_args(dataset: str, device: str, epochs: int, extra: list[str]) -> list[str]:
    sets = {"device": device, "stage_plan": "no_pretrain", "stage1_epochs": 0, "stage2_epochs": 0,
            "stage3_epochs": epochs}
    out = ["--dataset", dataset, "--quiet"]
    for name, value in sets.items():
        out += ["--set", f"{name}={value}"]
    for item in extra:
        out += ["--set", item]
    return out


def launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adrec", "train", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs):
        if proc.wait() != 0:
            raise SystemExit(f"a trial failed (exit {proc.returncode}); its log:\n{log.read_text()[-3000:]}")


def run_pack(k: int, base: list[str], seed: int, env: dict[str, str], tmp: Path) -> tuple[float, list[dict]]:
    out, log = tmp / f"pack{k}.json", tmp / f"pack{k}.log"
    start = time.perf_counter()
    wait_all([launch([*base, "--seeds", f"{seed}-{seed + k - 1}", "--out", str(out)], env, log)], [log])
    return time.perf_counter() - start, json.loads(out.read_text())


def run_processes(k: int, base: list[str], seed: int, env: dict[str, str], tmp: Path
                  ) -> tuple[float, list[dict]]:
    outs = [tmp / f"proc{k}-{i}.json" for i in range(k)]
    logs = [o.with_suffix(".log") for o in outs]
    start = time.perf_counter()
    procs = [launch([*base, "--set", f"seed={seed + i}", "--out", str(o)], env, log)
             for i, (o, log) in enumerate(zip(outs, logs))]
    wait_all(procs, logs)
    return time.perf_counter() - start, [json.loads(o.read_text()) for o in outs]


def row(mode: str, k: int, wall: float, records: list[dict[str, Any]]) -> dict[str, Any]:
    ndcg = [r["val"]["NDCG@20"] for r in records if r.get("val")]
    return {"K": k, "mode": mode, "wall_s": round(wall, 1), "trials_per_hour": round(k / wall * 3600, 1),
            "mean_val_NDCG@20": round(statistics.fmean(ndcg), 5) if ndcg else float("nan")}


def thread_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="baby")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default="1,4,16,64", help="comma list of K")
    p.add_argument("--epochs", type=int, default=8, help="stage-3 epochs per trial")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--modes", default="pack,processes", help="pack, processes or both")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="extra config override")
    p.add_argument("--out", help="write the rows (JSON) here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if min(sizes) < 1 or args.epochs < 1:
        p.error(f"--sizes must be >= 1 and --epochs >= 1; got {args.sizes}, {args.epochs}")
    modes = args.modes.split(",")
    base = trial_args(args.dataset, args.device, args.epochs, args.set)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-packs-") as tmp:
        for k in sizes:
            if "pack" in modes:
                env = thread_env(cores if args.device == "cpu" else None)
                rows.append(row("pack", k, *run_pack(k, base, args.seed, env, Path(tmp))))
                print(rows[-1], flush=True)
            if "processes" in modes:
                env = thread_env(max(1, cores // k) if args.device == "cpu" else None)
                rows.append(row("processes", k, *run_processes(k, base, args.seed, env, Path(tmp))))
                print(rows[-1], flush=True)
    print(f"\n{args.dataset}, {args.epochs}-epoch trials on {args.device} ({cores} cores)")
    print(f"{'K':>4} {'mode':>10} {'wall s':>8} {'trials/hour':>12} {'mean val NDCG@20':>17}")
    for r in rows:
        print(f"{r['K']:>4} {r['mode']:>10} {r['wall_s']:>8} {r['trials_per_hour']:>12} {r['mean_val_NDCG@20']:>17}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
