"""Exceptions shared by several modules."""
from __future__ import annotations

__all__ = ["MissingOptionalPart"]


class MissingOptionalPart(ImportError):
    """An optional part (an extra package, or the real-time library not built) is missing;
    the message says how to get it. The command line reports it in one line (exit status 2);
    any other ImportError is a bug."""
