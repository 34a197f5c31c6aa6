"""The ADRec design-choice sweep: Ray Tune + Optuna over named spaces, one trial table per sweep."""
from sweeps.plan import PHASES, Plan, SweepError
from sweeps.spaces import BUILTIN, Space, SpaceError, load_space
from sweeps.table import build_rows, read_table

__all__ = ["BUILTIN", "PHASES", "Plan", "Space", "SpaceError", "SweepError", "build_rows", "load_space",
           "read_table"]
