"""sasoftmax.sdpa_override / integrations.torch: every F.scaled_dot_product_attention call becomes SA attention.

The references are independent of the override: ``sa_attention`` called directly with the meaning of SDPA's
arguments written out by hand, or a model whose SDPA is replaced by a hand-written patch."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sasoftmax
from sasoftmax import sa_attention
from sasoftmax.integrations.torch import patch, sa_sdpa, sdpa_override, unpatch

torch.set_default_dtype(torch.float32)


def _qkv(*shape_q, nk=None, hkv=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    *lead, L, E = shape_q
    S = nk or L
    lead_k = list(lead)
    if hkv is not None:
        lead_k[-1] = hkv
    q = torch.randn(*lead, L, E, generator=g)
    k = torch.randn(*lead_k, S, E, generator=g)
    v = torch.randn(*lead_k, S, E + 2, generator=g)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _grads(out, *ts):
    return torch.autograd.grad(out.square().sum(), ts)


def _hand_patch(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The assignment users write by hand (``F.scaled_dot_product_attention = ...``) for 4-D, L == S calls."""
    return sa_attention(q, k, v, attn_mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "scale", "gqa"])
def test_override_equals_sa_attention(case):
    hkv = 2 if case == "gqa" else None
    q, k, v = _qkv(2, 4, 9, 8, hkv=hkv, grad=True)
    kw: dict = {}
    ref_kw: dict = {}
    if case == "causal":
        kw = ref_kw = {"is_causal": True}
    elif case == "bool_mask":
        m = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(3)) > 0.3
        kw = {"attn_mask": m}
        ref_kw = {"attn_mask": m}
    elif case == "float_mask":
        m = torch.randn(9, 9).masked_fill(torch.eye(9, dtype=torch.bool).roll(1, 1), float("-inf"))
        kw = {"attn_mask": m}
        ref_kw = {"attn_mask": m}
    elif case == "scale":
        kw = ref_kw = {"scale": 0.3}
    elif case == "gqa":
        kw = {"enable_gqa": True, "is_causal": True}
        ref_kw = {"is_causal": True}
    with sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    ref = sa_attention(q, k, v, **ref_kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(_grads(out, q, k, v), _grads(ref, q, k, v), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_override_options_reach_sa_attention():
    q, k, v = _qkv(1, 2, 7, 8)
    with sdpa_override(normalize=False, backend="reference"):
        plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(plain, sa_attention(q, k, v, is_causal=True, normalize=False, backend="reference"))
    assert (plain - sa_attention(q, k, v, is_causal=True)).abs().max() > 1e-3


def test_causal_with_fewer_queries_is_top_left_as_in_sdpa():
    """SDPA's is_causal with L != S is top-left aligned (query i sees keys j <= i); the override keeps that."""
    q, k, v = _qkv(1, 2, 4, 8, nk=10)
    with sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    top_left = torch.ones(4, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(out, sa_attention(q, k, v, top_left), rtol=0, atol=0)
    # and the softmax call it replaces means the same mask
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, top_left))


@pytest.mark.parametrize("layout", ["3d", "5d"])
def test_other_batch_layouts(layout):
    if layout == "3d":
        q, k, v = _qkv(3, 6, 8)
        mask = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
        ref = sa_attention(q[None], k[None], v[None], mask[None])[0]
    else:
        q, k, v = _qkv(2, 3, 2, 6, 8)
        mask = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
        full = mask.expand(2, 3, 2, 6, 6).reshape(6, 2, 6, 6)
        ref = sa_attention(q.reshape(6, 2, 6, 8), k.reshape(6, 2, 6, 8), v.reshape(6, 2, 6, 10), full)
        ref = ref.reshape(2, 3, 2, 6, 10)
    with sdpa_override():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dropout_uses_the_global_generator_like_sdpa():
    q, k, v = _qkv(1, 2, 8, 8)
    torch.manual_seed(5)
    with sdpa_override():
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    b = sa_attention(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - sa_attention(q, k, v)).abs().max() > 0


def test_autocast_gives_sdpa_dtype():
    q, k, v = _qkv(1, 2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        soft = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_override():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = sa_attention(q, k, v, is_causal=True)
    assert out.dtype == soft.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_compile_fullgraph_under_override():
    q, k, v = _qkv(2, 2, 16, 8)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(2)) > 0.3

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2

    with sdpa_override():
        compiled = f(q, k, v)
        eager = f.__wrapped__(q, k, v) if hasattr(f, "__wrapped__") else None
    ref = sa_attention(q, k, v, mask) * 2
    torch.testing.assert_close(compiled, ref, rtol=1e-6, atol=1e-6)
    if eager is not None:
        torch.testing.assert_close(eager, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- scope and nesting


def test_scoped_nested_and_restored_on_exception():
    q, k, v = _qkv(1, 2, 6, 8)
    soft = F.scaled_dot_product_attention(q, k, v)
    normalized = sa_attention(q, k, v)
    plain = sa_attention(q, k, v, normalize=False)
    outer = sdpa_override()
    with outer:
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), normalized, rtol=0, atol=0)
        with sdpa_override(normalize=False):
            torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), plain, rtol=0, atol=0)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), normalized, rtol=0, atol=0)
        with pytest.raises(ZeroDivisionError):
            with sdpa_override(normalize=False):
                raise ZeroDivisionError
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), normalized, rtol=0, atol=0)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), soft, rtol=0, atol=0)


