"""Property-based tests (hypothesis): random shapes, masks (with fully masked rows) and extreme score magnitudes.

Examples are derandomized (fixed by the test's source), so CI runs are reproducible.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import RUNNERS, grads_of, run_sa
from support.reference64 import oracle_attention, oracle_sa_softmax

from sasoftmax import sa_attention_with_weights, sa_softmax

SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
MAGNITUDES = [1.0, 1e2, 1e4]


@st.composite
def attention_problems(draw):
    """A random attention call: shapes, head grouping, mask kind, causal flag, score magnitude and where it comes
    from (scaled q/k or an additive bias), variant, and a torch seed for the tensors."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 2))
    Nq = draw(st.integers(1, 5))
    Nk = draw(st.integers(1, 5))
    D = draw(st.integers(1, 4))
    Dv = draw(st.integers(1, 3))
    return {
        "shape": (B, Hkv * G, Hkv, Nq, Nk, D, Dv),
        "mask": draw(st.sampled_from(["none", "bool", "bool_2d", "key_padding", "float"])),
        "mask_density": draw(st.sampled_from([0.2, 0.5, 0.9])),
        "causal": draw(st.booleans()),
        "magnitude": draw(st.sampled_from(MAGNITUDES)),
        "via_bias": draw(st.booleans()),
        "normalize": draw(st.booleans()),
        "detach_range": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _build(problem: dict, dtype: torch.dtype = torch.float64):
    B, Hq, Hkv, Nq, Nk, D, Dv = problem["shape"]
    g = torch.Generator().manual_seed(problem["seed"])
    mag = problem["magnitude"]
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64)
    kw: dict = {"is_causal": problem["causal"], "normalize": problem["normalize"],
                "detach_range": problem["detach_range"]}
    leaves = []
    if problem["via_bias"]:
        bias = torch.randn(1, Hq, Nq, Nk, generator=g, dtype=torch.float64) * mag
        kw["bias"] = bias.to(dtype).requires_grad_()
    else:
        q = q * mag**0.5
        k = k * mag**0.5
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    leaves = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    dens = problem["mask_density"]
    args: tuple = ()
    kind = problem["mask"]
    if kind == "bool":
        args = (torch.rand(B, Hq, Nq, Nk, generator=g) < dens,)
    elif kind == "bool_2d":
        args = (torch.rand(Nq, Nk, generator=g) < dens,)
    elif kind == "key_padding":
        args = (torch.rand(B, 1, 1, Nk, generator=g) < dens,)
    elif kind == "float":
        m = torch.randn(B, 1, Nq, Nk, generator=g, dtype=torch.float64)
        sel = torch.rand(B, 1, Nq, Nk, generator=g)
        m = torch.where(sel > dens, torch.full_like(m, float("-inf")), m)
        m = torch.where((sel > dens) & (sel > (1 + dens) / 2), torch.full_like(m, torch.finfo(torch.float32).min), m)
        args = (m.to(dtype),)
    return leaves, args, kw


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a.double(), b.double(), atol=rel * scale, rtol=rel)


@pytest.mark.parametrize("runner", RUNNERS)
@SETTINGS
@given(problem=attention_problems())
def test_attention_matches_oracle(runner, problem):
    leaves, args, kw = _build(problem)
    q, k, v = leaves[:3]
    out = run_sa(*runner, q, k, v, *args, **kw)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert torch.isfinite(out).all()
    ref, _ = oracle_attention(q, k, v, *args, **kw)
    _close(out, ref, 1e-9)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(problem["seed"] + 1), dtype=torch.float64)
    for a, b in zip(grads_of(out, leaves, g), grads_of(ref, leaves, g), strict=True):
        assert a is not None and torch.isfinite(a).all()
        _close(a, b, 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@SETTINGS
@given(problem=attention_problems())
def test_normalized_weights_are_bounded(dtype, problem):
    """Normalized SA weights lie in [0, 1] and each row sums to at most 1 (+1e-6), at every magnitude; outputs and
    gradients stay finite; the output is the weights applied to v."""
    problem = dict(problem, normalize=True)
    leaves, args, kw = _build(problem, dtype)
    q, k, v = leaves[:3]
    out, w = sa_attention_with_weights(q, k, v, *args, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w >= 0).all() and (w <= 1).all()
    assert (w.double().sum(-1) <= 1 + 1e-6).all()
    v_full = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _close(out, w @ v_full, tol)
    for t in torch.autograd.grad(out.sum(), leaves):
        assert torch.isfinite(t).all()


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dim_pick=st.integers(0, 2),
    magnitude=st.sampled_from(MAGNITUDES),
    masked=st.booleans(),
    normalize=st.booleans(),
    detach_range=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sa_softmax_matches_oracle(shape, dim_pick, magnitude, masked, normalize, detach_range, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * magnitude).requires_grad_()
    dim = dim_pick % len(shape)
    mask = torch.rand(*shape, generator=g) < 0.6 if masked else None
    y = sa_softmax(x, dim, mask=mask, normalize=normalize, detach_range=detach_range)
    ref = oracle_sa_softmax(x, dim, mask=mask, normalize=normalize, detach_range=detach_range)
    assert torch.isfinite(y).all()
    _close(y, ref, 1e-10)
    if normalize:
        assert (y >= 0).all() and (y <= 1).all() and (y.sum(dim) <= 1 + 1e-12).all()
    go = torch.randn(*shape, generator=g, dtype=torch.float64)
    (gy,) = torch.autograd.grad(y, x, go)
    (gr,) = torch.autograd.grad(ref, x, go)
    assert torch.isfinite(gy).all()
    _close(gy, gr, 1e-9)
