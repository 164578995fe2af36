"""lfads_fast: LFADS with a compiled core."""
__version__ = "0.1.0"
