"""The language-model harness: the paper's experiments on top of the library.

Layers (each module has one job; nothing in the library core imports this package):

* :mod:`.config` — typed configuration (:class:`TrainConfig`) and its one loader (files, ``--set`` overrides);
* :mod:`.model` — the GPT whose normalizer and positional encoding are registry names;
* :mod:`.data` — corpora, tokenizers, token caches, the deterministic batch sampler;
* :mod:`.distributed` — one process-group setup for ``torchrun`` (trainer and grid);
* :mod:`.checkpoint` — atomic, verified checkpoints and the training state in them;
* :mod:`.metrics` — the ``metrics.jsonl`` writer and reader;
* :mod:`.trainer` — :class:`Trainer` (``train_step`` / ``evaluate`` / ``save`` / ``restore`` / ``fit``) and
  :func:`train`;
* :mod:`.evaluate` — perplexity vs length, diagnostics of checkpoints, the gradient demo;
* :mod:`.diagnostics` — gradient diagnostics of attention in a model;
* :mod:`.grid` — experiment grids (spec, store, runner); :mod:`.report` — their reports;
* :mod:`.compare` — the main job (a two-run grid in lockstep); :mod:`.cli` — the ``sasoftmax`` command.
"""

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
