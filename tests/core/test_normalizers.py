"""The attention-normalizer registry and its built-in entries."""

from __future__ import annotations

import math

import pytest
import torch

from sasoftmax import sa_attention
from sasoftmax.normalizers import (
    Normalizer,
    alibi_bias,
    get_normalizer,
    list_normalizers,
    materialized_attention,
    register_normalizer,
    softmax_attention,
    unregister_normalizer,
)
from sasoftmax.positional import alibi_slopes

BUILTINS = ["sa_softmax", "sa_softmax_detached", "sa_softmax_plain", "softmax"]
SA_FLAGS = {"sa_softmax": (True, False), "sa_softmax_plain": (False, False), "sa_softmax_detached": (True, True)}


def _call(name, q, k, v, *, attn_mask=None, is_causal=False, scale=None, bias=None, alibi=None, module=None):
    return get_normalizer(name).fn(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi,
        dropout_p=0.0, module=module,
    )


def _handwritten_softmax(q, k, v, slopes, scale, bias=None, keep=None):
    """Causal (bottom-right) softmax attention with ALiBi, loops for the bias and explicit masking, GQA by index."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Nq):
                qpos = Nk - Nq + i
                scores, vals = [], []
                for j in range(qpos + 1):
                    if keep is not None and not bool(keep[b, 0, i, j]):
                        continue
                    s = scale * torch.dot(q[b, h, i], k[b, kh, j])
                    s = s - float(slopes[h]) * (qpos - j)
                    if bias is not None:
                        s = s + bias[0, h, i, j]
                    scores.append(s)
                    vals.append(v[b, kh, j])
                if not scores:
                    continue
                p = torch.softmax(torch.stack(scores), dim=0)
                out[b, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


# --------------------------------------------------------------------------------------------------------- registry


def test_builtins_registered():
    assert set(BUILTINS) <= set(list_normalizers())
    for name in BUILTINS:
        entry = get_normalizer(name)
        assert isinstance(entry, Normalizer) and entry.name == name and entry.description
        assert not entry.needs_params and entry.init_params is None


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="sa_softmax") as err:
        get_normalizer("softmax_plus_two")
    assert "softmax_plus_two" in str(err.value)


def test_register_validation_and_decorator():
    with pytest.raises(ValueError, match="already registered"):
        register_normalizer("softmax", softmax_attention)
    with pytest.raises(ValueError, match="name"):
        register_normalizer("", softmax_attention)
    with pytest.raises(TypeError, match="fn"):
        register_normalizer("test_not_callable", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init_params"):
        register_normalizer("test_params", softmax_attention, needs_params=True)
    assert "test_not_callable" not in list_normalizers()

    @register_normalizer("test_decorated", description="softmax again")
    def my_attention(q, k, v, **kw):
        return softmax_attention(q, k, v, **kw)

    try:
        assert callable(my_attention)
        entry = get_normalizer("test_decorated")
        assert entry.fn is my_attention and entry.description == "softmax again"
        replaced = register_normalizer("test_decorated", softmax_attention, overwrite=True)
        assert get_normalizer("test_decorated") is replaced
    finally:
        unregister_normalizer("test_decorated")
    with pytest.raises(ValueError, match="test_decorated"):
        get_normalizer("test_decorated")


# --------------------------------------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("hq,hkv,nq,nk", [(4, 4, 6, 6), (4, 2, 6, 6), (2, 1, 3, 7)])
def test_softmax_with_alibi_equals_handwritten_float64(hq, hkv, nq, nk):
    torch.manual_seed(0)
    d = 8
    q = torch.randn(2, hq, nq, d, dtype=torch.float64)
    k = torch.randn(2, hkv, nk, d, dtype=torch.float64)
    v = torch.randn(2, hkv, nk, d, dtype=torch.float64)
    slopes = alibi_slopes(hq).double()
    out = _call("softmax", q, k, v, is_causal=True, alibi=slopes)
    want = _handwritten_softmax(q, k, v, slopes, 1 / math.sqrt(d))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


def test_softmax_bias_gradient_and_mask_float64():
    torch.manual_seed(1)
    B, H, N, D = 2, 2, 5, 4
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, H, N, N, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(B, 1, N, N) > 0.3
    keep[1, 0, 2] = False  # a row with no visible key -> output 0
    slopes = torch.zeros(H, dtype=torch.float64)
    out = _call("softmax", q, k, v, attn_mask=keep, is_causal=True, scale=0.7, bias=bias, alibi=slopes)
    want = _handwritten_softmax(q, k, v, slopes, 0.7, bias=bias, keep=keep)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    assert bool((out[1, :, 2] == 0).all())
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, bias))
    grads_want = torch.autograd.grad((want * g).sum(), (q, k, v, bias))
    for a, b in zip(grads, grads_want, strict=True):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_softmax_float_mask_min_marks_masked():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 4) for _ in range(3))
    keep = torch.tensor([[True, False, True, True]]).expand(4, 4)
    fmask = torch.zeros(4, 4).masked_fill(~keep, torch.finfo(torch.float32).min)
    fmask[0, 0] = 0.5  # an additive entry
    fmask_bool_equiv = _call("softmax", q, k, v, attn_mask=fmask)
    add = torch.where(keep, fmask, torch.full((), float("-inf")))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2 + add, -1) @ v
    torch.testing.assert_close(fmask_bool_equiv, ref)
    # a float mask whose row is entirely masked gives 0, not a uniform average
    fmask[1] = torch.finfo(torch.float32).min
    out = _call("softmax", q, k, v, attn_mask=fmask)
    assert bool((out[0, 0, 1] == 0).all())


def test_softmax_fast_path_gqa():
    torch.manual_seed(3)
    q = torch.randn(1, 4, 5, 8)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = _call("softmax", q, k, v, is_causal=True)
    want = _handwritten_softmax(q, k, v, torch.zeros(4), 1 / math.sqrt(8))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        _call("softmax", q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))


def test_alibi_bias_helper():
    s = torch.tensor([0.5, 0.25])
    b = alibi_bias(s, 2, 4)
    assert b.shape == (1, 2, 2, 4)
    assert b[0, 0].tolist() == [[-1.0, -0.5, 0.0, -0.5], [-1.5, -1.0, -0.5, 0.0]]


# --------------------------------------------------------------------------------------------------------- SA


@pytest.mark.parametrize("name", sorted(SA_FLAGS))
def test_sa_normalizers_match_sa_attention_reference(name):
    """Each SA entry is sa_attention with its flags; ALiBi slopes give what their dense bias gives."""
    torch.manual_seed(4)
    B, Hq, Hkv, N, D = 2, 4, 2, 7, 8
    q = torch.randn(B, Hq, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, Hq, N, N, dtype=torch.float64, requires_grad=True)
    slopes = alibi_slopes(Hq)
    out = _call(name, q, k, v, is_causal=True, bias=bias, alibi=slopes)
    normalize, detach = SA_FLAGS[name]
    dense = bias + alibi_bias(slopes, N, N, torch.float64)
    want = sa_attention(
        q, k, v, is_causal=True, bias=dense, normalize=normalize, detach_range=detach, backend="reference"
    )
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, bias))
    grads_want = torch.autograd.grad((want * g).sum(), (q, k, v, bias))
    for a, b in zip(grads, grads_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_sa_normalizers_differ_from_each_other_and_softmax():
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 4) * 2 for _ in range(3))
    outs = {name: _call(name, q, k, v, is_causal=True) for name in ("softmax", "sa_softmax", "sa_softmax_plain")}
    assert not torch.allclose(outs["softmax"], outs["sa_softmax"], atol=1e-3)
    assert not torch.allclose(outs["sa_softmax"], outs["sa_softmax_plain"], atol=1e-3)
    detached = _call("sa_softmax_detached", q, k, v, is_causal=True)
    torch.testing.assert_close(detached, outs["sa_softmax"])  # same forward, different backward


def test_sa_normalizer_uses_module_backend():
    class Holder(torch.nn.Module):
        attn_backend = "not_a_backend"

    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="not_a_backend"):
        _call("sa_softmax", q, q, q, is_causal=True, module=Holder())
    Holder.attn_backend = "reference"
    out = _call("sa_softmax", q, q, q, is_causal=True, module=Holder())
    torch.testing.assert_close(out, sa_attention(q, q, q, is_causal=True))


def test_softmax_causal_more_queries_than_keys_gives_zero_rows():
    torch.manual_seed(6)
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out = _call("softmax", q, k, v, is_causal=True)  # bottom-right: the first two queries see no key
    assert bool((out[:, :, :2] == 0).all())
    want = _handwritten_softmax(q, k, v, torch.zeros(2), 0.5)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert bool(torch.isfinite(q.grad).all()) and bool((q.grad[:, :, :2] == 0).all())


# ---------------------------------------------------------------------------------------------- materialized weights


@pytest.mark.parametrize("name", ["softmax", "sa_softmax", "sa_softmax_plain", "sa_softmax_detached"])
@pytest.mark.parametrize("causal", [False, True])
def test_builtin_weights_match_their_attention(name, causal):
    """Every built-in entry's ``weights`` gives, through materialized_attention, the output and gradients of its
    own (fused / SDPA) attention function: float64, GQA, bias with gradient, ALiBi, padding mask."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 6:] = False
    kw = dict(attn_mask=keep, is_causal=causal, bias=bias, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    entry = get_normalizer(name)
    outs = []
    for fn in (lambda: entry.fn(q, k, v, **kw), lambda: materialized_attention(entry.weights, q, k, v, **kw)):
        for t in (q, k, v, bias):
            t.grad = None
        out = fn()
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float64)).view_as(out))
        outs.append([out.detach(), *(t.grad.clone() for t in (q, k, v, bias))])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_register_weights_only_builds_materialized_attention():
    def half_uniform(s, visible, module=None):  # weight 1/(2n) on each of n visible keys
        vis = torch.ones_like(s, dtype=torch.bool) if visible is None else visible.expand_as(s)
        n = vis.sum(dim=-1, keepdim=True).clamp(min=1)
        return vis.to(s.dtype) / (2 * n)

    entry = register_normalizer("test_half_uniform", weights=half_uniform, description="test")
    try:
        assert get_normalizer("test_half_uniform") is entry and entry.weights is half_uniform
        q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
        v = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
        out = entry.fn(q, q, v, is_causal=True)
        want = torch.stack([v[:, :, : i + 1].mean(dim=2) / 2 for i in range(5)], dim=2)
        torch.testing.assert_close(out, want)
        out, w = materialized_attention(half_uniform, q, q, v, is_causal=True, return_weights=True)
        assert torch.all(w.triu(1) == 0)
        with pytest.raises(TypeError, match="weights"):
            register_normalizer("test_bad_weights", weights=3)
        with pytest.raises(ValueError, match="attn_mask"):
            entry.fn(q, q, v, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    finally:
        unregister_normalizer("test_half_uniform")


def test_materialized_dropout_matches_sa_backends():
    """Same generator seed, same dropped entries as sa_attention's backends."""
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    w = get_normalizer("sa_softmax").weights
    a = materialized_attention(w, q, k, v, is_causal=True, dropout_p=0.4, generator=torch.Generator().manual_seed(2))
    b = sa_attention(q, k, v, is_causal=True, dropout_p=0.4, generator=torch.Generator().manual_seed(2),
                     backend="chunked")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["sa_softmax", "ssmax", "softpick"])
