"""``sa_attention_varlen``: packed documents equal separate calls (values and every gradient) on every backend, match
the float64 oracle with the equivalent dense block-diagonal mask, keep documents apart under dropout, and refuse
malformed offsets naming the argument."""

from __future__ import annotations

import pytest
import torch
from support.helpers import BACKENDS, VARIANTS, grads_of
from support.reference64 import oracle_attention

from sasoftmax import sa_attention, sa_attention_varlen
from sasoftmax.attention import prepare
from sasoftmax.attention.backends import get_backend
from sasoftmax.attention.dropout import seed_tensor
from sasoftmax.attention.varlen import doc_seed


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lq: list[int], lk: list[int], hq: int = 4, hkv: int = 2, d: int = 8, dv: int = 5,
            dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(sum(lq), hq, d, generator=g, dtype=torch.float64),
          torch.randn(sum(lk), hkv, d, generator=g, dtype=torch.float64),
          torch.randn(sum(lk), hkv, dv, generator=g, dtype=torch.float64)]
    return [t.to(dtype).requires_grad_(True) for t in ts]


def _per_document(q, k, v, lq, lk, alibi=None, **kw) -> torch.Tensor:
    """The same documents through sa_attention one at a time, concatenated back into the packed layout."""
    outs, cq, ck = [], _cu(lq).tolist(), _cu(lk).tolist()
    for d in range(len(lq)):
        if lq[d] == 0:
            continue
        one = lambda t, c, d=d: t[c[d]:c[d + 1]].transpose(0, 1)[None]  # noqa: E731
        slopes = None if alibi is None else (alibi[d] if alibi.dim() == 2 else alibi)
        outs.append(sa_attention(one(q, cq), one(k, ck), one(v, ck), alibi_slopes=slopes, **kw)[0].transpose(0, 1))
    return torch.cat(outs)


CASES = {
    # name: (query lengths, key lengths, keyword arguments)
    "self": ([5, 3, 7], [5, 3, 7], dict()),
    "causal": ([5, 1, 7, 4], [5, 1, 7, 4], dict(is_causal=True)),
    "cross_lengths_causal": ([2, 4, 3], [5, 4, 6], dict(is_causal=True)),  # bottom-right within each document
    "empty_documents": ([0, 3, 0, 2, 1], [0, 3, 2, 2, 1], dict(is_causal=True)),  # q-empty, k-empty, length 1
    "window": ([9, 6], [9, 6], dict(window=(2, 0))),
    "window_softcap_causal": ([8, 5], [8, 5], dict(window=(3, -1), softcap=1.5, is_causal=True)),
    "alibi_heads": ([6, 4], [6, 4], dict(is_causal=True, alibi="heads")),
    "alibi_per_document": ([6, 4], [6, 4], dict(alibi="docs")),
    "long_document": ([300, 20], [300, 20], dict(is_causal=True)),  # more than one block of every kernel
    "many_short": ([3, 1, 2, 4, 1, 1, 5, 2, 3, 1, 2, 2, 4, 1, 3, 2], [3, 1, 2, 4, 1, 1, 5, 2, 3, 1, 2, 2, 4, 1, 3, 2],
                   dict(is_causal=True)),
}


