"""The bridge between ``import sasoftmax`` and transformers' Auto classes.

:func:`install` (called by ``sasoftmax/__init__.py``) imports neither transformers nor the harness. It arranges that
the project's GPT (:mod:`sasoftmax.lm.hf`) is registered with ``AutoConfig`` as soon as transformers' configuration
Auto class is imported, and with ``AutoModelForCausalLM`` as soon as its model Auto classes are (at once when they
already are): exported models then load with ``AutoModelForCausalLM.from_pretrained(DIR)`` and no
``trust_remote_code``. Loading the model registration costs what using a transformers model costs anyway. A failure
to register is logged, never raised into the user's import of transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable

log = logging.getLogger("sasoftmax")

_AFTER: dict[str, str] = {
    "transformers.models.auto.configuration_auto": "sasoftmax.lm.hf_config:register_config",
    "transformers.models.auto.modeling_auto": "sasoftmax.lm.hf:register",
}


def _run(target: str) -> None:
    module, func = target.split(":")
    if module in sys.modules and not hasattr(sys.modules[module], func):
        return  # that module is being imported right now (it imported transformers) and registers itself at its end
    try:
        getattr(importlib.import_module(module), func)()
    except Exception as err:  # pragma: no cover - depends on the installed transformers
        log.warning("could not register the sasoftmax GPT with transformers' Auto classes (%s: %s)",
                    type(err).__name__, err)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration right after one of the modules of :data:`_AFTER` has been executed."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the import protocol's signature
        if name not in _AFTER or name in _pending_done:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        _pending_done.add(name)
        original: Callable = spec.loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            original(module)
            _run(_AFTER[name])

        spec.loader.exec_module = exec_module
        return spec


_pending_done: set[str] = set()
_hook = _AfterImport()


def install() -> None:
    """Register now for the Auto modules already imported; hook the others (idempotent)."""
    for name, target in _AFTER.items():
        if name in sys.modules and name not in _pending_done:
            _pending_done.add(name)
            _run(target)
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
