"""The language-model harness: the paper's experiments on top of the library (nothing in the library core imports
this package). The module map is in ``docs/architecture.md``."""

from __future__ import annotations

import importlib
from typing import Any

# The names below load their module on first use, so that importing one part of the harness (e.g. the model, for
# transformers) does not import the others (data needs numpy and tokenizers, the trainer torch.distributed).
_EXPORTS = {"GPT": "model", "GPTConfig": "model", "KVCache": "model", "TrainConfig": "config",
            "ConfigError": "config", "load_config": "config", "Trainer": "trainer", "train": "trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
