"""``sa_paged_decode``: one new token per request attended over its history in a paged KV cache. Each request's
output must match the float64 oracle over that request's own keys and values (the accuracy rule of
``docs/contract.md`` section 4 against the eager reference in the same dtype), on the fused kernel (which reads the
pages in place) and on the gather route; blocks and slots the requests do not own never reach the result; bad input
is refused naming the argument."""

from __future__ import annotations

import pytest
import torch
from support.accuracy import assert_accuracy_rule
from support.reference64 import oracle_attention

from sasoftmax import sa_attention
from sasoftmax.attention import paged_history, paged_store, sa_paged_decode
from sasoftmax.attention.backends import cpp

ROUTES = [
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(cpp.load_error() is not None,
                                                           reason=f"kernel unavailable: {cpp.load_error()}")),
    pytest.param("gather", id="gather"),
]
# lengths around the block size (16): one token, a partial block, a full one, one past it, many blocks
LENS = [1, 5, 16, 17, 70, 300]
FEATURES = {
    "plain": {},
    "window": {"window": (9, 0)},
    "softcap": {"softcap": 2.0},
    "alibi": {"alibi_slopes": "slopes"},
    "all": {"window": (40, -1), "softcap": 3.0, "alibi_slopes": "slopes"},
}


def _paged(lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, cache_dtype: torch.dtype,
           block: int = 16, seed: int = 0, fill: float = 0.0):
    """A cache whose blocks are scattered (block ids shuffled, spare blocks between requests), the slots and blocks
    no request owns set to ``fill``. Returns (q, cache, table, seq_lens, per-request [k, v] in float64 as stored)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block) for n in lens]
    n_blocks = sum(need) + 5
    cache = torch.full((n_blocks, hkv, block, 2 * d), fill, dtype=cache_dtype)
    perm = torch.randperm(n_blocks, generator=g).tolist()
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    history = []
    for r, n in enumerate(lens):
        kv = torch.randn(n, hkv, 2 * d, generator=g, dtype=torch.float64).to(cache_dtype)
        for i in range(need[r]):
            table[r, i] = b = perm.pop()
            rows = kv[i * block : (i + 1) * block]
            cache[b, :, : rows.shape[0]] = rows.transpose(0, 1)
        history.append(kv.double())
    q = (torch.randn(len(lens), hq, d, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    return q, cache, table, torch.tensor(lens), history


def _kwargs(feature: str, hq: int, dtype: torch.dtype) -> dict:
    kw = dict(FEATURES[feature])
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = (torch.arange(1, hq + 1, dtype=torch.float64) / hq).to(dtype)
    return kw


def _per_request(q, history, kw, d, exact: bool, normalize: bool):
    """Each request through the float64 oracle (``exact``) or the eager reference backend in q's dtype."""
    outs = []
    for r, kv in enumerate(history):
        k, v = kv[..., :d].transpose(0, 1)[None], kv[..., d:].transpose(0, 1)[None]
        qr = q[r : r + 1, :, None]
        if exact:
            o, _ = oracle_attention(qr.double(), k, v, is_causal=True, normalize=normalize, **{
                n: (x.double() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()})
        else:
            o = sa_attention(qr, k.to(q.dtype), v.to(q.dtype), is_causal=True, normalize=normalize,
                             backend="reference", **kw)
        outs.append(o[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "plain-form"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=["gqa", "mha"])
@pytest.mark.parametrize("d", [7, 64])
def test_decode_matches_the_oracle_per_request(route, feature, normalize, heads, d):
    hq, hkv = heads
    q, cache, table, lens, history = _paged(LENS, hq, hkv, d, torch.float32, torch.float32)
    kw = _kwargs(feature, hq, torch.float32)
    with torch.no_grad():
        out = sa_paged_decode(q, cache, table, lens, normalize=normalize, backend=route, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    exact = _per_request(q, history, kw, d, True, normalize)
    ref = _per_request(q, history, kw, d, False, normalize)
    assert_accuracy_rule(f"{route} {feature}", out, ref, exact, 1e-5)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("dtype", "cache_dtype", "rel"), [
    (torch.float64, torch.float64, 1e-12),
    (torch.float32, torch.bfloat16, 1e-5),  # a half cache: rows converted as they are read
    (torch.bfloat16, torch.bfloat16, 1e-2),
    (torch.float16, torch.float16, 2e-3),
])
def test_decode_dtypes(route, dtype, cache_dtype, rel):
    q, cache, table, lens, history = _paged(LENS, 4, 2, 32, dtype, cache_dtype, seed=1)
    kw = _kwargs("all", 4, dtype)
    with torch.inference_mode():
        out = sa_paged_decode(q, cache, table, lens, backend=route, **kw)
    assert out.dtype == dtype
    exact = _per_request(q, history, kw, 32, True, True)
    ref = _per_request(q, history, kw, 32, False, True)
    assert_accuracy_rule(f"{route} {dtype}", out, ref, exact, rel)


@pytest.mark.parametrize("route", ROUTES)
def test_only_the_requests_own_slots_are_read(route):
    """Unowned blocks and the slots past each request's length hold NaN: nothing of them may reach the output."""
    args = _paged(LENS, 4, 2, 16, torch.float32, torch.float32, seed=2)
    poisoned = _paged(LENS, 4, 2, 16, torch.float32, torch.float32, seed=2, fill=float("nan"))
    with torch.no_grad():
        clean = sa_paged_decode(*args[:4], backend=route)
        out = sa_paged_decode(*poisoned[:4], backend=route)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_a_nan_query_poisons_only_its_request(route):
    q, cache, table, lens, _ = _paged(LENS, 4, 2, 16, torch.float32, torch.float32, seed=3)
    q[2, 1, 0] = float("nan")
    with torch.no_grad():
        out = sa_paged_decode(q, cache, table, lens, backend=route)
    assert torch.isnan(out[2, 1]).all()
    rest = torch.ones(out.shape[:2], dtype=torch.bool)
    rest[2, 1] = False
    assert torch.isfinite(out[rest]).all()


def test_history_reads_each_request_in_order():
    _, cache, table, _, history = _paged([5, 40], 2, 2, 8, torch.float32, torch.float32)
    k, v = paged_history(cache, table[1:2], 40)
    torch.testing.assert_close(k[0].transpose(0, 1).double(), history[1][..., :8])
    torch.testing.assert_close(v[0].transpose(0, 1).double(), history[1][..., 8:])


def test_an_empty_batch_gives_an_empty_result():
    q, cache, table, lens, _ = _paged([3], 2, 2, 8, torch.float32, torch.float32)
    with torch.no_grad():
        out = sa_paged_decode(q[:0], cache, table[:0], lens[:0])
    assert out.shape == (0, 2, 8)


@pytest.mark.parametrize(("change", "match"), [
    (lambda a: a.update(query=a["query"][0]), "`query` must be"),
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :-1]), "`kv_cache` must be"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :1].expand(-1, 3, -1, -1)), "multiple of the cache"),
    (lambda a: a.update(block_table=a["block_table"][:1]), "`block_table` must be"),
    (lambda a: a.update(block_table=a["block_table"].float()), "`block_table` must be"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "`seq_lens` must be"),
    (lambda a: a.update(seq_lens=a["seq_lens"] * 0), r"`seq_lens` must be in \[1"),
    (lambda a: a.update(seq_lens=a["seq_lens"] + 1000), r"`seq_lens` must be in \[1"),
    (lambda a: a["block_table"].__setitem__((1, 0), 99), r"`block_table`\[1, 0\] = 99"),
    (lambda a: a.update(alibi_slopes=torch.ones(3)), "`alibi_slopes` must be"),
    (lambda a: a.update(window=(-2, 0)), "`window` must be"),
    (lambda a: a.update(backend="flash"), "`backend` must be"),
])
def test_bad_input_names_the_argument(change, match):
    q, cache, table, lens, _ = _paged([5, 20], 4, 2, 8, torch.float32, torch.float32)
    args = {"query": q, "kv_cache": cache, "block_table": table, "seq_lens": lens}
    change(args)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        sa_paged_decode(**args)


