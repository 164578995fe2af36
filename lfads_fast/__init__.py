"""lfads_fast: LFADS with a compiled core."""
from .config import LFADSConfig
from .model import LFADS, Batch

__version__ = "0.1.0"
__all__ = ["LFADS", "LFADSConfig", "Batch"]
