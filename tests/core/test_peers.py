"""Peer normalizers (softmax+1, sigmoid, SSMax, softpick, stablemax) against naive float64 formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import sasoftmax.normalizers.peers as peers
from sasoftmax import sa_attention
from sasoftmax.lm.model import GPT, GPTConfig
from sasoftmax.normalizers import (
    causal_visibility,
    get_normalizer,
    list_normalizers,
    masked_softmax,
    materialized_attention,
)

PEERS = ["softmax_plus_one", "sigmoid", "ssmax", "softpick", "stablemax"]
WEIGHTS = {
    "softmax_plus_one": peers.softmax_plus_one_weights,
    "sigmoid": peers.sigmoid_weights,
    "ssmax": peers.ssmax_weights,
    "softpick": peers.softpick_weights,
    "stablemax": peers.stablemax_weights,
}
F64 = torch.float64


# ------------------------------------------------------------------------------------- naive formulas (float64)
# Each takes the 1-D tensor x of the visible scores of one row (n = len(x)) and, for SSMax, the head's scale c.
# Written straight from the papers' definitions, without any stabilization (the tests keep scores moderate).


def naive_softmax_plus_one(x, c=None):
    e = torch.exp(x)
    return e / (1.0 + e.sum())


def naive_sigmoid(x, c=None):
    n = x.numel()
    return 1.0 / (1.0 + torch.exp(-(x - math.log(n))))


def naive_ssmax(x, c):
    n = x.numel()
    p = torch.pow(torch.tensor(float(n), dtype=x.dtype), c * x)  # n^{c x}
    return p / p.sum()


def naive_softpick(x, c=None):
    t = torch.exp(x) - 1.0
    return torch.clamp(t, min=0.0) / (t.abs().sum() + peers.SOFTPICK_EPS)


def naive_stablemax(x, c=None):
    g = torch.stack([xi + 1.0 if float(xi.detach()) >= 0 else 1.0 / (1.0 - xi) for xi in x])
    return g / g.sum()


NAIVE = {
    "softmax_plus_one": naive_softmax_plus_one,
    "sigmoid": naive_sigmoid,
    "ssmax": naive_ssmax,
    "softpick": naive_softpick,
    "stablemax": naive_stablemax,
}


def naive_weights(name, s, visible, scales=None):
    """Row by row over a dense bool ``visible`` of ``s``'s shape; masked entries and empty rows 0."""
    B, H, Nq, Nk = s.shape
    rows = []
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                idx = [j for j in range(Nk) if bool(visible[b, h, i, j])]
                row = torch.zeros(Nk, dtype=s.dtype)
                if idx:
                    c = None if scales is None else scales[h]
                    row = row.index_put((torch.tensor(idx),), NAIVE[name](s[b, h, i, idx], c))
                rows.append(row)
    return torch.stack(rows).view(B, H, Nq, Nk)


