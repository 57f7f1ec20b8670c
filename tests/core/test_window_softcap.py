"""Sliding windows (``window=(left, right)``) and logit soft-capping (``softcap``) against the float64 oracle: values
and every gradient, alone and combined with masks, biases, ALiBi, GQA and dropout; ``auto`` falls back where a
backend does not run them; bad values are refused naming the argument."""

from __future__ import annotations

import pytest
import torch
from support.helpers import VARIANTS, dropout_keep_of, grads_of, qkv, run_sa
from support.reference64 import oracle_attention

from sasoftmax import sa_attention
from sasoftmax.attention import prepare
from sasoftmax.attention.backends import choose, get_backend

# the backends that run windows and soft-capping (at their default block and at block edges inside the window)
WINDOW_RUNNERS = [
    pytest.param(("reference", None), id="reference"),
    pytest.param(("chunked", None), id="chunked"),
    pytest.param(("chunked", 1), id="chunked-b1"),
    pytest.param(("chunked", 3), id="chunked-b3"),
    pytest.param(("cpp", None), id="cpp"),
    pytest.param(("cpp", 1), id="cpp-b1"),
    pytest.param(("cpp", 3), id="cpp-b3"),
    pytest.param(("cpp", "panels"), id="cpp-panels"),
    pytest.param(("triton", None), id="triton"),  # (under TRITON_INTERPRET without a GPU: float32 only)
]

CASES = {
    # name: (Nq, Nk, keyword arguments)
    "window_left": (7, 7, dict(window=(2, -1))),
    "window_causal": (7, 7, dict(window=(2, -1), is_causal=True)),
    "window_both": (6, 9, dict(window=(1, 2))),
    "window_right_only": (5, 5, dict(window=(-1, 0))),
    "window_zero": (5, 5, dict(window=(0, 0))),  # each query sees only its own position
    "window_nq_gt_nk": (7, 3, dict(window=(1, 1), is_causal=True)),  # leading rows see no key
    "softcap": (5, 6, dict(softcap=0.7, scale=3.0)),  # products well beyond the cap
    "softcap_causal_alibi": (6, 6, dict(softcap=2.0, is_causal=True,
                                        alibi_slopes=torch.tensor([0.5, 0.25], dtype=torch.float32))),
    "window_softcap_gqa": (8, 8, dict(window=(3, 1), softcap=1.0, hkv=1)),
    "window_mask_bias": (6, 6, dict(window=(2, 2), mask=True, bias=True)),
    "softcap_bias": (5, 5, dict(softcap=1.5, bias=True)),
}


