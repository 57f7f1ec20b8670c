"""The SA implementations of both vLLM backends called directly, on CPU, with hand-made paged caches and metadata:
each request's output must equal ``sa_attention`` over its own keys and values. This is how the CUDA backend
(``CUSTOM``, a subclass of vLLM's Triton backend) is tested here without a GPU: its SA path is plain torch code
around ``sa_attention``; on a GPU, the fused kernel underneath is tested by tests/gpu."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import vllm.v1.attention.backends.cpu_attn as vllm_cpu_attn

import sasoftmax.integrations.vllm.cpu as cpu
import sasoftmax.integrations.vllm.gpu as gpu
from sasoftmax import sa_attention

HQ, HKV, D, BLOCK = 4, 2, 32, 16


def _config(block: dict | None) -> SimpleNamespace:
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(sasoftmax=block),
                                                        dtype=torch.float32))


def _impl(module, monkeypatch, block, **kw):
    for where in (module, vllm_cpu_attn):  # the model's config.json, as vLLM hands it to the backends
        monkeypatch.setattr(where, "get_current_vllm_config", lambda: _config(block))
    cls = module.SACPUAttentionImpl if module is cpu else module.SAGPUAttentionImpl
    return cls(num_heads=HQ, head_size=D, scale=D ** -0.5, num_kv_heads=HKV, alibi_slopes=kw.get("alibi"),
               sliding_window=kw.get("window"), kv_cache_dtype="auto", logits_soft_cap=kw.get("softcap"))


def _step(impl, history: list[int], new: list[int], seed: int = 0):
    """One engine step: request i has history[i] cached tokens and new[i] new ones. Returns the output and what
    each request's attention must be (causal, bottom-right aligned, over all its tokens)."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-(h + n) // BLOCK) for h, n in zip(history, new, strict=True)) + 3
    cache = torch.zeros(n_blocks, HKV, BLOCK, 2 * D)
    perm = torch.randperm(n_blocks, generator=g).tolist()  # blocks scattered over the cache
    table, lens, keys, values, queries, slots = [], [], [], [], [], []
    width = max(-(-(h + n) // BLOCK) for h, n in zip(history, new, strict=True))
    for h, n in zip(history, new, strict=True):
        total = h + n
        mine = [perm.pop() for _ in range(-(-total // BLOCK))]
        table.append(mine + [0] * (width - len(mine)))
        lens.append(total)
        k, v = torch.randn(total, HKV, D, generator=g), torch.randn(total, HKV, D, generator=g)
        keys.append(k), values.append(v), queries.append(torch.randn(n, HQ, D, generator=g))
        all_slots = [mine[t // BLOCK] * BLOCK + t % BLOCK for t in range(total)]
        impl._sa_cache_update(k[:h], v[:h], cache, torch.tensor(all_slots[:h], dtype=torch.long))  # the history
        slots += all_slots[h:]
    new_k = torch.cat([k[h:] for k, h in zip(keys, history, strict=True)])
    new_v = torch.cat([v[h:] for v, h in zip(values, history, strict=True)])
    pad = torch.full((2, HKV, D), 1e4)  # two padding tokens (slot -1): must not reach the cache
    impl.do_kv_cache_update(None, torch.cat([new_k, pad]), torch.cat([new_v, pad]), cache,
                            torch.tensor(slots + [-1, -1]))
    q = torch.cat(queries)
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    meta = SimpleNamespace(query_start_loc=starts, seq_lens=torch.tensor(lens), block_table=torch.tensor(table),
                           causal=True, dynamic_causal=None, slot_mapping=None)
    out = torch.full((q.shape[0], HQ * D), float("nan"))
    impl.forward(None, q, new_k, new_v, cache, meta, out)
    want = []
    for qi, k, v in zip(queries, keys, values, strict=True):
        want.append(sa_attention(qi.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                 is_causal=True, scale=D ** -0.5, window=impl.window, softcap=impl.softcap,
                                 alibi_slopes=impl.alibi_slopes, **impl.sa, backend="reference")[0]
                    .transpose(0, 1).reshape(-1, HQ * D))
    return out, torch.cat(want)


@pytest.mark.parametrize("module", [cpu, gpu], ids=["cpu", "cuda-custom"])
@pytest.mark.parametrize("features", [{}, {"window": 7}, {"softcap": 3.0}, {"alibi": [0.5, 0.25, 0.125, 0.0625]}])
@pytest.mark.parametrize("normalizer", ["sa_softmax", "sa_softmax_plain"])
def test_paged_sa_attention_equals_each_request_alone(monkeypatch, module, features, normalizer):
    impl = _impl(module, monkeypatch, {"normalizer": normalizer}, **features)
    # a prefill, a chunked prefill over two blocks of history, three decodes (batched together when they can be)
    out, want = _step(impl, history=[0, 20, 5, 33, 15], new=[9, 6, 1, 1, 1])
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("module", [cpu, gpu], ids=["cpu", "cuda-custom"])
def test_a_model_without_the_block_keeps_vllm_s_implementation(monkeypatch, module):
    impl = _impl(module, monkeypatch, None)
    assert impl.sa is None


def test_sa_models_the_cuda_backend_cannot_serve_are_refused(monkeypatch):
    monkeypatch.setattr(gpu, "get_current_vllm_config", lambda: _config({"normalizer": "sa_softmax"}))
    with pytest.raises(ValueError, match="quantized KV cache"):
        gpu.SAGPUAttentionImpl(num_heads=HQ, head_size=D, scale=1.0, num_kv_heads=HKV, alibi_slopes=None,
                               sliding_window=None, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="attention sinks"):
        gpu.SAGPUAttentionImpl(num_heads=HQ, head_size=D, scale=1.0, num_kv_heads=HKV, alibi_slopes=None,
                               sliding_window=None, kv_cache_dtype="auto", sinks=torch.zeros(HQ))
    backend = gpu.SAGPUAttentionBackend
    assert backend.get_name() == "CUSTOM" and backend.get_impl_cls() is gpu.SAGPUAttentionImpl
    assert backend.get_builder_cls()._cudagraph_support.name == "NEVER"
