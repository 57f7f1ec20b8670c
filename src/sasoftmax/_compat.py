"""Old import paths kept for one release: each old module becomes an alias of its new home, with a warning."""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that the module ``old`` now lives at ``new`` and that the old path will go away."""
    warnings.warn(
        f"`{old}` has moved to `{new}`; the old import path is deprecated and will be removed in the next release",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def moved(old: str, new: str) -> ModuleType:
    """Make the module ``old`` an alias of ``new`` (the same module object) and warn that the path will go away."""
    warn_moved(old, new, stacklevel=4)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
