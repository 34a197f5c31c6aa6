"""Cross-dataset sensitivity analysis of an ADRec sweep: `python -m results NAME|FOLDER`."""
from results.analysis import Analysis, analyse
from results.report import build_report, write_report
from results.table import TableError

__all__ = ["Analysis", "TableError", "analyse", "build_report", "write_report"]
