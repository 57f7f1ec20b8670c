"""The ``"reference"`` backend: SA attention with explicit ``(B, Hq, Nq, Nk)`` scores and weights and plain autograd
(the executable form of docs/contract.md; its gradient is differentiable, so double backward works)."""

from __future__ import annotations

from torch import Tensor

from ..inputs import AttentionInputs
from ..materialized import materialized, sa_weights


def load_error() -> str | None:
    """Always available."""
    return None


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """Runs every call."""
    return None


def run(inp: AttentionInputs) -> Tensor:
    """``(B, Hq, Nq, Dv)`` in the input dtype; O(Nq * Nk) memory (blocks of rows for large calls)."""
    return materialized(inp, sa_weights(inp))  # type: ignore[return-value]
