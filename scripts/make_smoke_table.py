"""Print a sweep's trial table as Markdown (README's smoke-run table).

    python scripts/make_smoke_table.py [runs/smoke] [--metric NDCG@20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adrec.record import STAGES, TABLE_FILE, RecordError, read_table  # noqa: E402


def markdown(df: pd.DataFrame, metric: str) -> str:
    seconds = df[[f"seconds_{s}" for s in STAGES]].sum(axis=1, min_count=1)
    view = pd.DataFrame({
        "phase": df["phase"], "dataset": df["dataset"], "config": df["config_id"], "seed": df["seed"],
        "model": df["model"], "status": df["status"],
        f"val {metric}": df[f"val_{metric}"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
        f"test {metric}": df[f"test_{metric}"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "-"),
        "train s": seconds.map(lambda v: f"{v:.0f}" if pd.notna(v) else "-"),
    })
    head = "| " + " | ".join(view.columns) + " |"
    rule = "|" + "|".join("---" for _ in view.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in view.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", nargs="?", default=str(REPO / "runs" / "smoke"), help="sweep folder")
    p.add_argument("--metric", default="NDCG@20")
    args = p.parse_args(argv)
    path = Path(args.sweep) / TABLE_FILE
    if not path.exists():
        print(f"no {path}; run `python sweeps/run.py --space smoke` first", file=sys.stderr)
        return 2
    try:
        table = read_table(path)
    except RecordError as err:
        print(err, file=sys.stderr)
        return 2
    print(markdown(table, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
