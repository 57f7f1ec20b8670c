"""sasoftmax.integrations.torchtitan: SA-Softmax as torchtitan's inner attention, on its debug Llama (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchtitan.models.common.attention import (
    FlexAttention,
    ScaledDotProductAttention,
    VarlenAttention,
    VarlenMetadata,
)
from torchtitan.models.llama3 import model_registry

from sasoftmax import sdpa_override
from sasoftmax.integrations.torchtitan import SAConverter, SAVarlenAttention

VOCAB = 2048


def _inner_configs(cfg, cls):
    return [c for _, c, _, _ in cfg.traverse(cls)]


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    model = cfg.build()
    model.init_states()
    return model


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=g)
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(12)]),
                             torch.cat([torch.arange(7), torch.arange(25)])])
    return tokens[:, :-1], tokens[:, 1:], positions


@pytest.fixture(scope="module")
def sa_model():
    spec = model_registry("debugmodel", attn_backend="varlen", converters=[SAConverter.Config()])
    return spec.model, _build(spec.model)


def test_converter_replaces_every_inner_attention():
    for backend in ("varlen", "flex"):
        cfg = model_registry("debugmodel", attn_backend=backend, converters=[SAConverter.Config(normalize=False)]).model
        inner = _inner_configs(cfg, (VarlenAttention.Config, FlexAttention.Config))
        assert len(inner) == len(cfg.layers) == 6
        assert all(isinstance(c, SAVarlenAttention.Config) and c.normalize is False and tuple(c.window_size) == (-1, 0)
                   for c in inner)


def test_packed_documents_equal_separate_documents(sa_model):
    cfg, model = sa_model
    x, _, positions = _packed()
    masks = model.get_attention_masks(positions)
    assert isinstance(masks, VarlenMetadata)
    packed = model(x, positions=positions, attention_masks=masks)
    first = model(x[:1, :20], positions=positions[:1, :20])
    second = model(x[:1, 20:], positions=positions[:1, 20:])
    torch.testing.assert_close(packed[:1, :20], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:1, 20:], second, rtol=1e-5, atol=1e-5)
    # without the metadata the second document would see the first: a different result
    whole = model(x, positions=positions)
    assert (whole[:1, 20:] - second).abs().max() > 1e-3


def test_equals_the_sdpa_inner_attention_under_the_override(sa_model):
    cfg, model = sa_model
    sdpa_cfg = model_registry("debugmodel", attn_backend="varlen").model
    for _, _, parent, attr in sdpa_cfg.traverse(VarlenAttention.Config):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    ref = _build(sdpa_cfg)
    ref.load_state_dict(model.state_dict())
    x, y, _ = _packed(1)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    with sdpa_override():
        ref_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    softmax_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert abs(float(loss) - float(softmax_loss)) > 1e-4


def test_training_steps_on_packed_documents():
    spec = model_registry("debugmodel", attn_backend="varlen", converters=[SAConverter.Config()])
    model = _build(spec.model, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y, positions = _packed(2)
    losses = []
    for _ in range(4):
        logits = model(x, positions=positions, attention_masks=model.get_attention_masks(positions))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_errors():
    cfg = model_registry("debugmodel", attn_backend="flex").model
    for c in _inner_configs(cfg, FlexAttention.Config):
        c.kernel_options = {"BACKEND": "FLASH"}
    with pytest.raises(ValueError, match="kernel_options"):
        SAConverter.Config().build().convert(cfg)
    with pytest.raises(ValueError, match="backend"):
        SAVarlenAttention.Config(backend="nope").build()
    attn = SAVarlenAttention.Config().build()
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="out_transform"):
        attn(q, q, q, out_transform=lambda o, lse: o)
    with pytest.raises(TypeError, match="attention_masks"):
        attn(q, q, q, attention_masks={"a": None})
