"""SA-Softmax attention over vLLM's paged KV cache, shared by the CPU and the GPU backend.

Both vLLM backends this package extends (``CPU_ATTN`` and ``TRITON_ATTN``, vLLM 0.32) give each layer a cache of shape
``(num_blocks, Hkv, block_size, 2 * D)``; for SA models this module owns what a slot holds: ``[key | value]`` (keys in
``[..., :D]``, values in ``[..., D:]``), so the history of a request is one ``index_select`` of whole rows. Queries
are packed ``(num_tokens, Hq, D)``; request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` and has
``seq_lens[i]`` tokens in the cache (its new ones included), in the blocks of ``block_table[i]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...attention import sa_attention
from ...attention.paged import paged_history, paged_store, sa_paged_decode
from . import _hf_block, sa_options

__all__ = ["SAPagedAttention"]


class SAPagedAttention:
    """Mixin placed before a vLLM attention implementation: ``self.sa`` holds the ``sa_attention`` options of an SA
    model, None for any other model, whose calls go to vLLM's implementation unchanged."""

    sa: dict[str, Any] | None
    window: tuple[int, int] | None
    softcap: float | None
    num_heads: int
    scale: float
    alibi_slopes: Tensor | None

    def _sa_setup(self, vllm_config: Any, *, is_decoder: bool, window: int | None, softcap: float | None,
                  refused: list[str]) -> None:
        """Read the model's ``sasoftmax`` block; ``window``: vLLM's sliding window in tokens (it counts the query
        itself, so N = the query and the N - 1 keys before it) or None. ``ValueError`` for an SA model that needs
        what the backend lacks (``refused``: what the caller found, e.g. attention sinks)."""
        self.sa = sa_options(_hf_block(vllm_config))
        if self.sa is None:
            return
        missing = list(refused)
        if not is_decoder:
            missing.insert(0, "non-decoder attention (decoder self-attention only)")
        if missing:
            raise ValueError("sasoftmax vLLM backend: this SA model needs " + ", ".join(missing)
                             + ", which the SA backend does not support")
        self.window = None if window is None or window < 1 else (window - 1, 0)
        self.softcap = float(softcap) if softcap else None

    # vLLM's entry points: the SA path for SA models, vLLM's own implementation (next in the MRO) otherwise.
    def do_kv_cache_update(self, layer: Any, key: Tensor, value: Tensor, kv_cache: Tensor,
                           slot_mapping: Tensor) -> None:
        if self.sa is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)  # type: ignore[misc]
        self._sa_cache_update(key, value, kv_cache, slot_mapping)

    def forward(self, layer: Any, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                attn_metadata: Any, output: Tensor, output_scale: Tensor | None = None,
                output_block_scale: Tensor | None = None) -> Tensor:
        if self.sa is None:
            return super().forward(layer, query, key, value, kv_cache,  # type: ignore[misc]
                                   attn_metadata, output, output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sasoftmax vLLM backend: fused output quantization is not supported")
        return self._sa_forward(query, kv_cache, attn_metadata, output)

    def _sa_cache_update(self, key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
        paged_store(key, value, kv_cache, slot_mapping)  # padded tokens carry slot -1 and are skipped

    def _sa_forward(self, query: Tensor, kv_cache: Tensor, attn_metadata: Any, output: Tensor) -> Tensor:
        if attn_metadata is None:  # warm-up
            return output
        if getattr(attn_metadata, "dynamic_causal", None) is not None:
            raise NotImplementedError("sasoftmax vLLM backend: per-request causality is not supported")
        causal = attn_metadata.causal
        if isinstance(causal, Tensor):
            if not bool(causal.all()):
                raise NotImplementedError("sasoftmax vLLM backend: per-request causality is not supported")
            causal = True
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        out = output.view(output.shape[0], self.num_heads, -1)
        decodes = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
        with torch.inference_mode():
            if decodes:
                self._decode(decodes, starts, query, kv_cache, attn_metadata, out)
            for i in sorted(set(range(len(seq_lens))) - set(decodes)):
                q0, q1 = starts[i], starts[i + 1]
                if q1 == q0:
                    continue
                k, v = paged_history(kv_cache, attn_metadata.block_table[i : i + 1], seq_lens[i])
                res = self._attend(query[q0:q1].transpose(0, 1)[None], k, v, bool(causal))
                out[q0:q1] = res[0].transpose(0, 1).to(out.dtype)
        return output

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        assert self.sa is not None
        slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(q.device)
        return sa_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=causal, scale=self.scale,
                            window=self.window, softcap=self.softcap, alibi_slopes=slopes, **self.sa)

    def _decode(self, rows: list[int], starts: list[int], query: Tensor, kv_cache: Tensor, attn_metadata: Any,
                out: Tensor) -> None:
        """Every request that decodes one token this step, in one call (its query is the last of its tokens, so it
        sees its whole history): on CPU the fused kernel reads the cache in place."""
        assert self.sa is not None
        device = query.device
        table, lens = attn_metadata.block_table, attn_metadata.seq_lens
        n = len(rows)
        if rows[-1] == n - 1 and starts[n] == n:  # the first n requests, one token each: no gather, no scatter
            q, table, lens = query[:n], table[:n], lens[:n]
        else:
            idx = torch.tensor(rows, device=table.device)
            tokens = torch.tensor([starts[i] for i in rows], device=device)
            q, table, lens = query[tokens], table[idx], lens.to(table.device)[idx]
        slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(device)
        res = sa_paged_decode(q, kv_cache, table.to(device), lens.to(device), scale=self.scale, window=self.window,
                              softcap=self.softcap, alibi_slopes=slopes, **self.sa)
        if rows[-1] == n - 1 and starts[n] == n:
            out[:n] = res.to(out.dtype)
        else:
            out[tokens] = res.to(out.dtype)
