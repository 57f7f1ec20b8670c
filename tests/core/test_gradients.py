"""torch.autograd.gradcheck (float64 finite differences) of the chunked backend's analytic backward.

min/max make SA-Softmax piecewise smooth, so the inputs are drawn until every row's visible scores are pairwise
well separated and away from 0 (the kinks of the clipped range): finite differences are then valid.

``detach_range=True`` is not the derivative of the forward function (it holds the row range fixed), so for that mode
gradcheck runs on a probe whose forward is the float64 oracle with every row's ``(a, b)`` frozen at the base point
and whose backward is the backend's: finite differences of the frozen function check the detached gradient.
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import VARIANTS, dropout_keep_of, grads_of
from support.reference64 import oracle_attention, oracle_ranges, oracle_sa_softmax, oracle_scores

from sasoftmax import sa_attention, sa_softmax
from sasoftmax.attention import prepare
from sasoftmax.attention.backends.chunked import run as chunked_attention

MIN_GAP = 2e-2  # finite-difference steps are 1e-6: far from any kink


def _well_separated(s: torch.Tensor, visible: torch.Tensor) -> bool:
    flat_s, flat_v = s.reshape(-1, s.shape[-1]), visible.reshape(-1, s.shape[-1])
    for row, vis in zip(flat_s, flat_v, strict=True):
        vals = row[vis]
        if vals.numel() == 0:
            continue
        if vals.abs().min() < MIN_GAP:
            return False
        if vals.numel() > 1 and torch.diff(vals.sort().values).min() < MIN_GAP:
            return False
    return True


def _inputs(B, Hq, Hkv, Nq, Nk, D, Dv, *, mask=None, bias_shape=None, is_causal=False, seed=0, **score_kw):
    """Well-separated float64 leaves (q, k, v[, bias]) for gradcheck."""
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64) * 1.5
        k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64)
        bias = None if bias_shape is None else torch.randn(*bias_shape, generator=g, dtype=torch.float64)
        s, vis = oracle_scores(q, k, mask, is_causal=is_causal, bias=bias, **score_kw)
        if _well_separated(s, vis):
            leaves = [q, k, v] + ([] if bias is None else [bias])
            return [t.requires_grad_() for t in leaves]
    raise AssertionError("could not draw well-separated scores")


class _FrozenRangeProbe(torch.autograd.Function):
    """Forward: ``frozen(*leaves)`` (no graph); backward: the vector-Jacobian product of ``backend(*leaves)``."""

    @staticmethod
    def forward(ctx, frozen, backend, *leaves):
        ctx.backend = backend
        ctx.save_for_backward(*leaves)
        with torch.no_grad():
            return frozen(*leaves)

    @staticmethod
    def backward(ctx, grad_out):
        leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.backend(*leaves)
            grads = torch.autograd.grad(out, leaves, grad_out)
        return (None, None, *grads)


def _gradcheck(backend, leaves, detach_range, mask=None, is_causal=False, **oracle_kw) -> bool:
    """gradcheck ``backend``; for ``detach_range`` against the oracle with the range frozen at ``leaves``."""
    if not detach_range:
        return torch.autograd.gradcheck(backend, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)
    q, k = leaves[0], leaves[1]
    bias = leaves[3] if len(leaves) > 3 else None
    score_kw = {n: oracle_kw[n] for n in ("scale", "alibi_slopes") if n in oracle_kw}
    s, vis = oracle_scores(q, k, mask, is_causal=is_causal, bias=bias, **score_kw)
    frozen_range = oracle_ranges(s, vis)

    def frozen(q, k, v, *rest):
        b = rest[0] if rest else None
        return oracle_attention(q, k, v, mask, is_causal=is_causal, bias=b, frozen_range=frozen_range, **oracle_kw)[0]

    # sanity: the probe's forward is the backend's forward at the base point
    torch.testing.assert_close(frozen(*leaves), backend(*leaves).detach(), atol=1e-12, rtol=1e-10)
    return torch.autograd.gradcheck(
        lambda *xs: _FrozenRangeProbe.apply(frozen, backend, *xs), leaves, eps=1e-6, atol=1e-6, rtol=1e-5
    )


def _chunked(block_size, mask, is_causal, normalize, detach_range, has_bias, dropout_seed=None, **kw):
    def fn(q, k, v, *rest):
        bias = rest[0] if has_bias else None
        gen = None if dropout_seed is None else torch.Generator().manual_seed(dropout_seed)
        inp = prepare(
            q, k, v, mask, is_causal=is_causal, bias=bias, normalize=normalize, detach_range=detach_range,
            generator=gen, **kw,
        )
        return chunked_attention(inp, block_size=block_size)

    return fn


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("block_size", [1, 2, None])
def test_gradcheck_mask_and_bias(normalize, detach_range, block_size):
    keep = torch.ones(2, 1, 3, 4, dtype=torch.bool)
    keep[0, 0, 1, 2] = False
    keep[1, 0, :, 3] = False
    leaves = _inputs(2, 2, 2, 3, 4, 3, 2, mask=keep, bias_shape=(1, 2, 3, 4), is_causal=False, seed=1)
    fn = _chunked(block_size, keep, False, normalize, detach_range, True)
    assert _gradcheck(fn, leaves, detach_range, keep, normalize=normalize)


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_gradcheck_causal_gqa_broadcast_bias(normalize, detach_range):
    """Causal with Nq > Nk (a fully masked first row), GQA 4 -> 2 heads, bias broadcast over batch and queries."""
    leaves = _inputs(1, 4, 2, 4, 3, 2, 3, bias_shape=(1, 4, 1, 3), is_causal=True, seed=2)
    fn = _chunked(2, None, True, normalize, detach_range, True)
    assert _gradcheck(fn, leaves, detach_range, None, True, normalize=normalize)


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_gradcheck_float_mask_alibi_and_dropout(normalize, detach_range):
    """Float additive mask with -inf entries, ALiBi, a custom scale and eps, and (seeded) dropout."""
    fmask = torch.tensor([[0.3, float("-inf"), -0.7, 0.0], [0.0, 0.1, torch.finfo(torch.float32).min, -0.2]],
                         dtype=torch.float64)[None, None].expand(1, 1, 2, 4)
    fmask = torch.cat([fmask, fmask.flip(-1)], dim=2)  # (1, 1, 4, 4)
    slopes = torch.tensor([0.25, 0.5])
    leaves = _inputs(1, 2, 1, 4, 4, 3, 2, mask=fmask, seed=3, alibi_slopes=slopes, scale=0.8)
    fn = _chunked(3, fmask, False, normalize, detach_range, False, dropout_seed=5,
                  alibi_slopes=slopes, scale=0.8, eps=1e-3, dropout_p=0.25)
    if detach_range:  # the frozen oracle needs the dropout keep mask: read it off the weights
        keep = dropout_keep_of(*leaves, fmask, alibi_slopes=slopes, scale=0.8, seed=5, dropout_p=0.25)
        assert not keep.all()
        assert _gradcheck(fn, leaves, True, fmask, normalize=normalize, alibi_slopes=slopes, scale=0.8, eps=1e-3,
                          dropout_keep=keep, dropout_p=0.25)
    else:
        assert _gradcheck(fn, leaves, False)


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_gradcheck_reference_backend(normalize, detach_range):
    keep = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(4)) > 0.3
    leaves = _inputs(1, 2, 2, 3, 4, 3, 3, mask=keep, bias_shape=(2, 3, 4), seed=4)

    def fn(q, k, v, bias):
        return sa_attention(q, k, v, keep, bias=bias, normalize=normalize, detach_range=detach_range,
                            backend="reference")

    assert _gradcheck(fn, leaves, detach_range, keep, normalize=normalize)


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_gradcheck_sa_softmax(normalize, detach_range):
    x = torch.tensor([[1.2, -0.4, 0.9, -2.0, 0.3], [0.5, 2.5, -0.8, 0.15, -1.1]], dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True])
    x.requires_grad_()

    def fn(t):
        return sa_softmax(t, mask=mask, normalize=normalize, detach_range=detach_range)

    if not detach_range:
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
        return
    frozen_range = oracle_ranges(x, mask.expand(x.shape))

    def frozen(t):
        return oracle_sa_softmax(t, mask=mask, normalize=normalize, frozen_range=frozen_range)

    torch.testing.assert_close(frozen(x), fn(x).detach(), atol=1e-14, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda t: _FrozenRangeProbe.apply(frozen, fn, t), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", ["q", "k", "v", "bias", "qv"])
def test_partial_requires_grad(which):
    """Only some inputs require grad: the others get none, and the ones that do match the oracle."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64)
    named = {"q": q, "k": k, "v": v, "bias": bias}
    leaves = [named[n] for n in ("q", "k", "v", "bias") if n in which or (which == "qv" and n in "qv")]
    for t in leaves:
        t.requires_grad_()
    out = sa_attention(q, k, v, bias=bias, is_causal=True, backend="chunked")
    ref, _ = oracle_attention(q, k, v, bias=bias, is_causal=True)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(grads_of(out, leaves, go), grads_of(ref, leaves, go), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    for n, t in named.items():
        if all(t is not leaf for leaf in leaves):
            assert t.grad is None and not t.requires_grad, n


def test_backward_accumulates_into_grad():
    """.backward() twice accumulates like any autograd op (the chunked Function keeps no stale state)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    sa_attention(q, k, v, backend="chunked").sum().backward()
    first = q.grad.clone()
    sa_attention(q, k, v, backend="chunked").sum().backward()
    torch.testing.assert_close(q.grad, 2 * first, atol=1e-14, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ double backward


def _triton_runs() -> bool:
    from sasoftmax.attention.backends import triton as triton_backend

    return triton_backend.unsupported_reason(prepare(*[torch.zeros(1, 1, 2, 4)] * 3)) is None


@pytest.mark.parametrize("backend", ["chunked", "cpp", "auto", "triton"])
def test_double_backward_of_a_fused_backend_is_refused_clearly(backend):
    """First-order gradients under ``create_graph=True`` are the usual ones; a backward through them raises one error
    naming double backward, create_graph and the backend that supports it (not torch's internal message)."""
    if backend == "triton" and not _triton_runs():
        pytest.skip("triton cannot run here")
    q, k, v = (torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(i), requires_grad=True)
               for i in range(3))
    plain = torch.autograd.grad(sa_attention(q, k, v, is_causal=True, backend=backend).pow(2).sum(), q)[0]
    gq = torch.autograd.grad(sa_attention(q, k, v, is_causal=True, backend=backend).pow(2).sum(), q,
                             create_graph=True)[0]
    torch.testing.assert_close(gq, plain, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match=r"double backward is not supported by backend=.*create_graph.*"
                                           r"backend='reference'"):
        gq.pow(2).sum().backward()


def test_reference_backend_supports_double_backward():
    """The reference backend's gradient is differentiable: second derivatives by finite differences (float64, the
    plain form: smooth everywhere, so finite differences of its gradient are valid)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return sa_attention(q, k, v, is_causal=True, normalize=False, backend="reference")

    assert torch.autograd.gradgradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)
