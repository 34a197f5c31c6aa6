"""The ADRec design-choice sweep: Ray Tune + Optuna over named spaces, one trial table per sweep.

Names are imported on first use, so `python sweeps/run.py --help` does not load pandas, Ray or torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"PHASES": "sweeps.plan", "Plan": "sweeps.plan", "SweepError": "sweeps.plan", "BUILTIN": "sweeps.spaces",
          "Space": "sweeps.spaces", "SpaceError": "sweeps.spaces", "load_space": "sweeps.spaces",
          "build_rows": "sweeps.table", "read_table": "sweeps.table"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sweeps' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