def _case(name: str, dtype: torch.dtype = torch.float64):
    lq, lk, kw = CASES[name]
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi == "heads":
        kw["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    elif alibi == "docs":
        kw["alibi_slopes"] = torch.rand(len(lq), 4, generator=torch.Generator().manual_seed(1))
    return lq, lk, kw, _packed(lq, lk, dtype=dtype, seed=len(name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_separate_calls(backend, case, normalize, detach_range):
    lq, lk, kw, (q, k, v) = _case(case)
    if kw.get("window") is not None or kw.get("softcap") is not None:
        if get_backend(backend).unsupported_reason(prepare(*(t[None].transpose(1, 2) for t in (q, k, v)),
                                                           window=kw.get("window"), softcap=kw.get("softcap"))):
            pytest.skip(f"{backend} does not run windows/soft-capping")
    opts = dict(normalize=normalize, detach_range=detach_range, backend=backend)
    out = sa_attention_varlen(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), **kw, **opts)
    alibi = kw.pop("alibi_slopes", None)
    ref = _per_document(q, k, v, lq, lk, alibi, **kw, **opts)
    assert out.shape == (sum(lq), 4, 5) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    for name, a, b in zip("qkv", grads_of(out, [q, k, v], g), grads_of(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def _dense_oracle(q, k, v, lq, lk, *, is_causal=False, window=None, softcap=None, alibi_slopes=None, **kw):
    """The float64 oracle on the whole packed row with the equivalent dense mask (block-diagonal, causal and window
    bottom-right aligned per document) and ALiBi as a dense bias whose distances restart per document."""
    Tq, Tk, Hq = sum(lq), sum(lk), q.shape[1]
    keep = torch.zeros(Tq, Tk, dtype=torch.bool)
    bias = torch.zeros(Hq, Tq, Tk, dtype=torch.float64)
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    for d in range(len(lq)):
        i = torch.arange(lq[d])[:, None] + (lk[d] - lq[d])  # query position within the document
        j = torch.arange(lk[d])[None, :]
        vis = torch.ones(lq[d], lk[d], dtype=torch.bool)
        if is_causal:
            vis &= j <= i
        if window is not None:
            vis &= (i - j <= window[0]) if window[0] >= 0 else vis
            vis &= (j - i <= window[1]) if window[1] >= 0 else vis
        keep[cq[d]:cq[d + 1], ck[d]:ck[d + 1]] = vis
        if alibi_slopes is not None:
            sl = alibi_slopes[d] if alibi_slopes.dim() == 2 else alibi_slopes
            bias[:, cq[d]:cq[d + 1], ck[d]:ck[d + 1]] = -sl.double()[:, None, None] * (i - j).abs()
    four = lambda t: t.transpose(0, 1)[None]  # noqa: E731
    out, _ = oracle_attention(four(q), four(k), four(v), keep, softcap=softcap,
                              bias=bias if alibi_slopes is not None else None, **kw)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
@pytest.mark.parametrize("case", ["causal", "cross_lengths_causal", "empty_documents", "window_softcap_causal",
                                  "alibi_per_document"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_oracle_with_dense_block_diagonal_mask(backend, case, normalize, detach_range, dtype):
    lq, lk, kw, (q, k, v) = _case(case, dtype)
    opts = dict(normalize=normalize, detach_range=detach_range)
    out = sa_attention_varlen(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), backend="auto" if "softcap" in kw
                              else backend, **kw, **opts)
    ref = _dense_oracle(q, k, v, lq, lk, **kw, **opts)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=3e-5, rtol=3e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, a, b in zip("qkv", grads_of(out, [q, k, v], g), grads_of(ref, [q, k, v], g), strict=True):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_documents_do_not_see_each_other():
    """Changing document 0's tokens leaves document 1's output and its gradients unchanged."""
    lq = [4, 5]
    q, k, v = (t.detach() for t in _packed(lq, lq, dtype=torch.float32))
    a = sa_attention_varlen(q, k, v, _cu(lq), _cu(lq), 5, 5, is_causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:4] = torch.randn(t[:4].shape)
    b = sa_attention_varlen(q2, k2, v2, _cu(lq), _cu(lq), 5, 5, is_causal=True)
    assert torch.equal(a[4:], b[4:])
    assert not torch.equal(a[:4], b[:4])


@pytest.mark.parametrize("normalize,detach_range", VARIANTS)
def test_dropout_per_document_seed(normalize, detach_range):
    """Every backend drops the same entries, each document as a separate call with its :func:`doc_seed`."""
    lq = [5, 3, 6]
    q, k, v = _packed(lq, lq)
    opts = dict(is_causal=True, normalize=normalize, detach_range=detach_range, dropout_p=0.4)
    outs = {b: sa_attention_varlen(q, k, v, _cu(lq), _cu(lq), 6, 6, generator=torch.Generator().manual_seed(5),
                                   backend=b, **opts) for b in ("reference", "chunked", "cpp")}
    seed = seed_tensor(torch.Generator().manual_seed(5))
    parts, c = [], _cu(lq).tolist()
    for d in range(3):
        one = [t[c[d]:c[d + 1]].transpose(0, 1)[None] for t in (q, k, v)]
        inp = prepare(*one, **opts)
        inp.seed = doc_seed(seed, d)
        parts.append(get_backend("reference").run(inp)[0].transpose(0, 1))
    ref = torch.cat(parts)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6), dtype=ref.dtype)
    want = grads_of(ref, [q, k, v], g)
    for backend, out in outs.items():
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10, msg=backend)
        for a, b in zip(grads_of(out, [q, k, v], g), want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=backend)
    assert not torch.equal(doc_seed(seed, 0), doc_seed(seed, 1))


def test_no_queries_at_all():
    q, k, v = _packed([0, 0], [2, 3])
    out = sa_attention_varlen(q, k, v, _cu([0, 0]), _cu([2, 3]), 0, 3)
    assert out.shape == (0, 4, 5)
    out.sum().backward()


@pytest.mark.parametrize("change,err,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 8], dtype=torch.int64)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=[0, 5, 8]), TypeError, "cu_seqlens_q"),
    (dict(cu_seqlens_k=torch.tensor([1, 5, 8], dtype=torch.int32)), ValueError, "cu_seqlens_k.*start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 5, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 7], dtype=torch.int32)), ValueError, "ends at 7"),
    (dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32), max_seqlen_k=8), ValueError, "describes 2 documents"),
    (dict(max_seqlen_q=4), ValueError, "max_seqlen_q"),
    (dict(max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
    (dict(q=torch.zeros(1, 8, 4, 8)), ValueError, "`q` must be 3-d"),
    (dict(window=(-2, 0)), ValueError, "window"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(alibi_slopes=torch.ones(3, 4)), ValueError, "alibi_slopes"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input(change, err, match):
    q, k, v = _packed([5, 3], [5, 3])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=_cu([5, 3]), cu_seqlens_k=_cu([5, 3]), max_seqlen_q=5, max_seqlen_k=5)
    args.update(change)
    with pytest.raises(err, match=match):
        sa_attention_varlen(**args)
