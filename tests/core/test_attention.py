"""sa_attention values and gradients (q, k, v, bias) against the independent float64 oracle, on every backend.

Every case runs through the reference backend, the chunked backend at its default block size, and the chunked
backend with 1, 3 and all query rows per block (so block edges fall inside masks, causal diagonals and GQA groups).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from support.helpers import (
    BACKENDS,
    F32_RUNNERS,
    RUNNERS,
    VARIANTS,
    dropout_keep_of,
    grads_of,
    qkv,
    run_sa,
)
from support.reference64 import oracle_attention

from sasoftmax import sa_attention, sa_attention_with_weights

F32_MIN = torch.finfo(torch.float32).min
F16_MIN = torch.finfo(torch.float16).min


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)


def _float_mask(B: int, Nq: int, Nk: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Additive mask (B, 1, Nq, Nk): finite offsets plus -inf, finfo(float32).min and finfo(float16).min entries;
    the last row of batch 0 is fully masked."""
    m = _randn(B, 1, Nq, Nk, seed=seed, dtype=torch.float64)
    sel = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(seed + 1))
    m = torch.where(sel < 0.15, torch.full_like(m, float("-inf")), m)
    m = torch.where((sel >= 0.15) & (sel < 0.3), torch.full_like(m, F32_MIN), m)
    m = torch.where((sel >= 0.3) & (sel < 0.4), torch.full_like(m, F16_MIN), m)
    m[:, :, :, 0] = 0.0  # every row but the one below keeps key 0
    m[0, 0, -1, :] = float("-inf")
    return m.to(dtype)


def make_case(name: str, dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], tuple, dict]:
    """Returns ``(leaves [q, k, v, (bias)], positional args after q, k, v, keyword args)`` for a named case."""
    B, H, Nq, Nk, D = 2, 2, 5, 6, 4
    args: tuple = ()
    kw: dict = {}
    Hkv, Dv = H, D
    if name == "causal_square":
        Nq = Nk = 6
        kw["is_causal"] = True
    elif name == "causal_nq_lt_nk":
        Nq, Nk = 3, 7
        kw["is_causal"] = True
    elif name == "causal_nq_gt_nk":  # the first Nq - Nk rows see no key
        Nq, Nk = 7, 3
        kw["is_causal"] = True
    elif name == "gqa_2":
        H, Hkv = 4, 2
    elif name == "gqa_1":
        H, Hkv = 4, 1
        kw["is_causal"] = True
    elif name == "dv_ne_d":
        D, Dv = 3, 7
    elif name == "scale":
        kw["scale"] = 0.9
    elif name == "eps":
        kw["eps"] = 0.5
    elif name == "large_scores":
        kw["scale"] = 6.0
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype, seed=zlib.crc32(name.encode()) % 1000)
    leaves = [q, k, v]
    if name == "key_padding":
        keep = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
        keep[1, :, :, -2:] = False
        args = (keep,)
    elif name == "bool_full":
        keep = torch.rand(B, H, Nq, Nk, generator=torch.Generator().manual_seed(3)) > 0.4
        keep[0, 1, 2] = False  # a fully masked row
        keep[1, 0, 0] = False
        keep[1, 0, 0, 4] = True  # a row with a single key
        args = (keep,)
    elif name == "bool_2d":
        keep = torch.rand(Nq, Nk, generator=torch.Generator().manual_seed(4)) > 0.5
        keep[:, 1] = True
        args = (keep,)
    elif name == "float_mask":
        args = (_float_mask(B, Nq, Nk, dtype, seed=5),)
    elif name == "float_mask_f16_on_f32":
        args = (_float_mask(B, Nq, Nk, torch.float16, seed=6),)
    elif name == "float_mask_causal":
        Nq = Nk
        leaves = list(qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype, seed=7))
        args = (_float_mask(B, Nq, Nk, dtype, seed=8),)
        kw["is_causal"] = True
    elif name.startswith("bias_"):
        shape = {
            "bias_1hqk": (1, H, Nq, Nk),
            "bias_b1qk": (B, 1, Nq, Nk),
            "bias_h1k": (H, 1, Nk),
            "bias_qk": (Nq, Nk),
            "bias_bh1k": (B, H, 1, Nk),
            "bias_full_masked": (B, H, Nq, Nk),
        }[name]
        bias = _randn(*shape, seed=9, dtype=dtype, grad=True)
        kw["bias"] = bias
        leaves.append(bias)
        if name == "bias_full_masked":
            keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(10)) > 0.3
            args = (keep,)
            kw["is_causal"] = True
    elif name == "alibi_h":
        kw["alibi_slopes"] = torch.tensor([0.5, 0.125], dtype=torch.float32)
        kw["is_causal"] = True
    elif name == "alibi_bh":
        kw["alibi_slopes"] = torch.tensor([[0.5, 0.25], [0.0625, 1.0]], dtype=torch.float32)
    elif name == "gqa_1":
        bias = _randn(1, H, Nq, Nk, seed=11, dtype=dtype, grad=True)
        kw["bias"] = bias
        leaves.append(bias)
    return leaves, args, kw


