"""sasoftmax.integrations.hf on tiny random transformers models (built from configs, no downloads)."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.masking_utils import eager_mask, sdpa_mask

import sasoftmax.integrations.hf as sa_hf
from sasoftmax import sa_softmax

VOCAB = 100


def _llama_like(cls, **extra):
    return cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
        eos_token_id=None, **extra,
    )


CONFIGS = {
    "llama": lambda: _llama_like(LlamaConfig),
    "qwen2": lambda: _llama_like(Qwen2Config),
    "mistral": lambda: _llama_like(MistralConfig, sliding_window=7),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    ),
}
ARCHS = list(CONFIGS)


# ------------------------------------------------------------------------------------- float64 reference
def _reference_forward(normalize: bool):
    """Test-only attention: repeat GQA heads, float64 scores, SA-Softmax over the visible keys, weights @ v."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        assert dropout == 0.0
        groups = query.shape[1] // key.shape[1]
        k = key.double().repeat_interleave(groups, 1)
        v = value.double().repeat_interleave(groups, 1)
        s = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
        tq, tk = s.shape[-2:]
        if attention_mask is None:  # pure causal (bottom-right; only Tq == Tk or Tq == 1 arise here)
            visible = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        else:
            visible = attention_mask[..., :tk]
        w = sa_softmax(s, mask=visible.expand(s.shape), normalize=normalize)
        out = torch.matmul(w, v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), w.to(query.dtype)

    return forward


@pytest.fixture(scope="module", autouse=True)
def _registered():
    sa_hf.register()
    for name, normalize in (("sa_ref64", True), ("sa_ref64_plain", False)):
        AttentionInterface.register(name, _reference_forward(normalize))
        AttentionMaskInterface.register(name, sdpa_mask)


REF = {"sa_softmax": "sa_ref64", "sa_softmax_plain": "sa_ref64_plain"}


def _model(arch: str, impl: str = "sa_softmax", seed: int = 0):
    torch.manual_seed(seed)
    # from_config(cfg, attn_implementation=...) writes into the config: give each model its own
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[arch]()), attn_implementation=impl)
    return model.eval()


def _twin(model, impl: str):
    other = copy.deepcopy(model)
    other.set_attn_implementation(impl)
    return other.eval()


