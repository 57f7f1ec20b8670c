"""The accuracy rule of the fast backends, with an error model for reduced gradients.

FlashAttention's rule (``docs/contract.md`` section 4): against a float64 answer, a fast path's error is at most 2x
the error of the eager reference implementation run in the same dtype on the same inputs, plus a floor at rounding
level. The floor of an element is ``rel * max(scale, terms)``:

* ``scale``: the tensor's magnitude, ``max(1, max |exact|)`` unless a test says otherwise: every element of an
  unreduced output or gradient may carry a few roundings of that size.
* ``terms``: for an element that is a *sum over broadcast dimensions* (the gradient of a bias broadcast over batch,
  heads, rows or keys; the k/v gradient of a key/value head shared by ``G`` query heads), the sum of the absolute
  values of the unreduced per-element gradients it adds up (:func:`reduction_terms64`). Each of those terms is held to
  the floor above, their errors add, and the order of the additions (atomics, BLAS kernels of the machine's
  instruction set) is free, so the bound grows with the number and size of the terms rather than staying fixed. A
  fixed floor made the suite fail on AVX-512 BLAS (a scalar bias gradient sums ``B*H*Nq*Nk`` terms).

:func:`accuracy_violation` returns the first element that breaks the rule (or None), so that tests can also check
that the bound still catches a real error (a block's contribution dropped or doubled).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Attend64 = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def _pad4(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * (4 - len(shape)) + tuple(shape)


def reduction_terms64(attend: Attend64, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                      grad_out: Tensor) -> dict[str, Tensor]:
    """Per-element sums of absolute unreduced gradient terms, in float64, for the leaves whose gradient is a sum over
    broadcast dimensions: ``"bias"`` (a bias broadcast over any of ``(B, Hq, Nq, Nk)``) and ``"k"``/``"v"``
    (grouped-query attention, ``Hkv < Hq``). ``attend(q, k, v, bias)`` computes the attention in float64 (the oracle
    or the reference backend, with the test's other arguments bound); it is called with the bias expanded to the full
    score shape and k/v repeated to ``Hq`` heads, each a leaf of its own."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    leaves = {"q": q.detach().double().requires_grad_()}
    gqa = G > 1
    for name, t in (("k", k), ("v", v)):
        t = t.detach().double()
        leaves[name] = (t.repeat_interleave(G, dim=1) if gqa else t).requires_grad_()
    full_bias = None
    if bias is not None:
        full_bias = bias.detach().double().reshape(_pad4(tuple(bias.shape))).expand(B, Hq, Nq, Nk).clone()
        leaves["bias"] = full_bias.requires_grad_()
    out = attend(leaves["q"], leaves["k"], leaves["v"], leaves.get("bias"))
    names = [n for n in ("k", "v", "bias") if n in leaves]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.double(), allow_unused=True)
    terms: dict[str, Tensor] = {}
    for name, gr in zip(names, grads, strict=True):
        gr = torch.zeros_like(leaves[name]) if gr is None else gr.abs()
        if name == "bias" and bias is not None:
            shape4 = _pad4(tuple(bias.shape))
            dims = [d for d in range(4) if shape4[d] == 1 and gr.shape[d] != 1]
            terms[name] = (gr.sum(dim=dims, keepdim=True) if dims else gr).reshape(bias.shape)
        elif gqa:
            terms[name] = gr.view(B, Hkv, G, *gr.shape[2:]).sum(dim=2)
    return terms


def accuracy_violation(name: str, fast: Tensor, ref: Tensor, exact: Tensor, rel: float, *,
                       scale: float | None = None, terms: Tensor | None = None) -> str | None:
    """None if every element of ``fast`` obeys ``|fast - exact| <= 2 * max|ref - exact| + rel * max(scale, terms)``
    (``scale`` default ``max(1, max|exact|)``, ``terms`` from :func:`reduction_terms64` or None), else a message
    naming the worst element."""
    fast, ref, exact = fast.detach().double(), ref.detach().double(), exact.detach().double()
    if not torch.isfinite(fast).all():
        return f"{name}: non-finite values"
    e_ref = float((ref - exact).abs().max()) if exact.numel() else 0.0
    if scale is None:
        scale = max(1.0, float(exact.abs().max())) if exact.numel() else 1.0
    floor = torch.full_like(exact, rel * scale)
    if terms is not None:
        floor = torch.maximum(floor, rel * terms.double().reshape(exact.shape))
    err = (fast - exact).abs()
    excess = err - (2 * e_ref + floor)
    if exact.numel() == 0 or float(excess.max()) <= 0:
        return None
    i = int(excess.argmax())
    return (f"{name}: error {float(err.flatten()[i]):.3g} at flat index {i} exceeds 2 x reference error "
            f"{e_ref:.3g} + floor {float(floor.flatten()[i]):.3g} (max error {float(err.max()):.3g})")


def assert_accuracy_rule(name: str, fast: Tensor, ref: Tensor, exact: Tensor, rel: float, *,
                         scale: float | None = None, terms: Tensor | None = None) -> None:
    """:func:`accuracy_violation` as an assertion."""
    msg = accuracy_violation(name, fast, ref, exact, rel, scale=scale, terms=terms)
    assert msg is None, msg


def check_backends_against_oracle(leaves: list[Tensor], args: tuple, kw: dict, grad_out: Tensor, fast: list[str],
                                  rel: float, *, min_scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Run the reference backend and each backend of ``fast`` on ``q, k, v[, bias] = leaves`` (``args``/``kw``: the
    rest of the ``sa_attention`` call) and assert the accuracy rule against the float64 oracle for the output and
    every gradient (scale ``max(min_scale, max|exact|)``, reduced gradients with their terms). Returns the max
    errors ``{backend: {name: error}}``."""
    from sasoftmax import sa_attention
    from support.reference64 import oracle_attention

    q, k, v = leaves[:3]
    bias = leaves[3] if len(leaves) > 3 else None
    names = ["out", "q", "k", "v", "bias"][: len(leaves) + 1]

    def oracle(qq, kk, vv, bb):
        return oracle_attention(qq, kk, vv, *args, **({**kw, "bias": bb} if bb is not None else kw))[0]

    exact_out = oracle(q, k, v, bias)
    exact = [t.detach() for t in (exact_out, *torch.autograd.grad(exact_out, leaves, grad_out.to(exact_out.dtype)))]
    terms = reduction_terms64(oracle, q, k, v, bias, grad_out)
    got = {}
    for backend in ["reference", *fast]:
        out = sa_attention(q, k, v, *args, backend=backend, **kw)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        for name, t in zip(names, (out, *grads), strict=True):
            assert t.dtype == q.dtype and torch.isfinite(t).all(), (backend, name)
        got[backend] = [out, *grads]
    errors: dict[str, dict[str, float]] = {}
    for backend in fast:
        for i, name in enumerate(names):
            scale = max(min_scale, float(exact[i].abs().max()))
            assert_accuracy_rule(f"{backend} {name}", got[backend][i], got["reference"][i], exact[i], rel,
                                 scale=scale, terms=terms.get(name))
    for backend, ts in got.items():
        errors[backend] = {n: float((t.double() - e.double()).abs().max()) for n, t, e in zip(names, ts, exact,
                                                                                              strict=True)}
    return errors
