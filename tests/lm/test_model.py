"""The GPT model: every normalizer x positional encoding, causality, extrapolation, config validation, registry use."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sasoftmax import sa_attention
from sasoftmax.lm.model import GPT, GPTConfig
from sasoftmax.normalizers import get_normalizer, register_normalizer, repeat_kv, unregister_normalizer

NORMALIZERS = ["softmax", "sa_softmax", "sa_softmax_plain", "sa_softmax_detached"]
POSITIONALS = ["nope", "rope", "alibi", "kerple_log", "kerple_power", "fire"]
VOCAB = 37


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **overrides})


def tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_forward_backward_every_combination(normalizer, positional):
    torch.manual_seed(0)
    model = GPT(tiny(normalizer=normalizer, positional=positional, n_kv_head=2))
    idx = tokens(2, 12)
    logits, loss = model(idx, tokens(2, 12, seed=1))
    assert logits.shape == (2, 12, VOCAB)
    assert loss is not None and loss.dim() == 0 and bool(torch.isfinite(loss))
    assert math.log(VOCAB) - 0.5 < loss.item() < math.log(VOCAB) + 0.5  # near-uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().sum().item() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("positional", ["alibi", "fire", "rope"])
@pytest.mark.parametrize("normalizer", ["sa_softmax", "sa_softmax_plain"])
def test_sa_model_matches_reference_backend(normalizer, positional):
    torch.manual_seed(1)
    model = GPT(tiny(normalizer=normalizer, positional=positional, attn_backend="chunked", n_kv_head=2))
    idx = tokens(2, 20)
    fast, _ = model(idx)
    model.set_attn_backend("reference")
    ref, _ = model(idx)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        model.set_attn_backend("nope")


def test_sa_model_equals_hand_assembled_forward():
    """Logits of a sa_softmax + ALiBi model, recomputed layer by layer with sa_attention(backend='reference')."""
    torch.manual_seed(2)
    model = GPT(tiny(normalizer="sa_softmax", positional="alibi", n_kv_head=2, bias=True)).double()
    idx = tokens(2, 10)
    logits, _ = model(idx)
    x = model.wte(idx)
    for blk in model.blocks:
        a = blk.attn
        h = blk.ln_1(x)
        q, k, v = a.c_attn(h).split([4 * 8, 2 * 8, 2 * 8], dim=-1)
        q = q.view(2, 10, 4, 8).transpose(1, 2)
        k = repeat_kv(k.view(2, 10, 2, 8).transpose(1, 2), 4)
        v = repeat_kv(v.view(2, 10, 2, 8).transpose(1, 2), 4)
        slopes = a.pos.alibi_slopes()
        pos = torch.arange(10, dtype=torch.float64)
        dense = -slopes.double()[:, None, None] * (pos[:, None] - pos[None, :]).abs()
        y = sa_attention(q, k, v, is_causal=True, bias=dense[None], backend="reference")
        x = x + a.c_proj(y.transpose(1, 2).reshape(2, 10, 32))
        h = blk.ln_2(x)
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(h)))
    want = model.lm_head(model.ln_f(x))
    torch.testing.assert_close(logits, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("normalizer", ["softmax", "sa_softmax"])
def test_causality(normalizer, positional):
    torch.manual_seed(3)
    model = GPT(tiny(normalizer=normalizer, positional=positional)).eval()
    idx = tokens(1, 14)
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % VOCAB
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=0, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("positional", POSITIONALS)
def test_longer_than_block_size(positional):
    torch.manual_seed(4)
    model = GPT(tiny(normalizer="sa_softmax", positional=positional, block_size=8)).eval()
    idx = tokens(1, 40)
    with torch.no_grad():
        logits, loss = model(idx, idx)
    assert logits.shape == (1, 40, VOCAB) and bool(torch.isfinite(logits).all()) and bool(torch.isfinite(loss))
    with torch.no_grad():  # the first 8 positions do not depend on the total length
        short, _ = model(idx[:, :8])
    torch.testing.assert_close(logits[:, :8], short, atol=1e-5, rtol=1e-5)


def test_loss_ignore_index_and_all_ignored():
    torch.manual_seed(5)
    model = GPT(tiny())
    idx = tokens(2, 6)
    targets = tokens(2, 6, seed=7)
    targets[0, :3] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    want = F.cross_entropy(logits[keep].float(), targets[keep])
    torch.testing.assert_close(loss, want)
    _, zero = model(idx, torch.full_like(targets, -100))
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="targets"):
        model(idx, targets[:, :3])
    with pytest.raises(ValueError, match="idx"):
        model(idx.float())
    with pytest.raises(ValueError, match="idx"):
        model(idx[0])


def test_dropout_training_mode_runs_and_eval_is_deterministic():
    torch.manual_seed(6)
    for normalizer in ("softmax", "sa_softmax"):
        model = GPT(tiny(normalizer=normalizer, positional="kerple_log", dropout=0.2))
        idx = tokens(2, 8)
        model.train()
        _, l1 = model(idx, idx)
        _, l2 = model(idx, idx)
        assert bool(torch.isfinite(l1)) and l1.item() != l2.item()
        l1.backward()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(idx)[0], model(idx)[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------ structure


def test_init_statistics_and_tying():
    torch.manual_seed(7)
    cfg = tiny(n_embd=64, n_layer=2, bias=True)
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for blk in model.blocks:
        assert blk.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert blk.mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.1)
        assert blk.attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.15)
        assert blk.mlp.c_fc.bias.abs().sum().item() == 0.0
    untied = GPT(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters(False) - model.num_parameters(False) == VOCAB * 64


def test_positional_init_survives_model_init():
    torch.manual_seed(8)
    model = GPT(tiny(positional="fire", block_size=24))
    for blk in model.blocks:
        assert blk.attn.pos.c.item() == pytest.approx(0.1)
        assert blk.attn.pos.threshold.item() == pytest.approx(24.0)
    kmodel = GPT(tiny(positional="kerple_power"))
    for blk in kmodel.blocks:
        r2 = blk.attn.pos.r2
        assert bool((r2 >= 1e-2).all()) and bool((r2 <= 2).all())


def test_num_parameters_and_gqa_shapes():
    model = GPT(tiny(n_kv_head=1))
    c = model.config
    assert model.blocks[0].attn.c_attn.out_features == (4 + 2 * 1) * 8
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters(non_embedding=False) == total
    assert model.num_parameters() == total - VOCAB * c.n_embd


def test_configure_optimizer_groups():
    model = GPT(tiny(positional="fire", bias=True))
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3
    # one optimizer step changes the weights and keeps them finite
    before = model.wte.weight.detach().clone()
    _, loss = model(tokens(2, 8), tokens(2, 8, seed=3))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.wte.weight) and bool(torch.isfinite(model.wte.weight).all())


def test_model_copies_config():
    cfg = tiny(normalizer="sa_softmax")
    model = GPT(cfg)
    cfg.attn_backend = "reference"
    assert model.config.attn_backend == "auto" and model.blocks[0].attn.attn_backend == "auto"
    model.config.attn_backend = "reference"
    assert model.blocks[1].attn.attn_backend == "reference"


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(n_head=5), "n_head"),
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(normalizer="softmax_plus_two"), "normalizer"),
        (dict(positional="learned"), "positional"),
        (dict(attn_backend="cuda_magic"), "attn_backend"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_size=-1), "block_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_embd=0), "n_embd"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(n_embd=12, n_head=4, positional="rope"), "rope"),
        (dict(bias="yes"), "bias"),
        (dict(qk_norm=1), "qk_norm"),
        (dict(qk_norm=True, qk_norm_type="batchnorm"), "qk_norm_type"),
    ],
)
def test_bad_config_raises_naming_field(overrides, field):
    cfg = tiny(**overrides)
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        GPT(cfg)


def test_odd_head_dim_fine_without_rope():
    model = GPT(tiny(n_embd=12, n_head=4, positional="alibi"))
    assert model(tokens(1, 5))[0].shape == (1, 5, VOCAB)


def test_presets():
    t = GPTConfig.from_preset("tiny", vocab_size=300)
    assert (t.n_layer, t.n_embd, t.n_head, t.block_size, t.vocab_size) == (4, 256, 4, 128, 300)
    m = GPTConfig.from_preset("125m", normalizer="sa_softmax", positional="alibi")
    assert (m.n_layer, m.n_embd, m.n_head, m.normalizer, m.positional) == (12, 768, 12, "sa_softmax", "alibi")
    assert (GPTConfig.from_preset("350m").n_layer, GPTConfig.from_preset("350m").n_embd) == (24, 1024)
    big = GPTConfig.from_preset("2.7b")
    assert (big.n_layer, big.n_embd, big.n_head) == (32, 2560, 32)
    with pytest.raises(ValueError, match="125m"):
        GPTConfig.from_preset("1t")
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_preset("tiny", n_heads=3)
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig.from_preset("tiny", n_head=7)


def test_dict_round_trip():
    cfg = tiny(normalizer="sa_softmax_plain", positional="kerple_log", n_kv_head=2, dropout=0.1)
    d = cfg.to_dict()
    assert d["normalizer"] == "sa_softmax_plain" and d["n_kv_head"] == 2
    assert GPTConfig.from_dict(d) == cfg
    import json

    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="colour"):
        GPTConfig.from_dict({**d, "colour": "red"})
    # a checkpoint round trip through the state dict
    model = GPT(cfg)
    clone = GPT(GPTConfig.from_dict(model.config.to_dict()))
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    idx = tokens(1, 7)
    torch.testing.assert_close(model(idx)[0], clone(idx)[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------ registry


@pytest.fixture
def softmax_plus_one():
    """A test-local normalizer e^x / (1 + sum e^x) with a learnable per-head temperature, counting its calls."""
    calls = []

    def init_params(module, n_heads):
        module.sp1_temp = torch.nn.Parameter(torch.ones(n_heads))

    def fn(q, k, v, *, attn_mask, is_causal, scale, bias, alibi_slopes, dropout_p, module):
        calls.append(module)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        s = (q @ k.transpose(-1, -2)) * scale * module.sp1_temp[:, None, None]
        if bias is not None:
            s = s + bias
        n = s.shape[-1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        zero = torch.zeros_like(s[..., :1])
        w = torch.softmax(torch.cat([zero, s], dim=-1), dim=-1)[..., 1:]
        return w @ v

    register_normalizer("test_off_by_one", fn, "off-by-one softmax", init_params=init_params)
    yield calls
    unregister_normalizer("test_off_by_one")


def test_custom_normalizer_is_used(softmax_plus_one):
    torch.manual_seed(9)
    cfg = tiny(normalizer="test_off_by_one", positional="kerple_log", n_kv_head=2)
    model = GPT(cfg)
    assert "blocks.0.attn.sp1_temp" in dict(model.named_parameters())
    idx = tokens(2, 9)
    logits, loss = model(idx, idx)
    assert len(softmax_plus_one) == cfg.n_layer
    assert softmax_plus_one[0] is model.blocks[0].attn
    loss.backward()
    assert model.blocks[0].attn.sp1_temp.grad.abs().sum().item() > 0
    # same weights with plain softmax give different logits: the custom function really did the attention
    ref = GPT(dataclasses.replace(cfg, normalizer="softmax"))
    state = {k: v for k, v in model.state_dict().items() if "sp1_temp" not in k}
    ref.load_state_dict(state)
    assert not torch.allclose(ref(idx)[0], logits, atol=1e-4)


def test_unregistered_normalizer_rejected_by_config():
    with pytest.raises(ValueError, match="normalizer"):
        GPT(tiny(normalizer="no_such_normalizer"))


def test_alibi_reaches_normalizer_as_slopes_and_kerple_as_bias():
    """ALiBi goes in as slopes (no N x N tensor); Kerple as a (1, H, T, T) bias; RoPE as neither."""
    seen = []

    def recorder(q, k, v, **kw):
        seen.append((kw["bias"], kw["alibi_slopes"], kw["is_causal"], kw["attn_mask"]))
        return get_normalizer("sa_softmax").fn(q, k, v, **kw)

    register_normalizer("test_recorder", recorder, "records its inputs")
    try:
        idx = tokens(1, 6)
        for positional in ("alibi", "kerple_log", "rope"):
            seen.clear()
            GPT(tiny(normalizer="test_recorder", positional=positional))(idx)
            assert len(seen) == 2
            bias, slopes, is_causal, mask = seen[0]
            assert is_causal is True and mask is None
            if positional == "alibi":
                assert bias is None and slopes.shape == (4,)
            elif positional == "kerple_log":
                assert slopes is None and bias.shape == (1, 4, 6, 6) and bias.requires_grad
            else:
                assert bias is None and slopes is None
    finally:
        unregister_normalizer("test_recorder")


@pytest.mark.parametrize("normalizer,positional", [("softmax", "fire"), ("sa_softmax", "alibi"),
                                                   ("sa_softmax_plain", "kerple_power")])
def test_bf16_autocast(normalizer, positional):
    torch.manual_seed(10)
    model = GPT(tiny(normalizer=normalizer, positional=positional, n_kv_head=2))
    idx = tokens(2, 12)
    _, loss32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss32.item(), abs=0.02)
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("normalizer", ["softmax", "sa_softmax"])
def test_a_few_steps_learn_a_repeating_sequence(normalizer):
    torch.manual_seed(11)
    model = GPT(tiny(normalizer=normalizer, positional="alibi"))
    opt = model.configure_optimizer(lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    seq = torch.arange(16) % 5  # period 5: predictable from the previous tokens
    idx, targets = seq[None, :-1].repeat(4, 1), seq[None, 1:].repeat(4, 1)
    first = None
    for _ in range(25):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_module_apply_reaches_every_positional_module():
    """``nn.Module.apply(fn)`` (weight init) recurses into children by calling their ``apply``; no positional
    module may shadow it (RoPE once did, with its rotation)."""
    from sasoftmax.positional import list_positionals

    for name in list_positionals():
        seen: list[str] = []
        model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8, positional=name))
        model.apply(lambda m, seen=seen: seen.append(type(m).__name__))
        assert len(seen) == len(list(model.modules())), name


def test_doc_ids_keep_packed_documents_apart():
    """With ``doc_ids`` no token attends across a document boundary: changing document A's tokens leaves document
    B's logits unchanged (and without ``doc_ids`` they change)."""
    from sasoftmax.lm.data import document_ids

    for normalizer in ("sa_softmax", "softmax"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16,
                              normalizer=normalizer)).eval()
        eot = 3
        a = torch.tensor([[5, 6, 7, eot, 8, 9, 10, 11, eot, 12, 13]])
        b = a.clone()
        b[0, :3] = torch.tensor([20, 21, 22])  # document 0 only
        ids = document_ids(a, eot)
        assert ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]]
        with torch.no_grad():
            la, _ = model(a, doc_ids=ids)
            lb, _ = model(b, doc_ids=document_ids(b, eot))
            plain_a, _ = model(a)
            plain_b, _ = model(b)
        torch.testing.assert_close(la[0, 4:], lb[0, 4:], atol=1e-6, rtol=0)
        assert not torch.allclose(la[0, :3], lb[0, :3])
        assert not torch.allclose(plain_a[0, 4:], plain_b[0, 4:], atol=1e-4), normalizer
        with pytest.raises(ValueError, match="doc_ids"):
            model(a, doc_ids=ids[:, :5])