def _ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("impl", ["sa_softmax", "sa_softmax_plain"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_weights_match_float64_reference(arch, impl):
    model = _model(arch, impl)
    ref = _twin(model, REF[impl])
    ids = _ids(2, 12)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
        want = ref(ids, output_attentions=True)
        sdpa = _twin(model, "sdpa")(ids).logits
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert len(out.attentions) == 2
    for w, w_ref in zip(out.attentions, want.attentions, strict=True):
        assert w.shape == (2, 4, 12, 12)
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    assert (out.logits - sdpa).abs().max() > 1e-3  # SA really replaced softmax


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_matches_single_sequences(arch, side):
    model = _model(arch)
    lengths = [11, 6]
    T = max(lengths)
    seqs = [_ids(1, n, seed=i + 5)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        for b, s in enumerate(seqs):
            single = model(s[None]).logits[0]
            real = mask[b].bool()
            torch.testing.assert_close(batched[b][real], single, rtol=1e-5, atol=1e-5)
            assert torch.isfinite(batched[b]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache_matches_full_recompute(arch):
    model = _model(arch)
    prompt = _ids(2, 6, seed=3)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding, as for batched generation
    prompt = prompt.masked_fill(mask == 0, 0)
    new = 6  # with Mistral's sliding window of 7 the cache outgrows the window
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True,
                             output_logits=True, return_dict_in_generate=True)
        nocache = model.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=False)
        ids, m = prompt, mask
        logits = []
        for _ in range(new):  # recompute the whole sequence at every step
            step = model(ids, attention_mask=m, position_ids=_positions(m)).logits[:, -1]
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(gen.sequences, ids)
    assert torch.equal(nocache, ids)
    for got, want in zip(gen.logits, logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_static_cache_prefill_without_mask():
    """An empty static cache makes transformers pass no mask with more keys than queries (top-left causal)."""
    model = _model("llama")
    prompt = _ids(1, 5, seed=4)
    with torch.no_grad():
        dyn = model.generate(prompt, max_new_tokens=4, do_sample=False)
        static = model.generate(prompt, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dyn, static)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_changes_loss(arch):
    model = _model(arch)
    ids = _ids(2, 10, seed=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        before = model(ids, labels=ids).loss
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ("q_proj" in n or "c_attn" in n) and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(ids, labels=ids).loss
    assert torch.isfinite(after) and abs(after.item() - before.item()) > 1e-4


def test_attention_dropout_in_training():
    cfg = _llama_like(LlamaConfig, attention_dropout=0.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sa_softmax")
    ids = _ids(1, 10)
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_reload(arch, tmp_path):
    model = _model(arch)
    ids = _ids(2, 8)
    model.save_pretrained(tmp_path)
    for impl in ("sa_softmax", "sa_softmax_plain"):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert reloaded.config._attn_implementation == impl
        with torch.no_grad():
            want = _twin(model, impl)(ids).logits
            torch.testing.assert_close(reloaded(ids).logits, want, rtol=0, atol=0)


def test_set_attn_implementation_and_convert_model():
    base = _model("qwen2", impl="sdpa")
    ids = _ids(2, 9)
    with torch.no_grad():
        sdpa = base(ids).logits
        ref = _twin(base, "sa_ref64")(ids).logits
        switched = _twin(base, "sa_softmax")
        converted = sa_hf.convert_model(copy.deepcopy(base))
        assert converted.config._attn_implementation == "sa_softmax"
        torch.testing.assert_close(switched(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(converted(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert (switched(ids).logits - sdpa).abs().max() > 1e-3
        plain = sa_hf.convert_model(copy.deepcopy(base), normalizer="sa_softmax_plain")
        torch.testing.assert_close(plain(ids).logits, _twin(base, "sa_ref64_plain")(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="normalizer"):
        sa_hf.convert_model(base, normalizer="sdpa")


def test_gpt2_scaling_derivation():
    cfg = CONFIGS["gpt2"]()
    cfg.scale_attn_weights = False
    cfg.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sa_softmax").eval()
    ids = _ids(2, 8)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(want, _twin(model, "sa_ref64")(ids).logits, rtol=1e-5, atol=1e-5)

    unscaled = _twin(model, "sa_softmax")
    attns = [m for m in unscaled.modules() if type(m).__name__ == "GPT2Attention"]
    for m in attns:  # GPT-2 then passes scaling=None, as older releases did: the options must be read
        m.scaling = None
    with torch.no_grad():
        torch.testing.assert_close(unscaled(ids).logits, want, rtol=1e-6, atol=1e-6)
    q = torch.zeros(1, 4, 1, 8)
    for m in attns:
        assert sa_hf.derive_scaling(m, q) == pytest.approx(1.0 / (m.layer_idx + 1))
        m.scale_attn_weights, m.scale_attn_by_inverse_layer_idx = True, False
        assert sa_hf.derive_scaling(m, q) == pytest.approx(1 / math.sqrt(8))


def test_float_mask_and_unmasked_causal_paths():
    """Direct calls: an additive float mask (eager builder) equals the bool one; a missing mask means causal."""
    model = _model("llama")
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    bool_mask = sdpa_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=pad, allow_is_causal_skip=False)
    float_mask = eager_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=pad, dtype=torch.float32)
    fwd = sa_hf.sa_softmax_attention_forward
    o_bool, _ = fwd(attn, q, k, v, bool_mask, scaling=0.3)
    o_float, _ = fwd(attn, q, k, v, float_mask, scaling=0.3)
    torch.testing.assert_close(o_float, o_bool)
    assert o_bool.shape == (2, 5, 4, 8)
    causal = sdpa_mask(batch_size=2, q_length=5, kv_length=5, allow_is_causal_skip=False)
    torch.testing.assert_close(fwd(attn, q, k, v, None, scaling=0.3)[0], fwd(attn, q, k, v, causal, scaling=0.3)[0])
    # no mask, more keys than queries: only the first Tq keys count (prefill into an empty static cache)
    o_static, _ = fwd(attn, q[:, :, :3], k, v, None, scaling=0.3)
    torch.testing.assert_close(o_static, fwd(attn, q[:, :, :3], k[:, :, :3], v[:, :, :3], None, scaling=0.3)[0])
    # Gemma 2's soft-capping: the scaled products c * tanh(s / c) before the mask
    from sasoftmax import sa_attention

    o_cap, _ = fwd(attn, q, k, v, bool_mask, scaling=0.3, softcap=0.5)
    want = sa_attention(q, k, v, bool_mask, scale=0.3, softcap=0.5).transpose(1, 2)
    torch.testing.assert_close(o_cap, want)
    assert not torch.allclose(o_cap, o_bool, atol=1e-3)


def test_register_idempotent_variant_and_missing_transformers(monkeypatch):
    sa_hf.register()
    sa_hf.register()
    assert {"sa_softmax", "sa_softmax_plain"} <= set(AttentionInterface().valid_keys())
    assert "sa_softmax" in AttentionMaskInterface._global_mapping
    name = sa_hf.register_variant("sa_softmax_detached", detach_range=True, backend="reference")
    model = _model("llama")
    ids = _ids(1, 7)
    with torch.no_grad():
        torch.testing.assert_close(_twin(model, name)(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    for bad in ("sdpa", "", "a/b"):
        with pytest.raises(ValueError, match="name"):
            sa_hf.register_variant(bad)
    with pytest.raises(ValueError, match="backend"):
        sa_hf.register_variant("sa_x", backend="nope")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'sasoftmax\[hf\]'"):
        sa_hf.register()


def test_bidirectional_encoder_with_padding():
    """An encoder (BERT, is_causal=False): no causal mask is applied, padding is."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, initializer_range=0.2)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    model.set_attn_implementation("sa_softmax")
    ids = _ids(1, 7)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 3])
    with torch.no_grad():
        full = model(ids).last_hidden_state
        out = model(padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[:, :7], full, rtol=1e-5, atol=1e-5)
    # the first token sees later tokens (not causal): changing the last token changes it
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    with torch.no_grad():
        assert (model(changed).last_hidden_state[:, 0] - full[:, 0]).abs().max() > 1e-4


def test_bf16_autocast_training_step():
    """Under autocast Llama hands over float32 q/k (RoPE) and a bfloat16 v: cast as SDPA does, don't fail."""
    model = _model("llama")
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    real = mask.bool()
    torch.testing.assert_close(out.logits.float()[real], want[real], rtol=0.1, atol=0.15)


# ------------------------------------------------------------------------------------ registry normalizers (peers)
PEERS = ["stablemax", "softmax_plus_one", "sigmoid", "softpick"]


def _peer_reference_forward(weights_fn):
    """Test-only float64 attention over explicit scores with a normalizer's weights function."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k = key.double().repeat_interleave(groups, 1)
        v = value.double().repeat_interleave(groups, 1)
        s = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
        tq, tk = s.shape[-2:]
        if attention_mask is None:
            visible = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).expand(s.shape)
        else:
            visible = attention_mask[..., :tk].expand(s.shape)
        w = weights_fn(s.masked_fill(~visible, 0.0), visible, None).masked_fill(~visible, 0.0)
        return torch.matmul(w, v).to(query.dtype).transpose(1, 2).contiguous(), w.to(query.dtype)

    return forward


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_registry_peers_match_float64_reference(arch, peer):
    from sasoftmax.normalizers import get_normalizer

    assert sa_hf.register_from_registry(peer) == peer
    ref_name = f"{peer}_ref64"
    AttentionInterface.register(ref_name, _peer_reference_forward(get_normalizer(peer).weights))
    AttentionMaskInterface.register(ref_name, sdpa_mask)
    model = _model(arch, peer)
    ids = _ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second sequence
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
        want = _twin(model, ref_name)(ids, attention_mask=mask, output_attentions=True)
        plain = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, out.logits, rtol=1e-5, atol=1e-5)  # fused-call path == weights path
    for w, w_ref in zip(out.attentions, want.attentions, strict=True):
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(out.attentions[0][1, :, :, :3] == 0)  # padded keys get no weight


def test_registry_bridge_refuses_parametrized_and_unknown_normalizers():
    with pytest.raises(ValueError, match="learnable parameters"):
        sa_hf.register_from_registry("ssmax")
    with pytest.raises(ValueError, match="unknown normalizer"):
        sa_hf.register_from_registry("no_such_normalizer")
    with pytest.raises(ValueError, match="built-in"):
        sa_hf.register_from_registry("stablemax", name="sdpa")
    model = _model("llama", "sdpa")
    sa_hf.register_from_registry("stablemax", name="my_stablemax")
    sa_hf.convert_model(model, "my_stablemax")
    with torch.no_grad():
        assert torch.isfinite(model(_ids(1, 8)).logits).all()