def test_materialized_row_blocks_equal_full_tensors(name, monkeypatch):
    """Above MATERIALIZED_TILE_SCORES the materialized path works on query-row blocks (recomputed in the backward):
    values and every gradient (q, k, v, bias, a normalizer parameter) equal the one-block computation, with a causal
    + padding mask, ALiBi, GQA and dropout."""
    import sasoftmax.normalizers as nz

    entry = get_normalizer(name)
    module = torch.nn.Module()
    module.config = type("Cfg", (), {"block_size": 16})()
    if entry.init_params is not None:
        entry.init_params(module, 4)
        module.double()
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 15, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 15, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 13, 15, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, 1, 15, dtype=torch.bool)
    keep[0, ..., :4] = False
    leaves = [q, k, v, bias, *module.parameters()]
    results = []
    for limit in (10**9, 2 * 4 * 15 * 3):  # one block; blocks of 3 rows
        monkeypatch.setattr(nz, "MATERIALIZED_TILE_SCORES", limit)
        for t in leaves:
            t.grad = None
        out = materialized_attention(entry.weights, q, k, v, attn_mask=keep, is_causal=True, bias=bias,
                                     alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05]), dropout_p=0.25,
                                     generator=torch.Generator().manual_seed(4), module=module)
        out.backward(torch.sin(torch.arange(out.numel(), dtype=torch.float64)).view_as(out))
        results.append([out.detach(), *(t.grad.clone() for t in leaves)])
        with torch.no_grad():
            again = materialized_attention(entry.weights, q, k, v, attn_mask=keep, is_causal=True, bias=bias,
                                           alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05]), dropout_p=0.25,
                                           generator=torch.Generator().manual_seed(4), module=module)
        torch.testing.assert_close(again, out.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
