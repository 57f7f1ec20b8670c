"""sasoftmax.nn: SAMultiheadAttention is a drop-in for nn.MultiheadAttention, and convert() really switches models."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sasoftmax import sa_attention_with_weights
from sasoftmax.nn import SAMultiheadAttention, convert

E, H = 16, 4


def _inputs(batch_first: bool, B: int = 2, L: int = 5, S: int = 7, kdim: int = E, vdim: int = E, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)

    def shaped(n: int, d: int) -> torch.Tensor:
        t = torch.randn(B, n, d, generator=g, dtype=dtype)
        return t if batch_first else t.transpose(0, 1)

    return shaped(L, E), shaped(S, kdim), shaped(S, vdim)


def _masks(kind: str, B: int, L: int, S: int, dtype=torch.float64):
    """(key_padding_mask, attn_mask) in nn.MultiheadAttention's convention; no row is fully blocked."""
    g = torch.Generator().manual_seed(2)
    kpm = attn = None
    if "kpm" in kind:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[1, -1] = True
        if "kpmfloat" in kind:
            kpm = torch.zeros(B, S, dtype=dtype).masked_fill(kpm, float("-inf"))
    if "bool2d" in kind:
        attn = torch.rand(L, S, generator=g) < 0.4
        attn[:, 0] = False
    if "float3d" in kind:
        attn = torch.randn(B * H, L, S, generator=g, dtype=dtype)
        attn[:, :, 2] = float("-inf")
    return kpm, attn


CONFIGS = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(kdim=6, vdim=10),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10),
]
MASKS = ["none", "kpm", "kpmfloat", "bool2d", "float3d", "kpm+bool2d", "kpmfloat+float3d"]


def _pair(cfg: dict, batch_first: bool, seed: int = 0):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64, **cfg)
    if ref.bias_k is not None:  # torch initialises them with xavier; make them clearly nonzero either way
        nn.init.normal_(ref.bias_k)
        nn.init.normal_(ref.bias_v)
    if ref.in_proj_bias is not None:
        nn.init.normal_(ref.in_proj_bias, std=0.5)
    sa = SAMultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64, **cfg)
    sa.load_state_dict(ref.state_dict())
    return ref, sa


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(c) or "default")
@pytest.mark.parametrize("mask_kind", MASKS)
def test_softmax_override_reproduces_torch(batch_first, cfg, mask_kind):
    ref, sa = _pair(cfg, batch_first)
    sa.normalizer = "softmax"
    q, k, v = _inputs(batch_first, kdim=cfg.get("kdim", E), vdim=cfg.get("vdim", E))
    kpm, attn = _masks(mask_kind, 2, 5, 7)
    for need_weights, average in [(True, True), (True, False), (False, True)]:
        o_ref, w_ref = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights,
                           average_attn_weights=average)
        o_sa, w_sa = sa(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights,
                        average_attn_weights=average)
        torch.testing.assert_close(o_sa, o_ref, rtol=1e-12, atol=1e-12)
        if need_weights:
            torch.testing.assert_close(w_sa, w_ref, rtol=1e-12, atol=1e-12)
        else:
            assert w_sa is None and w_ref is None


def test_softmax_override_self_attention_eval_and_unbatched():
    """Self-attention in eval mode under no_grad is where torch takes its native fast path."""
    ref, sa = _pair({}, batch_first=True)
    ref, sa = ref.float().eval(), sa.float().eval()
    sa.normalizer = "softmax"
    x = torch.randn(3, 6, E)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        for kw in (dict(), dict(key_padding_mask=kpm)):
            o_ref, _ = ref(x, x, x, need_weights=False, **kw)
            o_sa, _ = sa(x, x, x, need_weights=False, **kw)
            torch.testing.assert_close(o_sa, o_ref, rtol=1e-5, atol=1e-5)
    # unbatched (L, E) input, both batch_first settings ignore the flag as torch does
    xu = torch.randn(6, E, dtype=torch.float64)
    for bf in (False, True):
        ref, sa = _pair({}, batch_first=bf)
        sa.normalizer = "softmax"
        o_ref, w_ref = ref(xu, xu, xu, key_padding_mask=kpm[1])
        o_sa, w_sa = sa(xu, xu, xu, key_padding_mask=kpm[1])
        assert o_sa.shape == (6, E) and w_sa.shape == (6, 6)
        torch.testing.assert_close(o_sa, o_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w_sa, w_ref, rtol=1e-12, atol=1e-12)