CASES = [
    "basic", "causal_square", "causal_nq_lt_nk", "causal_nq_gt_nk", "key_padding", "bool_full", "bool_2d",
    "float_mask", "float_mask_f16_on_f32", "float_mask_causal", "bias_1hqk", "bias_b1qk", "bias_h1k", "bias_qk",
    "bias_bh1k", "bias_full_masked", "alibi_h", "alibi_bh", "gqa_2", "gqa_1", "dv_ne_d", "scale", "eps",
    "large_scores",
]


def _check_against_oracle(runner, case: str, normalize: bool, detach_range: bool, dtype, atol: float, rtol: float):
    backend, block = runner
    leaves, args, kw = make_case(case, dtype)
    q, k, v = leaves[:3]
    kw = dict(kw, normalize=normalize, detach_range=detach_range)
    out = run_sa(backend, block, q, k, v, *args, **kw)
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert torch.isfinite(out).all()
    ref, _ = oracle_attention(q, k, v, *args, **kw)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    g = _randn(*out.shape, seed=12)
    got = grads_of(out, leaves, g)
    want = grads_of(ref, leaves, g)
    for name, a, b in zip(["q", "k", "v", "bias"][: len(leaves)], got, want, strict=True):
        assert a is not None, f"no gradient for {name}"
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle_float64(runner, case, normalize, detach_range):
    _check_against_oracle(runner, case, normalize, detach_range, torch.float64, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("runner", F32_RUNNERS)
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", ["basic", "causal_nq_gt_nk", "float_mask", "bias_b1qk", "gqa_1", "alibi_bh"])
def test_matches_oracle_float32(runner, case, normalize, detach_range):
    _check_against_oracle(runner, case, normalize, detach_range, torch.float32, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("runner", RUNNERS)
def test_detach_range_changes_gradients_not_values(runner):
    """Scores of both signs make a and b matter: the two range modes must agree in value, differ in gradient,
    and each match the oracle with (or without) the gradient through min/max."""
    backend, block = runner
    leaves, args, kw = make_case("bias_1hqk")
    q, k, v, bias = leaves
    g = _randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], seed=13)
    results = {}
    for detach in (False, True):
        out = run_sa(backend, block, q, k, v, bias=bias, detach_range=detach)
        results[detach] = (out.detach(), grads_of(out, leaves, g))
    torch.testing.assert_close(results[False][0], results[True][0], atol=0, rtol=0)
    for i in (0, 1, 3):  # q, k and bias see the range terms (v's gradient does not depend on the mode)
        assert (results[False][1][i] - results[True][1][i]).abs().max() > 1e-3
    torch.testing.assert_close(results[False][1][2], results[True][1][2], atol=1e-12, rtol=0)
    for detach in (False, True):
        ref, _ = oracle_attention(q, k, v, bias=bias, detach_range=detach)
        for a, b in zip(results[detach][1], grads_of(ref, leaves, g), strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
        other, _ = oracle_attention(q, k, v, bias=bias, detach_range=not detach)
        other_grads = grads_of(other, leaves, g)
        mismatch = max((a - b).abs().max().item() for a, b in zip(results[detach][1], other_grads, strict=True))
        assert mismatch > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_equals_explicit_bias(backend):
    """alibi_slopes is the same as the explicit bias -slope * |Nk - Nq + i - j| (Nq != Nk)."""
    q, k, v = qkv(2, 3, 3, 4, 7, 5, 5, torch.float64, seed=14)
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    i = torch.arange(4, dtype=torch.float64)[:, None]
    j = torch.arange(7, dtype=torch.float64)[None, :]
    explicit = -slopes[:, None, None] * (7 - 4 + i - j).abs()
    a = sa_attention(q, k, v, alibi_slopes=slopes.float(), is_causal=True, backend=backend)
    b = sa_attention(q, k, v, bias=explicit, is_causal=True, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # slopes are applied in float32
    ref, _ = oracle_attention(q, k, v, bias=explicit, is_causal=True)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_equals_repeated_heads(backend):
    """GQA is exactly attention with key/value head h // groups repeated for each query head."""
    q, k, v = qkv(2, 6, 2, 5, 5, 4, 3, torch.float64, seed=15)
    out = sa_attention(q, k, v, is_causal=True, backend=backend)
    rep = sa_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True, backend=backend)
    torch.testing.assert_close(out, rep, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_and_float_masks_agree(backend):
    """A bool mask and the equivalent -inf/finfo.min float mask give the same output and gradients."""
    q, k, v = qkv(2, 2, 2, 5, 5, 4, 4, torch.float64, seed=16)
    keep = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(17)) > 0.4
    keep[..., 0] = True
    for fill in (float("-inf"), F32_MIN, F16_MIN):
        fmask = torch.zeros(2, 1, 5, 5, dtype=torch.float64).masked_fill(~keep, fill)
        a = sa_attention(q, k, v, keep, backend=backend)
        b = sa_attention(q, k, v, fmask, backend=backend)
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_equals_explicit_bottom_right_mask(backend):
    for nq, nk in ((3, 7), (7, 3), (5, 5)):
        q, k, v = qkv(1, 2, 2, nq, nk, 4, 4, torch.float64, seed=18)
        keep = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        a = sa_attention(q, k, v, is_causal=True, backend=backend)
        b = sa_attention(q, k, v, keep, backend=backend)
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", ["basic", "causal_nq_gt_nk", "float_mask", "gqa_1", "bias_full_masked"])
def test_with_weights_matches_oracle(case, normalize, detach_range):
    leaves, args, kw = make_case(case)
    q, k, v = leaves[:3]
    kw = dict(kw, normalize=normalize, detach_range=detach_range)
    out, w = sa_attention_with_weights(q, k, v, *args, **kw)
    ref_out, ref_w = oracle_attention(q, k, v, *args, **kw)
    assert w.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and w.dtype == q.dtype
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    v_full = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    torch.testing.assert_close(out, w @ v_full, atol=1e-12, rtol=1e-12)
    if normalize:
        assert (w >= 0).all() and (w <= 1).all()
        assert (w.sum(-1) <= 1 + 1e-12).all()


def test_with_weights_half_dtype():
    leaves, args, kw = make_case("float_mask", torch.float16)
    out, w = sa_attention_with_weights(*leaves[:3], *args, **kw)
    assert out.dtype == torch.float16 and w.dtype == torch.float16
    assert torch.isfinite(out).all() and torch.isfinite(w).all()


# ------------------------------------------------------------------------------------------------- dropout


def _dropout_inputs(seed: int = 20):
    return qkv(2, 2, 2, 9, 11, 4, 5, torch.float64, seed=seed)


@pytest.mark.parametrize("runner", RUNNERS)
def test_dropout_reproducible_with_generator(runner):
    backend, block = runner
    q, k, v = _dropout_inputs()
    outs = [
        run_sa(backend, block, q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(s)).detach()
        for s in (1, 1, 2)
    ]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert (outs[0] - outs[2]).abs().max() > 1e-3
    no_drop = run_sa(backend, block, q, k, v).detach()
    assert (outs[0] - no_drop).abs().max() > 1e-3


def test_dropout_global_seed_reproducible():
    q, k, v = _dropout_inputs()
    torch.manual_seed(123)
    a = sa_attention(q, k, v, dropout_p=0.4, backend="chunked")
    torch.manual_seed(123)
    b = sa_attention(q, k, v, dropout_p=0.4, backend="chunked")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_dropout_same_entries_on_every_backend(normalize, detach_range):
    """Dropout is counter-based: the same seed drops the same entries on every backend and block size, so
    outputs and gradients agree (the chunked analytic backward against autograd through the reference)."""
    q, k, v = _dropout_inputs(21)
    bias = _randn(1, 2, 9, 11, seed=22, grad=True)
    leaves = [q, k, v, bias]
    kw = dict(is_causal=True, bias=bias, normalize=normalize, detach_range=detach_range, dropout_p=0.35)
    g = _randn(2, 2, 9, 5, seed=23)
    ref = run_sa("reference", None, q, k, v, generator=torch.Generator().manual_seed(7), **kw)
    ref_grads = grads_of(ref, leaves, g)
    for block in (None, 1, 3, "N"):
        out = run_sa("chunked", block, q, k, v, generator=torch.Generator().manual_seed(7), **kw)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        for a, b in zip(grads_of(out, leaves, g), ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_dropout_matches_oracle_with_its_mask(normalize, detach_range):
    """The dropped weights are exactly ``w * keep / (1 - p)``; the oracle with the same keep mask reproduces the
    output and the gradients of the chunked backend."""
    q, k, v = _dropout_inputs(24)
    p = 0.3
    kw = dict(is_causal=True, normalize=normalize, detach_range=detach_range)
    keep = dropout_keep_of(q, k, v, is_causal=True, seed=9, dropout_p=p)
    assert keep.any() and not keep.all()
    _, w_full = sa_attention_with_weights(q, k, v, **kw)
    _, w_drop = sa_attention_with_weights(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(9), **kw)
    torch.testing.assert_close(w_drop, w_full * keep / (1 - p), atol=1e-14, rtol=1e-12)
    out = sa_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(9), backend="chunked", **kw)
    ref, _ = oracle_attention(q, k, v, dropout_keep=keep, dropout_p=p, **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = _randn(*out.shape, seed=25)
    for a, b in zip(grads_of(out, [q, k, v], g), grads_of(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction_and_expectation(p):
    """About a fraction p of the weights is dropped, and the kept ones are scaled so the expectation holds."""
    q, k, v = qkv(2, 4, 4, 48, 48, 8, 8, torch.float32, seed=26)
    q, k, v = q.detach(), k.detach(), v.detach()
    _, w_full = sa_attention_with_weights(q, k, v)
    _, w_drop = sa_attention_with_weights(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(10))
    n = w_full.numel()
    dropped = ((w_drop == 0) & (w_full != 0)).sum().item() / (w_full != 0).sum().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 6 * sigma
    # expectation: averaged over many rows, the dropped weights sum like the full ones
    ratio = w_drop.sum().item() / w_full.sum().item()
    assert abs(ratio - 1) < 0.03
    # and over several seeds the mean output of a small problem approaches the dropout-free one
    qs, ks, vs = qkv(1, 1, 1, 4, 6, 4, 4, torch.float64, seed=27)
    qs, ks, vs = qs.detach(), ks.detach(), vs.detach()
    ref = sa_attention(qs, ks, vs, backend="chunked")
    draws = torch.stack([
        sa_attention(qs, ks, vs, dropout_p=p, generator=torch.Generator().manual_seed(s), backend="chunked")
        for s in range(400)
    ])
    err = (draws.mean(0) - ref).abs().max().item()
    spread = draws.std(0).max().item() / 400**0.5
    assert err < 5 * spread + 1e-12


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_tiles_over_batch_and_head_groups(normalize, detach_range):
    """A problem large enough for the chunked backend's default tiling to split batches and key/value-head groups
    (B=2, Hq=8, Hkv=2, N=256): values and gradients equal the reference backend's, with causal mask, a per-batch
    bias and dropout."""
    q, k, v = qkv(2, 8, 2, 256, 256, 8, 4, torch.float64, seed=30)
    bias = _randn(2, 1, 256, 256, seed=31, grad=True)
    leaves = [q, k, v, bias]
    kw = dict(is_causal=True, bias=bias, normalize=normalize, detach_range=detach_range, dropout_p=0.2)
    g = _randn(2, 8, 256, 4, seed=32)
    ref = sa_attention(q, k, v, generator=torch.Generator().manual_seed(3), backend="reference", **kw)
    out = sa_attention(q, k, v, generator=torch.Generator().manual_seed(3), backend="chunked", **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads_of(out, leaves, g), grads_of(ref, leaves, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("block", [None, 1, 3, "N"])
def test_dropout_gqa_same_entries(block):
    """Dropout under GQA (Hq=4, Hkv=2) and batch 2: the chunked backend at any block size drops what the reference
    drops."""
    q, k, v = qkv(2, 4, 2, 7, 9, 3, 5, torch.float64, seed=33)
    kw = dict(is_causal=True, dropout_p=0.4)
    ref = sa_attention(q, k, v, generator=torch.Generator().manual_seed(4), backend="reference", **kw)
    out = run_sa("chunked", block, q, k, v, generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = _randn(*out.shape, seed=34)
    for a, b in zip(grads_of(out, [q, k, v], g), grads_of(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_auto_backend_on_cpu_is_cpp():
    """On the CPU ``auto`` runs the fused kernel (tests/core/test_cpp_backend.py checks it is really the one chosen)."""
    q, k, v = qkv(1, 2, 2, 4, 4, 3, 3, torch.float64, seed=35)
    a = sa_attention(q, k, v, is_causal=True)
    b = sa_attention(q, k, v, is_causal=True, backend="cpp")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
