"""Padding-free batches through the SA attention functions of transformers: packed documents (``cu_seq_lens_q/k``
kwargs, or restarting ``position_ids``) give each document's own logits, sliding windows apply in document positions,
and a padding-free batch from ``DataCollatorWithFlattening`` has the loss of the padded batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, LlamaConfig, MistralConfig, Qwen2Config

import sasoftmax.integrations.hf as sa_hf

VOCAB = 100


def _model(cls, attn: str = "sa_softmax", **extra):
    sa_hf.register()
    cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
              bos_token_id=1, eos_token_id=None, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float64).eval()


def _docs(lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]


def _packed_kwargs(docs: list[torch.Tensor], with_cu: bool) -> dict:
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    kw = dict(input_ids=ids, position_ids=pos)
    if with_cu:
        cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
        m = max(len(d) for d in docs)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
    return kw


@pytest.mark.parametrize("attn", ["sa_softmax", "sa_softmax_plain"])
@pytest.mark.parametrize("with_cu", [True, False], ids=["cu_seq_lens", "position_ids"])
@pytest.mark.parametrize("cls", [LlamaConfig, Qwen2Config], ids=["llama", "qwen2"])
def test_packed_equals_separate_documents(cls, with_cu, attn):
    model = _model(cls, attn)
    docs = _docs([7, 5, 3])
    with torch.no_grad():
        packed = model(**_packed_kwargs(docs, with_cu)).logits[0]
        alone = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-8)


def test_sliding_window_in_document_positions():
    """Mistral with a window shorter than the documents: the packed row (window applied here, no mask) equals each
    document alone (window in transformers' dense mask)."""
    model = _model(MistralConfig, sliding_window=3)
    docs = _docs([9, 6])
    with torch.no_grad():
        packed = model(**_packed_kwargs(docs, True)).logits[0]
        alone = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
        no_window = _model(MistralConfig, sliding_window=None)(input_ids=docs[0][None]).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-8)
    assert not torch.allclose(alone[:9], no_window, atol=1e-4)  # the window does bite


def test_data_collator_with_flattening_loss_equals_padded_batch():
    model = _model(LlamaConfig)
    model.train()  # (attention dropout is 0: train mode only checks that training takes the padding-free path)
    docs = _docs([7, 5, 4])
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(
        [{"input_ids": d.tolist()} for d in docs])
    loss_flat = model(**flat).loss
    longest = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), longest, dtype=torch.long)
    mask = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, :len(d)], mask[i, :len(d)] = d, 1
    labels = ids.masked_fill(mask == 0, -100)
    loss_padded = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    # the flattened labels drop each document's first token (-100) exactly as the shifted padded labels do
    torch.testing.assert_close(loss_flat, loss_padded, atol=1e-10, rtol=1e-8)
    loss_flat.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_padding_free_with_a_mask_or_a_batch_is_refused():
    attn = torch.nn.Module()
    q = torch.randn(2, 4, 6, 8)
    k = v = torch.randn(2, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch of one"):
        sa_hf.sa_softmax_attention_forward(attn, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    padded = causal.clone()
    padded[..., 0] = False  # hides a key: padding, which a packed row cannot have
    with pytest.raises(ValueError, match="hides more than causality"):
        sa_hf.sa_softmax_attention_forward(attn, q[:1], k[:1], v[:1], padded, scaling=0.3, cu_seq_lens_q=cu,
                                           cu_seq_lens_k=cu)
    # the row's causal mask (as transformers builds it for a packed row) says nothing the documents do not
    with_mask, _ = sa_hf.sa_softmax_attention_forward(attn, q[:1], k[:1], v[:1], causal, scaling=0.3,
                                                      cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    without, _ = sa_hf.sa_softmax_attention_forward(attn, q[:1], k[:1], v[:1], None, scaling=0.3, cu_seq_lens_q=cu,
                                                    cu_seq_lens_k=cu)
    torch.testing.assert_close(with_mask, without, atol=0, rtol=0)
    with pytest.raises(ValueError, match="both"):
        sa_hf.sa_softmax_attention_forward(attn, q[:1], k[:1], v[:1], None, scaling=0.3, cu_seq_lens_q=cu)
