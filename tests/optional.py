"""Optional test dependencies imported where a test uses them, so that a module's other tests
still run without them."""
import pytest


class OptionalModule:
    """Stands for a module that is imported at its first use inside a test; where it cannot
    be imported (torch not installed), that test is skipped, not the whole test module."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name), attr)