def _case(name: str, dtype: torch.dtype):
    Nq, Nk, kw = CASES[name]
    kw = dict(kw)
    hkv = kw.pop("hkv", 2)
    q, k, v = qkv(2, 2, hkv, Nq, Nk, 4, 3, dtype, seed=len(name))
    leaves, args = [q, k, v], ()
    if kw.pop("mask", False):
        keep = torch.rand(2, 1, Nq, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
        args = (keep,)
    if kw.pop("bias", False):
        bias = torch.randn(1, 2, Nq, Nk, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        bias = bias.to(dtype).requires_grad_(True)
        kw["bias"] = bias
        leaves.append(bias)
    return leaves, args, kw


@pytest.mark.parametrize("runner", WINDOW_RUNNERS)
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_oracle(runner, case, normalize, detach_range, dtype):
    backend, block = runner
    if block == "panels" and dtype != torch.float32:
        pytest.skip("the kernel's panel products are float32 only")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32")
    leaves, args, kw = _case(case, dtype)
    q, k, v = leaves[:3]
    kw = dict(kw, normalize=normalize, detach_range=detach_range)
    out = run_sa(backend, block, q, k, v, *args, **kw)
    ref, _ = oracle_attention(q, k, v, *args, **kw)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=3e-5, rtol=3e-4)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **tol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, a, b in zip(["q", "k", "v", "bias"], grads_of(out, leaves, g), grads_of(ref, leaves, g), strict=False):
        assert a is not None and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_window_equals_the_explicit_mask():
    """A window is exactly the bool mask it describes (bottom-right aligned positions)."""
    q, k, v = qkv(1, 2, 2, 5, 9, 4, 4, torch.float64, seed=4)
    i = torch.arange(5)[:, None] + (9 - 5)
    j = torch.arange(9)[None, :]
    keep = (i - j <= 3) & (j - i <= 1)
    for backend in ("reference", "chunked"):
        a = sa_attention(q, k, v, window=(3, 1), backend=backend)
        b = sa_attention(q, k, v, keep, backend=backend)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_unbounded_window_is_no_window():
    q, k, v = qkv(1, 2, 2, 6, 6, 4, 4, torch.float64, seed=5)
    torch.testing.assert_close(sa_attention(q, k, v, window=(-1, -1), backend="chunked"),
                               sa_attention(q, k, v, backend="chunked"), atol=0, rtol=0)
    assert prepare(q, k, v, window=(-1, -1)).window is None


def test_large_softcap_approaches_no_softcap():
    q, k, v = qkv(1, 2, 2, 6, 6, 4, 4, torch.float64, seed=6)
    torch.testing.assert_close(sa_attention(q, k, v, softcap=1e6, backend="chunked"),
                               sa_attention(q, k, v, backend="chunked"), atol=1e-9, rtol=0)


def test_softcap_bounds_the_scores():
    """With softcap c the scores lie in (-c, c)."""
    from sasoftmax.attention.materialized import scores

    q, k, v = qkv(1, 1, 1, 4, 8, 4, 4, torch.float64, seed=7, q_scale=2.0, grad=False)
    s = scores(prepare(q, k, v, softcap=3.0))
    assert 2.0 < float(s.abs().max()) < 3.0


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_dropout_with_window_matches_oracle_with_its_mask(normalize, detach_range):
    q, k, v = qkv(2, 2, 2, 7, 7, 4, 4, torch.float64, seed=8)
    kw = dict(window=(2, 1), softcap=1.5, is_causal=True)
    keep = dropout_keep_of(q, k, v, seed=11, dropout_p=0.3, **kw)
    ref, _ = oracle_attention(q, k, v, **kw, normalize=normalize, detach_range=detach_range, dropout_keep=keep,
                              dropout_p=0.3)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = grads_of(ref, [q, k, v], g)
    for backend in ("reference", "chunked"):
        out = sa_attention(q, k, v, **kw, normalize=normalize, detach_range=detach_range, dropout_p=0.3,
                           generator=torch.Generator().manual_seed(11), backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
        for a, b in zip(grads_of(out, [q, k, v], g), want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_every_fused_backend_runs_windows_and_softcap():
    """No backend refuses a window or soft-capping, so ``auto`` keeps its usual choice for such calls."""
    from sasoftmax.attention.backends import triton as tb

    q, k, v = qkv(1, 2, 2, 6, 6, 4, 4, torch.float32, seed=9)
    for kw in (dict(window=(2, 0)), dict(softcap=1.0), dict(window=(1, 1), softcap=2.0, is_causal=True)):
        inp = prepare(q, k, v, **kw)
        for name in ("cpp", "triton"):
            backend = get_backend(name)
            if backend.load_error() is None and (name == "cpp" or tb.INTERPRET):
                assert backend.unsupported_reason(inp) is None, name
        assert choose(inp).name == choose(prepare(q, k, v)).name


@pytest.mark.parametrize("panels", [False, True], ids=["blas", "panels"])
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_cpp_skips_keys_left_of_a_long_window(panels, normalize, detach_range):
    """Rows far enough along a causal sliding window start their key range past whole key blocks (256 keys): the
    kernel skips them, and every value and gradient still matches the float64 oracle (with soft-capping, ALiBi, a
    bias and dropout, so the skipped range is exercised by every term)."""
    from sasoftmax.attention.backends import cpp

    n = 700
    q, k, v = qkv(1, 2, 1, n, n, 8, 8, torch.float32, seed=10)
    bias = (0.1 * torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    kw = dict(is_causal=True, window=(150, -1), softcap=3.0, alibi_slopes=torch.tensor([0.01, 0.002]), bias=bias,
              normalize=normalize, detach_range=detach_range)
    keep = dropout_keep_of(q, k, v, seed=12, dropout_p=0.2, **kw)
    inp = prepare(q, k, v, dropout_p=0.2, generator=torch.Generator().manual_seed(12), **kw)
    out = cpp.run(inp, block_size=32, panel_rows=1 if panels else 2**62)
    ref, _ = oracle_attention(q, k, v, dropout_keep=keep, dropout_p=0.2, **kw)
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=3e-4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves = [q, k, v, bias]
    for name, a, b in zip(["q", "k", "v", "bias"], grads_of(out, leaves, g), grads_of(ref, leaves, g), strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=5e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("window,err", [
    ((-2, 0), ValueError), ((0, -3), ValueError), ((1,), TypeError), ((1.0, 2), TypeError), ("left", TypeError),
    ((True, 1), TypeError),
])
def test_bad_window(window, err):
    q, k, v = qkv(1, 1, 1, 3, 3, 2, 2, torch.float64, seed=0, grad=False)
    with pytest.raises(err, match="window"):
        sa_attention(q, k, v, window=window)


@pytest.mark.parametrize("softcap,err", [
    (0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), ("1", TypeError),
    (True, TypeError),
])
def test_bad_softcap(softcap, err):
    q, k, v = qkv(1, 1, 1, 3, 3, 2, 2, torch.float64, seed=0, grad=False)
    with pytest.raises(err, match="softcap"):
        sa_attention(q, k, v, softcap=softcap)
