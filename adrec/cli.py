"""`python -m adrec train | knobs | data stats | bench`: the command line over `fit`, the knobs, the data
and the bench. torch is imported only by the commands that train, so `knobs` and `--help` are quick."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from adrec.config import KNOBS, METRICS, Knob, TrialConfig, parse_assignment


# `train --quick` and every trial of the smoke sweep (sweeps/spaces.py): a minute or two on a CPU core
# instead of hours. Batches of 64 users instead of the authors' 512 give 15 optimiser steps per ml-100k
# epoch instead of 2: measured on ml-100k, stage 1 reaches val NDCG@20 0.055 in 10 epochs (0.031, the
# most-popular level, with 512), and 5 ADRec epochs after it 0.06-0.07 (the full run: ~0.09), at
# about twice the seconds per epoch. One validation pass at the end of each stage.
QUICK: dict[str, Any] = {"stage1_epochs": 10, "stage2_epochs": 1, "stage3_epochs": 4, "eval_every": 5,
                         "batch_size": 64}
_EPOCH_FIELDS = ("stage1_epochs", "stage2_epochs", "stage3_epochs", "eval_every")


def build_config(args: argparse.Namespace) -> TrialConfig:
    """--config FILE (a trial record or a bare config) < --quick < --dataset/--data-path/--data-dir/--model
    < --set: what a user sets by name always wins over a preset."""
    values: dict[str, Any] = {}
    if args.config:
        record = json.loads(Path(args.config).read_text())
        values.update(record.get("config", record))
    if getattr(args, "quick", False):
        values.update(QUICK)
    if getattr(args, "data_path", None):
        values["dataset"] = str(Path(args.data_path).resolve())
    elif args.dataset:
        values["dataset"] = args.dataset
    if args.data_dir:
        values["data_dir"] = args.data_dir
    if getattr(args, "model", None):
        values["model"] = args.model
    for item in args.set or []:
        name, value = parse_assignment(item)
        values[name] = value
    return TrialConfig.from_dict(values)


def check_dataset(cfg: TrialConfig) -> None:
    """Fail before training when the dataset cannot be found (the message lists the known names)."""
    from adrec.data import dataset_path

    dataset_path(cfg.dataset, cfg.data_dir)


def metrics_table(result: dict[str, Any]) -> str:
    header = f"{'split':<6}" + "".join(f"{m:>10}" for m in METRICS)
    rows = [header]
    for split in ("val", "test"):
        values = result.get(split) or {}
        rows.append(f"{split:<6}" + "".join(f"{values.get(m, float('nan')):>10.4f}" for m in METRICS))
    return "\n".join(rows)


def parse_seeds(text: str) -> list[int]:
    """'2025-2029' or '2025,2027,2031' -> the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--seeds: {part.strip()!r} is not a seed or a range like 2025-2029") from None
        if last < first:
            raise ValueError(f"--seeds: the range {part.strip()!r} runs backwards")
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    return seeds


