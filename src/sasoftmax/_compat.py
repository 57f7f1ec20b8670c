"""Old import paths kept for one release: each old module becomes an alias of its new home, with a warning."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def moved(old: str, new: str) -> ModuleType:
    """Make the module ``old`` an alias of ``new`` (the same module object) and warn that the path will go away."""
    warnings.warn(
        f"`{old}` has moved to `{new}`; the old import path is deprecated and will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
