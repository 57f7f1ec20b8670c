"""Every ``SASOFTMAX_*`` environment variable, with its meaning and default, read by one parser.

Flags are true for ``1 true yes on`` and false for ``0 false no off`` (any case); empty or unset means the default;
anything else raises ``ValueError`` naming the variable. ``docs/architecture.md`` lists the table below; a test
checks that no other module reads a ``SASOFTMAX_`` variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Variable", "VARIABLES", "flag", "optional_flag", "text", "positive_int", "markdown_table"]


@dataclass(frozen=True)
class Variable:
    name: str
    default: str  # as it would be written in the environment ("" = unset)
    meaning: str


VARIABLES: dict[str, Variable] = {v.name: v for v in (
    Variable("SASOFTMAX_CPP", "1", "build and use the fused CPU kernel (0: `auto` uses the chunked backend)"),
    Variable("SASOFTMAX_EXTENSIONS_DIR", "", "where the fused CPU kernel is built (default: inside the virtual "
                                             "environment, else torch's extensions directory)"),
    Variable("SASOFTMAX_CPU_GEMM", "blas", "matrix products of the CPU kernel: `blas` (torch's BLAS symbols, after "
                                           "a self-test) or `aten` (`at::mm`)"),
    Variable("SASOFTMAX_CPU_PANELS", "1", "the CPU kernel's score products from K/V packed once per call (0: BLAS "
                                          "per block)"),
    Variable("SASOFTMAX_TILE_THREADS", "", "cap on the chunked backend's tile threads (default: torch's thread "
                                           "count; 1 = off)"),
    Variable("SASOFTMAX_CHECK_VALUES", "", "check bias / float-mask values for NaN and +inf (default: on for CPU "
                                           "tensors, off on GPUs, where the check would synchronize)"),
    Variable("SASOFTMAX_TRITON_DETERMINISTIC", "0", "the Triton backward without atomics (bitwise repeatable); "
                                                    "read at import"),
    Variable("SASOFTMAX_TRITON_AUTOTUNE", "0", "autotune the Triton launch configurations on the GPU; read at "
                                               "import"),
    Variable("SASOFTMAX_TRITON_SELFTEST", "1", "check each kind of Triton call once against the chunked backend "
                                               "on CUDA before using it (0: trust the kernel)"),
)}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _raw(name: str) -> str:
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a sasoftmax environment variable (known: {', '.join(VARIABLES)})")
    return os.environ.get(name, "").strip()


def text(name: str) -> str:
    """The variable's value, or its default when unset or empty."""
    return _raw(name) or VARIABLES[name].default


def flag(name: str) -> bool:
    """A boolean variable (unset or empty: its default)."""
    value = text(name).lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be one of {', '.join(_TRUE + _FALSE)}, got {value!r}")


def optional_flag(name: str) -> bool | None:
    """A boolean variable whose default is "decide by context": None when unset or empty."""
    return flag(name) if _raw(name) else None


def positive_int(name: str) -> int | None:
    """A positive integer variable, None when unset or empty."""
    value = text(name)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def markdown_table() -> str:
    """The variables as a markdown table (docs/architecture.md holds its output)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {f'`{v.default}`' if v.default else 'unset'} | {v.meaning} |" for v in VARIABLES.values()]
    return "\n".join(rows)
