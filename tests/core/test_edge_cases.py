"""Edge cases: fully masked rows, a single key, N = 1, decoding, half precision, non-contiguous and empty inputs."""

from __future__ import annotations

import pytest
import torch
from support.accuracy import check_backends_against_oracle
from support.helpers import BACKENDS, RUNNERS, VARIANTS, grads_of, qkv, run_sa
from support.reference64 import oracle_attention

from sasoftmax import sa_attention


def _masks(kind: str, B: int, H: int, Nq: int, Nk: int):
    """(positional args, keyword args, bool (B|1, H|1, Nq) of fully masked rows) for a mask kind."""
    if kind == "bool":
        keep = torch.rand(B, H, Nq, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[:, :, 0] = False
        keep[1, 0, 2] = False
        keep[:, :, 1] = True
        return (keep,), {}, ~keep.any(-1)
    if kind == "float":
        m = torch.zeros(B, 1, Nq, Nk)
        m[0, 0, 1] = float("-inf")
        m[1, 0, 3] = torch.finfo(torch.float32).min
        m[1, 0, 0, 1:] = torch.finfo(torch.float16).min  # row 0 of batch 1 keeps only key 0
        return (m,), {}, (m <= -65504).all(-1)
    if kind == "causal_nq_gt_nk":
        rows = torch.arange(Nq) + (Nk - Nq) < 0
        return (), {"is_causal": True}, rows[None, None].expand(B, H, Nq)
    if kind == "key_padding_all":
        keep = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
        keep[1] = False  # batch element 1 has no valid key at all
        return (keep,), {}, (~keep.any(-1)).expand(B, H, Nq)
    raise AssertionError(kind)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("kind", ["bool", "float", "causal_nq_gt_nk", "key_padding_all"])
def test_fully_masked_rows_are_zero_with_zero_gradient(runner, kind, normalize, detach_range):
    B, H, Nq, Nk = 2, 2, 6, 4
    q, k, v = qkv(B, H, H, Nq, Nk, 3, 5, seed=2)
    bias = torch.randn(1, H, Nq, Nk, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias.requires_grad_()
    args, kw, empty = _masks(kind, B, H, Nq, Nk)
    empty = empty.expand(B, H, Nq)
    assert empty.any() and not empty.all()
    out = run_sa(*runner, q, k, v, *args, bias=bias, normalize=normalize, detach_range=detach_range, **kw)
    assert torch.isfinite(out).all()
    assert (out.detach()[empty] == 0).all()
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gq, gk, gv, gb = grads_of(out, [q, k, v, bias], g)
    for t in (gq, gk, gv, gb):
        assert torch.isfinite(t).all()
    assert (gq[empty] == 0).all()
    assert (gb.expand(B, H, Nq, Nk)[empty.all(0, keepdim=True).expand(B, H, Nq)] == 0).all()
    ref, _ = oracle_attention(q, k, v, *args, bias=bias, normalize=normalize, detach_range=detach_range, **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip((gq, gk, gv, gb), grads_of(ref, [q, k, v, bias], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("runner", RUNNERS)
def test_every_row_masked(runner):
    q, k, v = qkv(1, 2, 2, 3, 4, 3, 3, seed=5)
    out = run_sa(*runner, q, k, v, torch.zeros(3, 4, dtype=torch.bool))
    assert (out == 0).all()
    gq, gk, gv = grads_of(out, [q, k, v], torch.ones_like(out))
    assert (gq == 0).all() and (gk == 0).all() and (gv == 0).all()


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("normalize", [True, False])
def test_single_key(runner, normalize):
    """One visible key: plain w = s; normalized w = s / (s + eps) for s > 0 and 0 for s < 0."""
    q, k, v = qkv(2, 2, 2, 5, 1, 4, 3, seed=6)
    out = run_sa(*runner, q, k, v, normalize=normalize, eps=1e-3)
    s = (q @ k.transpose(-1, -2) / 2.0).detach()  # scale 1/sqrt(4)
    assert (s > 0).any() and (s < 0).any()
    w = s if not normalize else torch.where(s > 0, s / (s + 1e-3), torch.zeros_like(s))
    torch.testing.assert_close(out, w * v.detach(), atol=1e-12, rtol=1e-10)
    ref, _ = oracle_attention(q, k, v, normalize=normalize, eps=1e-3)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for a, b in zip(grads_of(out, [q, k, v], g), grads_of(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_n_equals_one(runner, normalize, detach_range):
    q, k, v = qkv(3, 2, 1, 1, 1, 4, 2, seed=8)
    out = run_sa(*runner, q, k, v, is_causal=True, normalize=normalize, detach_range=detach_range)
    ref, _ = oracle_attention(q, k, v, is_causal=True, normalize=normalize, detach_range=detach_range)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = torch.ones_like(out)
    for a, b in zip(grads_of(out, [q, k, v], g), grads_of(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("normalize", [True, False])
def test_decode_matches_full_causal(runner, normalize):
    """Decoding with a KV cache: Nq = 1 (and 2) causal queries against Nk keys equal the last rows of full causal
    attention; Nq = 1 causal is the same as no mask."""
    B, H, N = 2, 4, 7
    q, k, v = qkv(B, H, 2, N, N, 4, 3, seed=9, grad=False)
    alibi = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    full = run_sa(*runner, q, k, v, is_causal=True, normalize=normalize, alibi_slopes=alibi)
    for nq in (1, 2):
        part = run_sa(*runner, q[:, :, -nq:], k, v, is_causal=True, normalize=normalize, alibi_slopes=alibi)
        torch.testing.assert_close(part, full[:, :, -nq:], atol=1e-12, rtol=1e-10)
    one = run_sa(*runner, q[:, :, -1:], k, v, normalize=normalize, alibi_slopes=alibi)
    torch.testing.assert_close(one, full[:, :, -1:], atol=1e-12, rtol=1e-10)


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", ["causal_gqa", "masked_bias"])
def test_half_precision_accuracy_rule(dtype, case, normalize, detach_range):
    """Half inputs on both backends: finite, close to the float64 oracle of the same (rounded) inputs, and the
    chunked backend's error is at most 2x the reference backend's (plus a tiny floor), for output and gradients."""
    B, Hq, Hkv, Nq, Nk, D, Dv = 2, 4, 2, 24, 24, 16, 8
    if case == "masked_bias":
        Hkv, Nq = Hq, 17
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype, seed=10)
    kw: dict = {"normalize": normalize, "detach_range": detach_range}
    args: tuple = ()
    leaves = [q, k, v]
    if case == "causal_gqa":
        kw["is_causal"] = True
    else:
        keep = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(11)) > 0.2
        args = (keep,)
        bias = (torch.randn(1, Hq, Nq, Nk, generator=torch.Generator().manual_seed(12)) * 2).to(dtype)
        kw["bias"] = bias.requires_grad_()
        leaves.append(bias)
    g = torch.randn(B, Hq, Nq, Dv, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    rel = 1e-3 * (8 if dtype == torch.bfloat16 else 1)
    errs = check_backends_against_oracle(leaves, args, kw, g, ["chunked", "cpp"], rel, min_scale=0.0)
    ref, _ = oracle_attention(q, k, v, *args, **kw)
    scales = [ref.abs().max().item()] + [t.abs().max().item() for t in grads_of(ref, leaves, g)]
    loose = 2e-2 if dtype == torch.float16 else 1e-1  # "close": relative to the tensor's magnitude
    for scale, (name, err) in zip(scales, errs["reference"].items(), strict=True):
        assert err <= loose * scale, (name, errs)


@pytest.mark.parametrize("runner", RUNNERS)
def test_non_contiguous_inputs(runner):
    """Transposed (B, N, H, D) views, sliced heads and an expanded bias give the contiguous result."""
    B, N, H, D = 2, 6, 4, 5
    g = torch.Generator().manual_seed(14)
    q_bnhd = torch.randn(B, N, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k_bnhd = torch.randn(B, N, 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    v_big = torch.randn(B, 2, N, 2 * D, generator=g, dtype=torch.float64, requires_grad=True)
    bias_row = torch.randn(H, 1, N, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = q_bnhd.transpose(1, 2), k_bnhd.transpose(1, 2), v_big[..., ::2]
    bias = bias_row.expand(H, N, N).transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or bias.is_contiguous())
    out = run_sa(*runner, q, k, v, bias=bias, is_causal=True)
    qc, kc, vc, bc = (t.detach().contiguous().requires_grad_() for t in (q, k, v, bias))
    want = run_sa(*runner, qc, kc, vc, bias=bc, is_causal=True)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).transpose(-1, -2).contiguous().transpose(-1, -2)
    got = grads_of(out, [q_bnhd, k_bnhd, v_big, bias_row], go)
    exp = grads_of(want, [qc, kc, vc, bc], go)
    torch.testing.assert_close(got[0], exp[0].transpose(1, 2), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(got[1], exp[1].transpose(1, 2), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(got[2][..., ::2], exp[2], atol=1e-10, rtol=1e-8)
    assert (got[2][..., 1::2] == 0).all()
    torch.testing.assert_close(got[3], exp[3].transpose(-1, -2).sum(1, keepdim=True), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("shape", [(0, 2, 2, 3, 4), (2, 2, 2, 0, 4)], ids=["batch0", "nq0"])
def test_empty_batch_or_queries(runner, shape):
    B, Hq, Hkv, Nq, Nk = shape
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, 3, 5, seed=15)
    out = run_sa(*runner, q, k, v, is_causal=True, dropout_p=0.1)
    assert out.shape == (B, Hq, Nq, 5) and out.dtype == torch.float64
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("runner", RUNNERS)
def test_no_keys_gives_zeros(runner):
    """Nk = 0: every row has no visible key, so the output is 0 (contract.md section 1), on every backend."""
    q, k, v = qkv(2, 2, 2, 3, 0, 4, 5, seed=16)
    out = run_sa(*runner, q, k, v)
    assert out.shape == (2, 2, 3, 5) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_eps_with_all_zero_scores_is_not_silently_nan(backend):
    """``eps=0`` is accepted by validation, but a row whose visible scores are all 0 then has b - a + eps = 0.
    The call must either refuse ``eps=0`` (error naming ``eps``) or return finite values."""
    q, k, v = qkv(1, 2, 2, 3, 4, 4, 4, seed=17, grad=False)
    try:
        out = sa_attention(torch.zeros_like(q), k, v, eps=0.0, backend=backend)
    except ValueError as err:
        assert "`eps`" in str(err)
        return
    assert torch.isfinite(out).all(), "eps=0 with all-zero scores silently produced NaN"


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("normalize", [True, False])
def test_all_equal_scores(runner, normalize):
    """Ties everywhere (q = 0): the softmax is uniform; normalized weights are 0 (s - a = 0) and plain weights 0;
    with a bias the scores are equal but non-zero."""
    q, k, v = qkv(1, 2, 2, 3, 4, 4, 4, seed=18, grad=False)
    out = run_sa(*runner, torch.zeros_like(q), k, v, normalize=normalize)
    assert (out == 0).all()
    out = run_sa(*runner, torch.zeros_like(q), k, v, bias=torch.full((3, 4), 2.0, dtype=torch.float64),
                 normalize=normalize)
    w = 2.0 / (2.0 + 1e-10) * 0.25 if normalize else 2.0 * 0.25
    torch.testing.assert_close(out, (w * v.sum(2, keepdim=True)).expand(1, 2, 3, 4), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("normalize", [True, False])
def test_large_scores_via_bias_float64(runner, normalize):
    """Scores of magnitude ~1e4 (through the bias) in float64: finite and equal to the oracle."""
    q, k, v = qkv(1, 2, 2, 5, 6, 4, 3, seed=19)
    bias = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(20), dtype=torch.float64) * 1e4
    bias.requires_grad_()
    out = run_sa(*runner, q, k, v, bias=bias, normalize=normalize, is_causal=True)
    ref, _ = oracle_attention(q, k, v, bias=bias, normalize=normalize, is_causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-10 * max(1.0, ref.abs().max().item()), rtol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    for a, b in zip(grads_of(out, [q, k, v, bias], g), grads_of(ref, [q, k, v, bias], g), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-9 * max(1.0, b.abs().max().item()), rtol=1e-8)


@pytest.mark.parametrize("magnitude", [30.0, 1e4])
@pytest.mark.parametrize("normalize", [True, False])
def test_large_scores_float32_accuracy_rule(normalize, magnitude):
    """float32 inputs with scores of magnitude up to 1e4 (through the bias): the chunked backend's error against the
    float64 oracle is at most 2x the reference backend's, plus a floor of a few float32 ulps of the problem's scale
    (output and every gradient)."""
    q, k, v = qkv(2, 2, 2, 16, 16, 8, 4, dtype=torch.float32, seed=22)
    bias = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(23), dtype=torch.float64) * magnitude
    bias = bias.float().requires_grad_()
    g = torch.randn(2, 2, 16, 4, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    check_backends_against_oracle([q, k, v, bias], (), dict(bias=bias, normalize=normalize, is_causal=True), g,
                                  ["chunked"], 1e-6)