def naive_attention(name, q, k, v, *, scale, keep=None, bias=None, slopes=None, causal=True, scales=None):
    """Bottom-right causal attention with ALiBi, bias and a bool keep mask; GQA by head index; loops."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = []
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Nq):
                qpos = Nk - Nq + i
                js, xs = [], []
                for j in range(Nk):
                    if causal and j > qpos:
                        continue
                    if keep is not None and not bool(keep[b, 0, min(i, keep.shape[2] - 1), j]):
                        continue
                    x = scale * torch.dot(q[b, h, i], k[b, kh, j])
                    if slopes is not None:
                        x = x - float(slopes[h]) * abs(qpos - j)
                    if bias is not None:
                        x = x + bias[0, h, i, j]
                    js.append(j)
                    xs.append(x)
                if not js:
                    out.append(torch.zeros(v.shape[-1], dtype=v.dtype))
                    continue
                w = NAIVE[name](torch.stack(xs), None if scales is None else scales[h])
                out.append((w[:, None] * v[b, kh, js]).sum(0))
    return torch.stack(out).view(B, Hq, Nq, v.shape[-1])


def _module_for(name, hq, gen):
    """An ssmax module holding per-head scales (other peers: None)."""
    if name != "ssmax":
        return None, None
    holder = torch.nn.Module()
    holder.ssmax_scale = torch.nn.Parameter(0.3 + 0.7 * torch.rand(hq, generator=gen, dtype=F64))
    return holder, holder.ssmax_scale


def _scales(module):
    return None if module is None else [float(x) for x in module.ssmax_scale.detach()]


# ------------------------------------------------------------------------------------------------- registration


def test_peers_registered():
    names = set(list_normalizers())
    for name in PEERS:
        assert name in names
        entry = get_normalizer(name)
        assert entry.description and callable(entry.fn)
        assert entry.weights is WEIGHTS[name]
        assert entry.needs_params == (name == "ssmax")
    assert get_normalizer("ssmax").init_params is peers.ssmax_init_params
    for fn in WEIGHTS.values():
        assert fn.__name__ in peers.__all__ and fn.__doc__


# -------------------------------------------------------------------------------------------- weights vs naive


def _masks(B, H, Nq, Nk):
    pad = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    pad[1, ..., Nk - 3:] = False
    causal = causal_visibility(Nq, Nk, torch.device("cpu"))[None, None]
    return {"none": None, "padding": pad, "causal": causal, "both": pad & causal}


@pytest.mark.parametrize("name", PEERS)
def test_weights_match_naive_formula(name):
    g = torch.Generator().manual_seed(0)
    B, H, Nq, Nk = 2, 3, 4, 7
    s = 2.0 * torch.randn(B, H, Nq, Nk, generator=g, dtype=F64)
    module, _ = _module_for(name, H, g)
    for visible in _masks(B, H, Nq, Nk).values():
        dense = torch.ones_like(s, dtype=torch.bool) if visible is None else visible.expand_as(s)
        want = naive_weights(name, s, dense, _scales(module) or [peers.ssmax_default_scale()] * H)
        got = WEIGHTS[name](s, visible, module)
        assert got.dtype == F64 and got.shape == s.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert bool((got[~dense] == 0).all())
        if visible is not None:  # masked entries hold garbage: no influence
            garbage = torch.where(dense, s, 1e4 * torch.sign(torch.randn(s.shape, generator=g, dtype=F64)))
            torch.testing.assert_close(WEIGHTS[name](garbage, visible, module), got, rtol=0, atol=0)


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("hq,hkv,nq,nk,causal", [(4, 4, 5, 5, True), (4, 2, 4, 7, True), (2, 1, 3, 6, False)])
def test_attention_matches_handwritten(name, hq, hkv, nq, nk, causal):
    """``get_normalizer(name).fn`` (materialized attention: GQA, bottom-right causal, padding mask, bias, ALiBi)
    against a loop implementation, values and gradients."""
    g = torch.Generator().manual_seed(1)
    d = 8
    q = torch.randn(2, hq, nq, d, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(2, hkv, nk, d, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(2, hkv, nk, d, generator=g, dtype=F64, requires_grad=True)
    bias = (0.5 * torch.randn(1, hq, nq, nk, generator=g, dtype=F64)).requires_grad_()
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625][:hq], dtype=F64)
    keep = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    keep[1, ..., :2] = False
    module, param = _module_for(name, hq, g)
    out = get_normalizer(name).fn(q, k, v, is_causal=causal, attn_mask=keep, bias=bias, alibi_slopes=slopes,
                                  scale=0.7, dropout_p=0.0, module=module)
    want = naive_attention(name, q, k, v, scale=0.7, keep=keep, bias=bias, slopes=slopes, causal=causal,
                           scales=None if param is None else list(param))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-11)
    cot = torch.cos(torch.arange(out.numel(), dtype=F64)).view_as(out)
    inputs = (q, k, v, bias) + (() if param is None else (param,))
    grads = torch.autograd.grad((out * cot).sum(), inputs)
    grads_want = torch.autograd.grad((want * cot).sum(), inputs)
    for a, b in zip(grads, grads_want, strict=True):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", PEERS)
def test_gradcheck_float64(name):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(1, 1, 4, 4, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(1, 1, 4, 3, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    keep = torch.tensor([True, True, False, True]).view(1, 1, 1, 4)
    fn = get_normalizer(name).fn
    inputs = [q, k, v, bias]
    if name == "ssmax":
        inputs.append(torch.tensor([0.4, 0.9], dtype=F64, requires_grad=True))

    def f(q, k, v, bias, *rest):
        module = SimpleNamespace(ssmax_scale=rest[0]) if rest else None
        return fn(q, k, v, is_causal=True, attn_mask=keep, bias=bias, scale=1.3, module=module)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", PEERS)
def test_rows_without_visible_key_are_zero_with_zero_gradient(name):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    visible = torch.rand(2, 1, 3, 5, generator=g) > 0.3
    visible[1, 0, 2] = False
    visible[0, 0, 0] = False
    w = WEIGHTS[name](s, visible)
    assert bool((w[1, :, 2] == 0).all()) and bool((w[0, :, 0] == 0).all())
    (gs,) = torch.autograd.grad((w * torch.randn(w.shape, generator=g, dtype=F64)).sum(), s)
    assert bool(torch.isfinite(gs).all())
    assert bool((gs[1, :, 2] == 0).all()) and bool((gs[0, :, 0] == 0).all())
    assert bool((gs[~visible.expand_as(s)] == 0).all())
    # through attention: causal with more queries than keys leaves the first queries without a key
    q = torch.randn(1, 2, 5, 4, generator=g, requires_grad=True)
    kv = torch.randn(1, 2, 3, 4, generator=g)
    out = get_normalizer(name).fn(q, kv, kv, is_causal=True)
    assert bool((out[:, :, :2] == 0).all())
    out.sum().backward()
    assert bool(torch.isfinite(q.grad).all()) and bool((q.grad[:, :, :2] == 0).all())


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_scores_finite(name, dtype):
    g = torch.Generator().manual_seed(4)
    base = 1e4 * torch.sign(torch.randn(2, 2, 4, 6, generator=g))
    special = torch.tensor([0.0, 1.0, -1.0, 1e4, -1e4, 1.0]).expand(2, 2, 4, 6)  # kinks and branch points
    cases = [base, -base.abs(), base.abs(), base * torch.rand(base.shape, generator=g), special, 0 * base]
    visible = torch.rand(2, 1, 4, 6, generator=g) > 0.4
    for raw in cases:
        for vis in (None, visible):
            s = raw.to(dtype).requires_grad_()
            w = WEIGHTS[name](s, vis)
            assert w.dtype == dtype and bool(torch.isfinite(w).all())
            (gs,) = torch.autograd.grad((w * torch.randn(w.shape, generator=g, dtype=dtype)).sum(), s)
            assert bool(torch.isfinite(gs).all())


@pytest.mark.parametrize("name", PEERS)
def test_half_precision_scores_computed_in_float32(name):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(1, 2, 3, 4, generator=g)
    for low in (torch.float16, torch.bfloat16):
        sl = s.to(low)
        w = WEIGHTS[name](sl, None)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, WEIGHTS[name](sl.float(), None))


# -------------------------------------------------------------------------------------------------- properties


def test_properties():
    g = torch.Generator().manual_seed(6)
    s = 3.0 * torch.randn(2, 3, 6, 8, generator=g, dtype=F64)
    visible = torch.rand(2, 1, 6, 8, generator=g) > 0.3
    visible[..., 0] = True  # every row has a key
    vis = visible.expand_as(s)

    sums = peers.softmax_plus_one_weights(s, visible).sum(-1)
    assert bool(((sums > 0) & (sums < 1)).all())

    st = peers.stablemax_weights(s, visible)
    torch.testing.assert_close(st.sum(-1), torch.ones_like(sums))
    assert bool((st[vis] > 0).all())

    sg = peers.sigmoid_weights(s, visible)
    assert bool(((sg[vis] > 0) & (sg[vis] < 1)).all())

    sp = peers.softpick_weights(s, visible)
    assert bool((sp >= 0).all()) and bool((sp.abs().sum(-1) <= 1 + 1e-12).all())
    assert bool((sp[s <= 0] == 0).all())
    assert bool((peers.softpick_weights(-s.abs(), visible) == 0).all())  # all scores <= 0 -> all zero, no NaN

    ss = peers.ssmax_weights(s, visible)
    torch.testing.assert_close(ss.sum(-1), torch.ones_like(sums))


def test_sigmoid_bias_is_minus_log_visible_count_and_overridable():
    s = torch.zeros(1, 2, 4, 4, dtype=F64)
    causal = causal_visibility(4, 4, torch.device("cpu"))
    w = peers.sigmoid_weights(s, causal)
    for i in range(4):  # causal row i sees n = i + 1 keys: sigmoid(-log n) = 1 / (1 + n)
        torch.testing.assert_close(w[0, 0, i, : i + 1], torch.full((i + 1,), 1.0 / (2 + i), dtype=F64))
        assert bool((w[0, 0, i, i + 1:] == 0).all())
    torch.testing.assert_close(peers.sigmoid_weights(s, None), torch.full_like(s, 1.0 / 5))
    mod = SimpleNamespace(sigmoid_bias=-2.0)
    torch.testing.assert_close(peers.sigmoid_weights(s, None, mod), torch.full_like(s, 1 / (1 + math.exp(2.0))))
    mod = SimpleNamespace(sigmoid_bias=torch.tensor([0.0, -1.0]))  # per head
    w = peers.sigmoid_weights(s, None, mod)
    torch.testing.assert_close(w[0, 0], torch.full((4, 4), 0.5, dtype=F64))
    torch.testing.assert_close(w[0, 1], torch.full((4, 4), 1 / (1 + math.e), dtype=F64))


def test_ssmax_init_equals_softmax_at_training_length_and_single_key():
    attn = torch.nn.Module()
    attn.config = SimpleNamespace(block_size=8)
    peers.ssmax_init_params(attn, 3)
    assert isinstance(attn.ssmax_scale, torch.nn.Parameter) and attn.ssmax_scale.shape == (3,)
    torch.testing.assert_close(attn.ssmax_scale.detach(), torch.full((3,), 1 / math.log(8)))
    s = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(peers.ssmax_weights(s, None, attn), masked_softmax(s, None))  # n = block_size
    one = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    one[..., 3] = True  # a single visible key takes all the weight, whatever the score
    w = peers.ssmax_weights(100 * s, one, attn)
    assert bool((w[..., 3] == 1).all()) and float(w.detach().sum()) == 2 * 3 * 5
    # default without a module: 1 / log(512)
    torch.testing.assert_close(peers.ssmax_weights(s, None), torch.softmax(s * math.log(8) / math.log(512), -1))
    with pytest.raises(ValueError, match="ssmax_scale"):
        peers.ssmax_weights(s, None, SimpleNamespace(ssmax_scale=torch.ones(2)))


# ---------------------------------------------------------------------------------------------- GQA and dropout


@pytest.mark.parametrize("name", PEERS)
def test_gqa_dropout_reproducible_and_same_mask_as_sa_backends(name):
    """With v = identity the output is the weight matrix itself. Same seed -> same output; the entries dropped are
    those sa_attention(backend='chunked') drops for that seed, and the kept ones are scaled by 1 / (1 - p)."""
    g = torch.Generator().manual_seed(7)
    p, n = 0.4, 6
    q = torch.randn(2, 4, n, 8, generator=g, dtype=F64)
    k = torch.randn(2, 2, n, 8, generator=g, dtype=F64)
    eye = torch.eye(n, dtype=F64).expand(2, 2, n, n)
    fn = get_normalizer(name).fn

    def run(dropout_p, seed):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return materialized_attention(WEIGHTS[name], q, k, eye, is_causal=True, dropout_p=dropout_p, generator=gen)

    w0 = fn(q, k, eye, is_causal=True, dropout_p=0.0)
    a, b = run(p, 11), run(p, 11)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(p, 12))
    sa0 = sa_attention(q, k, eye, is_causal=True, backend="chunked")
    sa = sa_attention(q, k, eye, is_causal=True, dropout_p=p, generator=torch.Generator().manual_seed(11),
                      backend="chunked")
    known = sa0 != 0  # where the SA weight is nonzero its dropout mask is visible
    keep = sa != 0
    assert int((known & ~keep).sum()) > 0 and int((known & keep).sum()) > 0
    torch.testing.assert_close(a[known], (w0 * keep / (1 - p))[known], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w0, run(0.0, None))


# ----------------------------------------------------------------------------------------------------- tiny GPT


@pytest.mark.parametrize("name", PEERS)
def test_tiny_gpt_forward_backward(name):
    torch.manual_seed(8)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, normalizer=name,
                    positional="alibi", dropout=0.1)
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, torch.randint(0, 64, (2, 16)))
    assert loss is not None and bool(torch.isfinite(loss))
    loss.backward()
    for pname, prm in model.named_parameters():
        assert prm.grad is not None, pname
        assert bool(torch.isfinite(prm.grad).all()), pname


def test_tiny_gpt_ssmax_parameters():
    torch.manual_seed(9)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, normalizer="ssmax",
                    positional="alibi")
    model = GPT(cfg)
    scales = [blk.attn.ssmax_scale for blk in model.blocks]
    for sc in scales:
        assert isinstance(sc, torch.nn.Parameter) and sc.shape == (2,)
        torch.testing.assert_close(sc.detach(), torch.full((2,), 1 / math.log(16)))
    _, loss = model(torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12)))
    loss.backward()
    for sc in scales:
        assert sc.grad is not None and bool(torch.isfinite(sc.grad).all()) and bool((sc.grad != 0).any())
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    no_decay = [grp for grp in opt.param_groups if grp["weight_decay"] == 0.0]
    assert len(no_decay) == 1 and all(any(sc is p for p in no_decay[0]["params"]) for sc in scales)
    decay = [grp for grp in opt.param_groups if grp["weight_decay"] > 0]
    assert not any(sc is p for grp in decay for p in grp["params"] for sc in scales)

    with torch.no_grad():
        for i, sc in enumerate(scales):
            sc.copy_(torch.tensor([0.2, 0.9]) + i)
    state = model.state_dict()
    assert "blocks.0.attn.ssmax_scale" in state and "blocks.1.attn.ssmax_scale" in state
    other = GPT(cfg)
    other.load_state_dict(state)
    for blk, sc in zip(other.blocks, scales, strict=True):
        assert torch.equal(blk.attn.ssmax_scale, sc)
    model.eval()
    other.eval()
    idx = torch.randint(0, 64, (1, 16))
    torch.testing.assert_close(model(idx)[0], other(idx)[0])