def seeds_summary(results: list[dict[str, Any]]) -> str:
    """Mean and sample sd over seeds of each test metric (the spread a paper table should state)."""
    import statistics

    lines = [f"{'':<6}" + "".join(f"{m:>10}" for m in METRICS)]
    tests = [r.get("test") or {} for r in results if r.get("status") == "completed"]
    for name, fn in (("mean", statistics.fmean), ("sd", statistics.stdev)):
        values = [fn([t[m] for t in tests]) if len(tests) > (name == "sd") else float("nan") for m in METRICS]
        lines.append(f"{name:<6}" + "".join(f"{v:>10.4f}" for v in values))
    return f"test over {len(tests)} seeds\n" + "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from adrec.train import fit

    cfg = build_config(args)
    check_dataset(cfg)
    print(training_plan(cfg, args), file=sys.stderr)
    if args.seeds:
        return train_seeds(cfg, parse_seeds(args.seeds), args)
    result = fit(cfg, progress=not args.quiet, stage1_cache=args.stage1_cache)
    print(metrics_table(result))
    print(f"status={result['status']} epochs={result['epochs']} seconds="
          + json.dumps({k: round(v, 1) for k, v in result["seconds"].items()}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0 if result["status"] == "completed" else 3


def train_seeds(cfg: TrialConfig, seeds: list[int], args: argparse.Namespace) -> int:
    """The config once per seed, all seeds trained as one pack; --out gets the list of records."""
    from adrec.pack import fit_pack

    cfgs = [cfg.replace(seed=s) for s in seeds]
    print(f"training {len(cfgs)} seeds as one pack: {', '.join(map(str, seeds))}", file=sys.stderr)
    results = fit_pack(cfgs, stage1_cache=args.stage1_cache)
    for seed, result in zip(seeds, results):
        print(f"seed {seed}: status={result['status']} epochs={result['epochs']}")
        print(metrics_table(result))
    print(seeds_summary(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0 if all(r["status"] == "completed" for r in results) else 3


def training_plan(cfg: TrialConfig, args: argparse.Namespace) -> str:
    """One line saying how long the run may train, before it starts; with a hint when a user shortened
    some stages but left the others at the authors' lengths (the warm-up's 5 epochs, evaluation every 5)."""
    s1, s2, s3 = cfg.stage_epochs()
    if cfg.model == "most_popular":
        return "training: none (most_popular counts items)"
    if cfg.model == "sasrec":
        line = f"training: at most {cfg.stage1_epochs} epochs, validation every {cfg.eval_every}"
    else:
        line = (f"training: stage 1 at most {s1} epochs, stage 2 {s2}, stage 3 at most {s3}; validation every "
                f"{cfg.eval_every} epochs, stopping after {cfg.patience} without improvement")
    given = {parse_assignment(item)[0] for item in args.set or []}
    if getattr(args, "quick", False):
        kept = [f"{k}={getattr(cfg, k)}" for k in QUICK if k not in given]
        line += f" (--quick: {', '.join(kept)}" + (f"; {', '.join(sorted(given & set(QUICK)))} from --set)"
                                                   if given & set(QUICK) else ")")
    elif given & set(_EPOCH_FIELDS) and set(_EPOCH_FIELDS) - given:
        rest = ", ".join(f"{f}={getattr(cfg, f)}" for f in _EPOCH_FIELDS if f not in given)
        line += (f"\nnote: {rest} kept from the config; a quick run is `--quick` "
                 f"({', '.join(f'{k}={v}' for k, v in QUICK.items())})")
    return line


def fmt_value(value: Any) -> str:
    """A knob value as a user types it after --set: 0.001, trunc_lin, true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def knob_record(knob: Knob) -> dict[str, Any]:
    """One row of `python -m adrec knobs`: what the knob is called, what it takes, when it acts."""
    if knob.choices:
        values = ", ".join(map(fmt_value, knob.choices))
    else:
        values = f"{fmt_value(knob.low)} .. {fmt_value(knob.high)}"
    return {"knob": knob.name, "paper": knob.paper, "kind": knob.kind, "values": values, "scale": knob.scale,
            "active_when": knob.describe_when(), "default": fmt_value(knob.default), "help": knob.help}


def cmd_knobs(args: argparse.Namespace) -> int:
    rows = [knob_record(k) for k in KNOBS.values()]
    if args.json:
        json_rows = [{**r, "low": k.low, "high": k.high, "choices": list(k.choices), "default": k.default,
                      "when": {f: list(v) for f, v in k.when}} for r, k in zip(rows, KNOBS.values())]
        print(json.dumps(json_rows, indent=1))
        return 0
    columns = ("knob", "paper", "values", "scale", "active_when", "default")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())
    print(f"\n{len(rows)} knobs; set any with `--set knob=value` (train, bench) or search it in a sweep space. "
          "values: the range a sweep searches by default (any valid value may be set).")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from adrec.data import stats_table

    table = stats_table(args.data_dir)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from adrec.bench import run_bench, run_pack_bench

    cfg = build_config(args)
    check_dataset(cfg)
    if args.pack:
        figures = run_pack_bench(cfg, args.pack, epochs=args.epochs, stack=args.stack)
    else:
        figures = run_bench(cfg, epochs=args.epochs, warmup=args.warmup)
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


def _add_trial_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="registry name (baby, beauty, sports, toys, ml-100k, yelp) or a file path")
    p.add_argument("--data-path", help="train on any file in either format (split pickle or sequence text)")
    p.add_argument("--data-dir", help="where the dataset files are (default: see README)")
    p.add_argument("--model", choices=["adrec", "sasrec", "most_popular"], help="model (default adrec)")
    p.add_argument("--config", help="JSON trial record or config to re-run (its 'config' is used)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a TrialConfig field; repeatable")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adrec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one trial and print validation and test metrics")
    _add_trial_options(train)
    train.add_argument("--out", help="write the result record (JSON) here")
    train.add_argument("--stage1-cache", help="directory shared by runs that can reuse one stage-1 result")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--seeds", metavar="LIST",
                       help="train the config once per seed (2025-2029 or 2025,2031) as one pack; prints each "
                            "seed's metrics and the mean and sd; --out gets a list of records (ADRec only)")
    train.add_argument("--quick", action="store_true",
                       help="minutes, not hours: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                            + " (the smoke sweep's trials; --set overrides any of them)")
    train.set_defaults(func=cmd_train)

    knobs = sub.add_parser("knobs", help="every design knob: paper name, values or range, scale, when it is "
                                         "active, the authors' default")
    knobs.add_argument("--json", action="store_true", help="machine-readable: a JSON list, one object per knob")
    knobs.set_defaults(func=cmd_knobs)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser("stats", help="users, items, interactions, lengths per dataset, from the files")
    stats.add_argument("--data-dir", help="where the dataset files are")
    stats.set_defaults(func=cmd_data_stats)

    bench = sub.add_parser("bench", help="time training epochs and evaluation passes of the real trainer")
    _add_trial_options(bench)
    bench.add_argument("--device", choices=["cpu", "cuda", "auto"], help="shorthand for --set device=...")
    bench.add_argument("--epochs", type=int, default=2, help="timed epochs per stage (after warm-up)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    bench.add_argument("--out", help="write the figures (JSON) here")
    bench.add_argument("--pack", type=int, default=0, metavar="K",
                       help="time K seeds trained as one pack against the K runs in sequence")
    bench.add_argument("--stack", type=int, default=None, metavar="S",
                       help="with --pack: members per stacked network (default: all on a GPU, 1 on CPU)")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = parser().parse_args(argv)
    if getattr(args, "device", None):
        args.set = (args.set or []) + [f"device={args.device}"]
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad input or an unreachable download: one clear line
        print(f"error: {exc}", file=sys.stderr)
        return 2
