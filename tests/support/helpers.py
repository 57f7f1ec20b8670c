"""Shared test helpers: input builders, the attention variants and the runners that call the package under test.

The float64 oracle stays in ``reference64.py`` and shares no code with the package; everything that calls the package
lives here.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

VARIANTS = [
    pytest.param(False, False, id="plain"),
    pytest.param(True, False, id="normalized"),
    pytest.param(True, True, id="normalized-detach"),
]
"""``(normalize, detach_range)`` of the three SA-Softmax variants."""


def qkv(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, Dv: int, dtype: torch.dtype = torch.float64,
        seed: int = 0, grad: bool = True, q_scale: float = 1.0) -> list[Tensor]:
    """``[q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)]`` drawn in float64 from ``seed`` (q times
    ``q_scale``), cast to ``dtype``, leaves requiring grad when ``grad``."""
    g = torch.Generator().manual_seed(seed)
    ts = [
        torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64) * q_scale,
        torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64),
    ]
    return [t.to(dtype).requires_grad_(grad) for t in ts]



def _cpu_backends() -> list[str]:
    from sasoftmax.attention.backends import REGISTRY

    return [b.name for b in REGISTRY if b.devices is None or "cpu" in b.devices]


BACKENDS = [pytest.param(name, id=name) for name in _cpu_backends()]
"""The backend axis of the CPU test matrix: every registered backend that serves CPU tensors (the Triton kernel has
its own tests, under the interpreter here and compiled on a GPU)."""

# (backend, block size in query rows): None = the backend's default; "N" = one block holding every query row. The
# fused kernel's default block holds every row of these small cases, so "cpp" is its "N" too.
RUNNERS = [
    pytest.param(("reference", None), id="reference"),
    pytest.param(("chunked", None), id="chunked"),
    pytest.param(("chunked", 1), id="chunked-b1"),
    pytest.param(("chunked", 3), id="chunked-b3"),
    pytest.param(("chunked", "N"), id="chunked-bN"),
    pytest.param(("cpp", None), id="cpp"),
    pytest.param(("cpp", 1), id="cpp-b1"),
    pytest.param(("cpp", 3), id="cpp-b3"),
]
# The fused kernel forms its float32 score products from K/V panels once enough query rows share a key/value head
# (more than these small cases have): "panels" forces that path, for float32 matrices (float64 never takes it).
F32_RUNNERS = [*RUNNERS, pytest.param(("cpp", "panels"), id="cpp-panels")]


def run_sa(backend: str, block_size: int | str | None, q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
    """``sa_attention`` through ``backend``; for ``chunked``/``cpp`` with a ``block_size`` the backend is called
    directly; ``("cpp", "panels")``: the kernel with its panel score products on any shape."""
    from sasoftmax import sa_attention
    from sasoftmax.attention import prepare
    from sasoftmax.attention.backends import chunked, cpp

    if backend == "cpp" and block_size == "panels":
        return cpp.run(prepare(q, k, v, *args, **kwargs), panel_rows=1)
    if backend in ("chunked", "cpp") and block_size is not None:
        rows = q.shape[2] if block_size == "N" else int(block_size)
        return (chunked if backend == "chunked" else cpp).run(prepare(q, k, v, *args, **kwargs), block_size=rows)
    return sa_attention(q, k, v, *args, backend=backend, **kwargs)


def grads_of(out: Tensor, inputs: list[Tensor], grad_out: Tensor) -> list[Tensor | None]:
    """Gradients of ``(out * grad_out).sum()`` with respect to ``inputs`` (None where unused)."""
    return list(torch.autograd.grad(out, inputs, grad_out.to(out.dtype), allow_unused=True))


def dropout_keep_of(q: Tensor, k: Tensor, v: Tensor, *args, seed: int, dropout_p: float, **kwargs) -> Tensor:
    """The bool keep mask ``(B, Hq, Nq, Nk)`` that the package's dropout draws from ``Generator().manual_seed(seed)``,
    read off the *plain* weights with and without dropout (plain weights are 0 only where the score is exactly 0 or
    the key is masked; those entries are reported as kept, which cannot matter for them).

    Normalized weights cannot be used for this: the arg-min key's weight is exactly 0 although its gradient is not.
    """
    from sasoftmax import sa_attention_with_weights

    kwargs = dict(kwargs, normalize=False, detach_range=False)
    with torch.no_grad():
        _, full = sa_attention_with_weights(q, k, v, *args, **kwargs)
        _, drop = sa_attention_with_weights(
            q, k, v, *args, dropout_p=dropout_p, generator=torch.Generator().manual_seed(seed), **kwargs
        )
    return (drop != 0) | (full == 0)