def test_decorator_and_reentry():
    q, k, v = _qkv(1, 2, 6, 8)
    override = sdpa_override()

    @override
    def attend(depth):
        out = F.scaled_dot_product_attention(q, k, v)
        return out if depth == 0 else attend(depth - 1) + 0 * out

    torch.testing.assert_close(attend(2), sa_attention(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert not override._active


def test_other_threads_keep_softmax():
    """Torch's modes are per thread: a thread started inside the block is not overridden."""
    q, k, v = _qkv(1, 2, 6, 8)
    seen = {}
    with sdpa_override():
        t = threading.Thread(target=lambda: seen.setdefault("out", F.scaled_dot_product_attention(q, k, v)))
        t.start()
        t.join()
    torch.testing.assert_close(seen["out"], F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        return F.scaled_dot_product_attention(h, h, h, is_causal=True)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Block()
        self.other = _Block()

    def forward(self, x):
        return self.attn(x) + self.other(x) + F.scaled_dot_product_attention(x, x, x)


@pytest.mark.parametrize("compiled", [False, True])
def test_only_switches_calls_inside_the_chosen_modules(compiled):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 2, 6, 8)
    run = torch.compile(net, fullgraph=True, backend="aot_eager") if compiled else net
    with sdpa_override(only=net.attn):
        out = run(x)
    ha, ho = net.attn.proj(x), net.other.proj(x)
    want = (sa_attention(ha, ha, ha, is_causal=True) + F.scaled_dot_product_attention(ho, ho, ho, is_causal=True)
            + F.scaled_dot_product_attention(x, x, x))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert not net.attn._forward_hooks and not net.attn._forward_pre_hooks  # the hooks are gone
    with sdpa_override(only=[net.attn, net.other]):
        both = net(x)
    want = (sa_attention(ha, ha, ha, is_causal=True) + sa_attention(ho, ho, ho, is_causal=True)
            + F.scaled_dot_product_attention(x, x, x))
    torch.testing.assert_close(both, want, rtol=0, atol=0)


def test_only_recovers_after_an_exception_in_the_module():
    net = _Net()
    x = torch.randn(2, 2, 6, 8)
    with sdpa_override(only=net.attn):
        with pytest.raises(RuntimeError):
            net.attn(torch.randn(2, 2, 6, 5))  # wrong width: the Linear raises
        y = F.scaled_dot_product_attention(x, x, x)  # outside the module again: softmax
    torch.testing.assert_close(y, F.scaled_dot_product_attention(x, x, x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    q, k, v = _qkv(1, 4, 6, 8, hkv=2)
    with sdpa_override():
        with pytest.raises(ValueError, match="enable_gqa"):
            F.scaled_dot_product_attention(q, k, v)
        q2, k2, v2 = _qkv(1, 2, 6, 8)
        with pytest.raises(ValueError, match="attn_mask"):
            F.scaled_dot_product_attention(q2, k2, v2, attn_mask=torch.ones(6, 6, dtype=torch.bool), is_causal=True)
        with pytest.raises(ValueError, match="value"):
            F.scaled_dot_product_attention(q2, k2, v2[:, :, :5])
        nested = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)])
        with pytest.raises(ValueError, match="nested"):
            F.scaled_dot_product_attention(nested, nested, nested)
    with pytest.raises(ValueError, match="backend"):
        sdpa_override(backend="nope")
    with pytest.raises(TypeError, match="only"):
        sdpa_override(only=[object()])
    with pytest.raises(ValueError, match="eps"):
        sdpa_override(eps=-1.0)


def test_sa_sdpa_is_the_function_form():
    q, k, v = _qkv(1, 2, 6, 8)
    torch.testing.assert_close(sa_sdpa(q, k, v, None, 0.0, True), sa_attention(q, k, v, is_causal=True))
    assert sasoftmax.sdpa_override is sdpa_override


# --------------------------------------------------------------------------------------------------- patch/unpatch


def test_patch_and_unpatch():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 2, 6, 8)
    soft = net(x)
    with sdpa_override():
        want = net(x)
    assert patch(net) is net
    torch.testing.assert_close(net(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already patched"):
        patch(net)
    unpatch(net)
    torch.testing.assert_close(net(x), soft, rtol=0, atol=0)
    assert "forward" not in net.__dict__
    with pytest.raises(ValueError, match="not patched"):
        unpatch(net)


# ------------------------------------------------------------------------------------------ models people already use


def test_transformer_encoder_layer_equals_convert():
    from sasoftmax.nn import convert

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    converted = convert(copy.deepcopy(layer))
    layer.train()
    converted.train()
    x = torch.randn(2, 7, 32, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    with sdpa_override():
        out = layer(x, src_mask=mask, is_causal=True)
    ref = converted(x, src_mask=mask, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g_out = torch.autograd.grad(out.sum(), [x, *layer.parameters()])
    g_ref = torch.autograd.grad(ref.sum(), [x, *converted.parameters()])
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the module-level SDPA name that multi_head_attention_forward looks up is back
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    # evaluation mode: the override disables the fused fast path (a mode is active), so SA still runs
    layer.eval()
    converted.eval()
    with torch.no_grad(), sdpa_override():
        out = layer(x)
    torch.testing.assert_close(out, converted(x), rtol=1e-6, atol=1e-6)


def test_transformers_sdpa_under_override_equals_sa_softmax():
    transformers = pytest.importorskip("transformers")
    import sasoftmax.integrations.hf as sa_hf

    sa_hf.register()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    sdpa = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    sa = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sa_softmax").eval()
    assert sdpa.config._attn_implementation == "sdpa"
    sa.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[1, :3] = 0  # left padding: a mask reaches SDPA
    with sdpa_override():
        out = sdpa(ids, attention_mask=attn).logits
    ref = sa(ids, attention_mask=attn).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - sdpa(ids, attention_mask=attn).logits).abs().max() > 1e-3


def _check_against_hand_patch(model, inputs, monkeypatch, loss_fn):
    """Output and every parameter gradient under the override equal the model with SDPA replaced by hand."""
    with sdpa_override():
        out = model(*inputs)
        loss_fn(out).backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", _hand_patch)
        ref = model(*inputs)
        loss_fn(ref).backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (out - model(*inputs)).abs().max() > 1e-4  # softmax outside the block: a different model


def _train_a_few_steps(model, inputs, loss_fn, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    with sdpa_override():
        for _ in range(steps):
            loss = loss_fn(model(*inputs))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_diffusers_transformer_block(monkeypatch):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=24)
    assert isinstance(block.attn1.processor, AttnProcessor2_0)
    x = torch.randn(2, 10, 32)
    ctx = torch.randn(2, 5, 24)
    loss = lambda out: out.square().mean()  # noqa: E731
    _check_against_hand_patch(block, (x, None, ctx), monkeypatch, loss)
    _train_a_few_steps(block, (x, None, ctx), loss)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with sdpa_override():
        eager = block(x, None, ctx)
        torch.testing.assert_close(compiled(x, None, ctx), eager, rtol=1e-5, atol=1e-5)
    assert diffusers.__version__


def test_x_transformers_decoder(monkeypatch):
    xt = pytest.importorskip("x_transformers", reason="x-transformers is not installed")

    torch.manual_seed(0)
    model = xt.TransformerWrapper(num_tokens=64, max_seq_len=32,
                                  attn_layers=xt.Decoder(dim=32, depth=2, heads=4, attn_flash=True))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = lambda logits: F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))  # noqa: E731
    _check_against_hand_patch(model, (ids,), monkeypatch, loss)
    _train_a_few_steps(model, (ids,), loss)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with sdpa_override():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