def _sa_reference(mha: nn.MultiheadAttention, q, k, v, kpm, attn, *, batch_first, normalize=True):
    """SA attention for nn.MultiheadAttention inputs, written out from the parameters (float64)."""
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    B, L, _ = q.shape
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    qp, kp, vp = F.linear(q, wq, bq), F.linear(k, wk, bk), F.linear(v, wv, bv)
    S = kp.shape[1]
    blocked = torch.zeros(B, H, L, S, dtype=torch.bool)
    add = torch.zeros(B, H, L, S, dtype=q.dtype)
    for m in (kpm, attn):
        if m is None:
            continue
        m4 = m[:, None, None, :] if m is kpm else (m[None, None] if m.dim() == 2 else m.view(B, H, L, S))
        if m4.dtype == torch.bool:
            blocked = blocked | m4
        else:
            blocked = blocked | torch.isinf(m4)
            add = add + torch.where(torch.isinf(m4), torch.zeros_like(m4), m4)
    if mha.bias_k is not None:
        kp = torch.cat([kp, mha.bias_k.expand(B, 1, E)], 1)
        vp = torch.cat([vp, mha.bias_v.expand(B, 1, E)], 1)
        blocked, add = F.pad(blocked, (0, 1)), F.pad(add, (0, 1))

    def heads(t):
        return t.view(B, t.shape[1], H, E // H).transpose(1, 2)

    qh, kh, vh = heads(qp), heads(kp), heads(vp)
    if mha.add_zero_attn:
        kh = torch.cat([kh, kh.new_zeros(B, H, 1, E // H)], 2)
        vh = torch.cat([vh, vh.new_zeros(B, H, 1, E // H)], 2)
        blocked, add = F.pad(blocked, (0, 1)), F.pad(add, (0, 1))
    # scores + additive mask, SA-Softmax over the visible keys, all written out here
    s = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(E // H) + add
    vis = ~blocked
    p = torch.softmax(s.masked_fill(blocked, float("-inf")), -1)
    sz = s.masked_fill(blocked, 0.0)
    if normalize:
        a = sz.amin(-1, keepdim=True).clamp(max=0)
        b = sz.amax(-1, keepdim=True).clamp(min=0)
        w = (sz - a) / (b - a + 1e-10) * p
    else:
        w = sz * p
    w = w * vis
    o = torch.matmul(w, vh).transpose(1, 2).reshape(B, L, E)
    o = mha.out_proj(o)
    return (o if batch_first else o.transpose(0, 1)), w


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cfg", [dict(), dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10)],
                         ids=["default", "kv-extras"])
@pytest.mark.parametrize("mask_kind", ["none", "kpm+bool2d", "kpmfloat+float3d"])
@pytest.mark.parametrize("normalize", [True, False])
def test_sa_matches_written_out_reference(batch_first, cfg, mask_kind, normalize):
    _, sa = _pair(cfg, batch_first)
    sa.normalize = normalize
    q, k, v = _inputs(batch_first, kdim=cfg.get("kdim", E), vdim=cfg.get("vdim", E))
    kpm, attn = _masks(mask_kind, 2, 5, 7)
    o_ref, w_ref = _sa_reference(sa, q, k, v, kpm, attn, batch_first=batch_first, normalize=normalize)
    o_w, w_avg = sa(q, k, v, key_padding_mask=kpm, attn_mask=attn)  # need_weights=True: materialized path
    o_f, none = sa(q, k, v, key_padding_mask=kpm, attn_mask=attn, need_weights=False)  # memory-efficient path
    _, w_all = sa(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False)
    assert none is None
    torch.testing.assert_close(o_w, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o_f, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w_all, w_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w_avg, w_ref.mean(1), rtol=1e-10, atol=1e-10)
    # and it is not softmax attention
    sm = copy.deepcopy(sa)
    sm.normalizer = "softmax"
    assert not torch.allclose(sm(q, k, v, key_padding_mask=kpm, attn_mask=attn)[0], o_ref, atol=1e-3)


def test_matches_sa_attention_with_weights_and_gradients():
    _, sa = _pair({}, batch_first=True)
    q, k, v = (t.requires_grad_() for t in _inputs(True))
    o, _ = sa(q, k, v, need_weights=False)
    o.sum().backward()
    # the same through the public functional API on the projections
    wq, wk, wv = sa.in_proj_weight.chunk(3)
    bq, bk, bv = sa.in_proj_bias.chunk(3)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], H, E // H).transpose(1, 2)

    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = sa_attention_with_weights(heads(F.linear(q2, wq, bq)), heads(F.linear(k2, wk, bk)),
                                       heads(F.linear(v2, wv, bv)))
    o2 = sa.out_proj(out.transpose(1, 2).reshape(2, 5, E))
    o2.sum().backward()
    torch.testing.assert_close(o, o2, rtol=1e-10, atol=1e-10)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_is_causal_hint_and_fully_masked_rows():
    _, sa = _pair({}, batch_first=True)
    x = _inputs(True, L=6, S=6)[0]
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    o_hint, _ = sa(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    o_mask, _ = sa(x, x, x, attn_mask=causal, need_weights=False)
    o_bool, _ = sa(x, x, x, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1))
    torch.testing.assert_close(o_hint, o_mask, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o_bool, o_mask, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="is_causal"):
        sa(x, x, x, is_causal=True)
    # a fully blocked row: output = out_proj bias, weights 0, no NaN
    blocked = torch.zeros(6, 6, dtype=torch.bool)
    blocked[2] = True
    o, w = sa(x, x, x, attn_mask=blocked)
    assert torch.isfinite(o).all()
    assert (w[:, 2] == 0).all()
    torch.testing.assert_close(o[:, 2], sa.out_proj.bias.expand(2, E))


def test_bad_inputs_raise_clearly():
    sa = SAMultiheadAttention(E, H, batch_first=True)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match="attn_mask"):
        sa(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        sa(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        sa(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="key_padding_mask"):
        sa(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        sa(torch.randn(2, 5, E + 1), x, x)
    with pytest.raises(ValueError, match="3-d"):
        sa(x, x[0], x)
    with pytest.raises(ValueError, match="backend"):
        SAMultiheadAttention(E, H, backend="nope")


def test_state_dict_loads_both_ways():
    for cfg in ({}, dict(kdim=6, vdim=10, add_bias_kv=True)):
        torch.manual_seed(0)
        ref = nn.MultiheadAttention(E, H, **cfg)
        sa = SAMultiheadAttention(E, H, **cfg)
        assert list(sa.state_dict()) == list(ref.state_dict())
        sa.load_state_dict(ref.state_dict(), strict=True)
        back = nn.MultiheadAttention(E, H, **cfg)
        back.load_state_dict(sa.state_dict(), strict=True)
        for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), back.state_dict().items(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2)
    assert "q_proj_weight" in SAMultiheadAttention(E, H, kdim=6).state_dict()


def test_pickle_and_deepcopy_keep_sa():
    sa = SAMultiheadAttention(E, H, batch_first=True, normalize=False)
    x = torch.randn(2, 5, E)
    for clone in (copy.deepcopy(sa), pickle.loads(pickle.dumps(sa))):
        assert isinstance(clone, SAMultiheadAttention) and clone.normalize is False
        torch.testing.assert_close(clone(x, x, x)[0], sa(x, x, x)[0])


def test_dropout_in_training_only():
    sa = SAMultiheadAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 8, E)
    sa.eval()
    o1, _ = sa(x, x, x, need_weights=False)
    o2, _ = sa(x, x, x, need_weights=False)
    torch.testing.assert_close(o1, o2)
    sa.train()
    torch.manual_seed(0)
    o3, w3 = sa(x, x, x, average_attn_weights=False)
    assert not torch.allclose(o3, o1)
    assert (w3 == 0).float().mean() > 0.2  # dropped entries


# ---------------------------------------------------------------------------------------------- convert()


def _encoder(seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


def _encoder_reference(enc: nn.TransformerEncoder, x: torch.Tensor, kpm: torch.Tensor | None) -> torch.Tensor:
    """Post-norm encoder written out, with attention from sa_attention_with_weights (float64)."""
    x = x.double()
    keep = None if kpm is None else ~kpm[:, None, None, :]
    for layer in enc.layers:
        m = copy.deepcopy(layer).double()
        at = m.self_attn
        q, k, v = F.linear(x, at.in_proj_weight, at.in_proj_bias).chunk(3, -1)
        B, L, _ = x.shape
        q, k, v = (t.view(B, L, H, E // H).transpose(1, 2) for t in (q, k, v))
        o, _ = sa_attention_with_weights(q, k, v, keep)
        o = F.linear(o.transpose(1, 2).reshape(B, L, E), at.out_proj.weight, at.out_proj.bias)
        x = m.norm1(x + o)
        x = m.norm2(x + m.linear2(F.relu(m.linear1(x))))
    return x.float()


def test_convert_keeps_parameters_and_state_dict():
    enc = _encoder()
    before = {n: p for n, p in enc.named_parameters()}
    sd = copy.deepcopy(enc.state_dict())
    out = convert(enc)
    assert out is enc
    assert all(isinstance(layer.self_attn, SAMultiheadAttention) for layer in enc.layers)
    after = dict(enc.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in before.values())
    assert list(enc.state_dict()) == list(sd)
    assert all(torch.equal(enc.state_dict()[n], sd[n]) for n in sd)
    # a bare nn.MultiheadAttention converts in place too
    mha = nn.MultiheadAttention(E, H)
    assert convert(mha, normalize=False) is mha and isinstance(mha, SAMultiheadAttention) and not mha.normalize


@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad", "eval_no_grad_padded"])
def test_convert_makes_transformer_encoder_use_sa(mode):
    enc = _encoder()
    x = torch.randn(2, 6, E)
    kpm = None
    if mode == "eval_no_grad_padded":  # the nested-tensor fast path of nn.TransformerEncoder
        kpm = torch.zeros(2, 6, dtype=torch.bool)
        kpm[1, 4:] = True
    enc.train(mode == "train")
    ctx = torch.no_grad() if "no_grad" in mode else torch.enable_grad()
    with ctx:
        base = enc(x, src_key_padding_mask=kpm)
        convert(enc)
        enc.train(mode == "train")
        got = enc(x, src_key_padding_mask=kpm)
    want = _encoder_reference(enc, x, kpm)
    rows = slice(None) if kpm is None else ~kpm  # padded positions are undefined in torch's fast path
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-4)
    assert (got[rows] - base[rows]).abs().max() > 1e-2  # it no longer computes softmax attention


def test_hand_assembled_encoder_layer_uses_sa_in_eval():
    """No convert(): an SAMultiheadAttention put into a TransformerEncoderLayer by hand still runs, because its
    forward pre-hook keeps the layer off the fused kernel."""
    enc = _encoder()
    layer = enc.layers[0]
    layer.self_attn = SAMultiheadAttention.from_torch(layer.self_attn)
    layer.eval()
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        got = layer(x)
        sa_ref = _encoder_reference(nn.TransformerEncoder(copy.deepcopy(layer), 1, enable_nested_tensor=False), x, None)
    torch.testing.assert_close(got, sa_ref, rtol=1e-4, atol=1e-4)


def test_convert_refuses_custom_subclasses_and_updates_existing():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(TypeError, match="subclass"):
        convert(nn.Sequential(Custom(E, H)))
    model = nn.Sequential(SAMultiheadAttention(E, H))
    convert(model, normalize=False, detach_range=True)
    assert model[0].normalize is False and model[0].detach_range is True
    with pytest.raises(TypeError, match="model"):
        convert("not a model")


def test_converted_encoder_under_bf16_autocast():
    enc = convert(_encoder())
    x = torch.randn(2, 6, E)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    want = enc(x, src_key_padding_mask=kpm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = enc(x, src_key_padding_mask=kpm)
    got.float().sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("name", ["sa_softmax_plain", "stablemax", "ssmax"])
def test_normalizer_from_the_registry(name):
    """`normalizer=` takes any registry entry: the weights path and the fast path agree, learnable parameters are
    created on the module, and the SA variants equal the normalize/detach_range flags they stand for."""
    torch.manual_seed(3)
    sa = SAMultiheadAttention(E, H, batch_first=True, dtype=torch.float64, normalizer=name)
    assert sa.normalizer == name and f"normalizer={name!r}" in repr(sa)
    q, k, v = _inputs(True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    o_w, w = sa(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
    o_f, _ = sa(q, k, v, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(o_f, o_w, rtol=1e-10, atol=1e-10)
    assert torch.all(w[0, :, :, 5:] == 0)
    if name == "ssmax":
        assert sa.ssmax_scale.shape == (H,) and "ssmax_scale" in dict(sa.named_parameters())
    if name == "sa_softmax_plain":
        flags = SAMultiheadAttention(E, H, batch_first=True, dtype=torch.float64, normalize=False)
        flags.load_state_dict(sa.state_dict())
        torch.testing.assert_close(flags(q, k, v, key_padding_mask=kpm)[0], o_w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown normalizer 'nope'"):
        SAMultiheadAttention(E, H, normalizer="nope")
