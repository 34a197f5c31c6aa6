"""ADRec: a faithful, fast implementation with every design choice a named knob."""
from adrec.config import TrialConfig
from adrec.data import REGISTRY, SplitData, load_dataset

__all__ = ["REGISTRY", "SplitData", "TrialConfig", "load_dataset"]
