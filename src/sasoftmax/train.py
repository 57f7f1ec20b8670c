"""Deprecated import path: training is now :mod:`sasoftmax.lm.config` (the config) and :mod:`sasoftmax.lm.trainer`."""

from ._compat import warn_moved

warn_moved(__name__, "sasoftmax.lm.config and sasoftmax.lm.trainer")

from .lm.config import DTYPES, ConfigError, TrainConfig, apply_overrides, build_model_config, load_config  # noqa: E402
from .lm.trainer import Trainer, TrainSummary, evaluate_loss, lr_at, train  # noqa: E402

__all__ = ["ConfigError", "TrainConfig", "DTYPES", "load_config", "apply_overrides", "build_model_config", "train",
           "lr_at", "evaluate_loss", "Trainer", "TrainSummary"]
