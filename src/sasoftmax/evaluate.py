"""Deprecated import path: evaluation is now :mod:`sasoftmax.lm.evaluate`, the comparison job
:mod:`sasoftmax.lm.compare`."""

from ._compat import warn_moved

warn_moved(__name__, "sasoftmax.lm.evaluate and sasoftmax.lm.compare")

from .lm.compare import comparison_config, run_comparison  # noqa: E402
from .lm.evaluate import (  # noqa: E402
    diagnose_checkpoint,
    evaluate_checkpoint,
    evaluate_model,
    format_gradient_demo,
    gradient_demo,
    parse_lengths,
)
from .lm.metrics import last_diagnostics  # noqa: E402
from .utils import format_table  # noqa: E402

__all__ = ["evaluate_checkpoint", "evaluate_model", "diagnose_checkpoint", "gradient_demo", "format_gradient_demo",
           "parse_lengths", "run_comparison", "comparison_config", "last_diagnostics", "format_table"]
