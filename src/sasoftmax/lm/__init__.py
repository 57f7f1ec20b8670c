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

from .config import ConfigError, TrainConfig, load_config
from .model import GPT, GPTConfig
from .trainer import Trainer, train

__all__ = ["GPT", "GPTConfig", "TrainConfig", "ConfigError", "load_config", "Trainer", "train"]