def test_a_gradient_request_is_refused():
    q, cache, table, lens, _ = _paged([5], 2, 2, 8, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="no gradient"):
        sa_paged_decode(q.requires_grad_(True), cache, table, lens)


STORE_ROUTES = [
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(cpp.load_error() is not None,
                                                           reason=f"kernel unavailable: {cpp.load_error()}")),
    pytest.param("torch", id="torch"),
]


@pytest.mark.parametrize("route", STORE_ROUTES)
@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                    (torch.float16, torch.float32)])
def test_store_writes_each_token_into_its_slot(route, dtype, cache_dtype):
    """Tokens land at (slot // block, head, slot % block) as [key | value] in the cache's dtype; padding (slot -1)
    and tokens past the slot mapping are not written; strided key/value views (a fused qkv projection) are fine."""
    g = torch.Generator().manual_seed(4)
    hkv, d, block = 2, 8, 4
    cache = torch.zeros(6, hkv, block, 2 * d, dtype=cache_dtype)
    qkv = torch.randn(7, hkv, 3 * d, generator=g).to(dtype)
    key, value = qkv[..., d : 2 * d], qkv[..., 2 * d :]  # views with row strides of 3 * d
    slots = torch.tensor([5, -1, 0, 23, 9, 12], dtype=torch.int32)  # token 6 has no slot
    paged_store(key, value, cache, slots, backend=route)
    want = torch.zeros_like(cache)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want[s // block, :, s % block] = torch.cat([key[i], value[i]], dim=-1).to(cache_dtype)
    torch.testing.assert_close(cache, want, rtol=0, atol=0)


@pytest.mark.parametrize("route", STORE_ROUTES)
def test_store_refuses_a_slot_past_the_cache(route):
    cache = torch.zeros(2, 1, 4, 8)
    kv = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="slot"):
        paged_store(kv, kv, cache, torch.tensor([8]), backend=route)


def test_store_then_decode_is_attention_over_the_stored_tokens():
    """The two halves of a serving step: store a request's tokens one by one, then decode its last one."""
    g = torch.Generator().manual_seed(5)
    n, hkv, d = 37, 2, 16
    k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    q = torch.randn(1, 4, d, generator=g)
    cache = torch.full((12, hkv, 8, 2 * d), float("nan"))
    table = torch.tensor([[7, 2, 9, 0, 11]], dtype=torch.int32)
    slots = torch.tensor([int(table[0, t // 8]) * 8 + t % 8 for t in range(n)])
    for t in range(n):
        paged_store(k[t : t + 1], v[t : t + 1], cache, slots[t : t + 1])
    with torch.no_grad():
        out = sa_paged_decode(q, cache, table, torch.tensor([n]))
    want = sa_attention(q[:, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], backend="reference")
    torch.testing.assert_close(out, want[:, :, 0], rtol=2e-5, atol=2e-5)