@pytest.mark.parametrize("qk_norm_type", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("normalizer", [*NORMALIZERS, "softpick", "ssmax"])
def test_qk_norm_for_every_normalizer(normalizer, qk_norm_type):
    """q and k are normalized per head: scaling the q and k projections changes nothing (it does without
    qk_norm), every norm gain gets a gradient, and decoding through the KV cache equals the full forward."""
    torch.manual_seed(0)
    model = GPT(tiny(normalizer=normalizer, qk_norm=True, qk_norm_type=qk_norm_type, positional="rope")).eval()
    with torch.no_grad():  # q and k of unit scale, so that the norms' eps (1e-5 for LayerNorm) is negligible
        for block in model.layers():
            block.attn.c_attn.weight[: 2 * 32].mul_(30.0)
    idx = tokens(2, 12)
    ref = model(idx)[0]
    plain = GPT(tiny(normalizer=normalizer, positional="rope")).eval()
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing.unexpected_keys and all("_norm" in k for k in missing.unexpected_keys)
    plain_ref = plain(idx)[0]
    with torch.no_grad():
        for m in (model, plain):
            for block in m.layers():
                block.attn.c_attn.weight[: 2 * 32].mul_(3.0)  # the q rows and the k rows (n_kv_head = n_head)
    torch.testing.assert_close(model(idx)[0], ref, rtol=1e-4, atol=1e-4)
    assert (plain(idx)[0] - plain_ref).abs().max() > 1e-2
    model.train()
    loss = model(idx, targets=idx)[1]
    loss.backward()
    gains = [p for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n]
    assert gains and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gains)
    model.eval()
    with torch.no_grad():
        full = model(idx)[0]
        from sasoftmax.lm.model import KVCache

        cache = KVCache()
        first = model(idx[:, :7], cache=cache)[0]
        rest = model(idx[:, 7:], cache=cache)[0]
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)
