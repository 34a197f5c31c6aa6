"""`python -m results NAME|FOLDER [--out DIR] [--metric M]`: the report of one sweep.

NAME is a sweep under runs/ of the repository root (runs/NAME/trials.parquet); FOLDER is any
folder holding trials.parquet (or the parquet file itself). The report goes to FOLDER/report
unless --out says otherwise. Exit status 0 on success, 2 when the table cannot be analysed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from results.report import build_report
from results.table import DEFAULT_METRIC, TableError, load_table

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_NAME = "trials.parquet"
log = logging.getLogger("results")


def resolve_table(target: str, runs_dir: Path = REPO_ROOT / "runs") -> Path:
    """The trials.parquet that NAME|FOLDER|FILE points at; TableError naming the places tried."""
    given = Path(target).expanduser()
    candidates = [given] if given.suffix == ".parquet" else [given / TABLE_NAME]
    if not given.is_absolute() and given.parts and given.parts[0] != "runs":
        candidates.append(runs_dir / target / TABLE_NAME)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise TableError(f"no trial table for {target!r}: looked for "
                     f"{' and '.join(str(p) for p in candidates)}; give a sweep name under "
                     f"{runs_dir} or a folder holding {TABLE_NAME} (run the sweep first)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m results",
        description="The cross-dataset sensitivity report of one sweep (report.md, report.html, "
                    "hiplot.html, tables/ and plots/).")
    parser.add_argument("target", metavar="NAME|FOLDER",
                        help="sweep name under runs/, or a folder holding trials.parquet")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the sweep folder's report/)")
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help="objective column for selection and importance "
                             f"(default {DEFAULT_METRIC})")
    parser.add_argument("--n-boot", type=int, default=2000,
                        help="bootstrap resamples over configs (default 2000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstraps (the verdicts do not depend on it)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    if args.n_boot < 100:
        log.error("--n-boot=%d is too few for a 95%% interval; use at least 100", args.n_boot)
        return 2
    try:
        path = resolve_table(args.target)
        out = args.out if args.out is not None else path.parent / "report"
        log.info("reading %s", path)
        html = build_report(load_table(path), out, metric=args.metric, n_boot=args.n_boot,
                            seed=args.seed, title=path.parent.name)
    except TableError as err:
        log.error("%s", err)
        return 2
    print(html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
