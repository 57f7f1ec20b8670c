"""The SA-aware ``CPU_ATTN`` backend (imported by vLLM from the path :func:`sasoftmax.integrations.vllm.register`
registers). Shapes follow vLLM's CPU backend: queries ``(num_tokens, Hq, D)``, keys/values ``(num_tokens, Hkv, D)``,
the layer's cache ``(num_blocks, Hkv, block_size, 2 * D)``. For SA models this module owns the cache layout: each
slot holds ``[key | value]`` (keys in ``[..., :D]``, values in ``[..., D:]``), so the history of a request is one
``index_select`` of whole rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ...attention import sa_attention
from . import _hf_block, sa_options

__all__ = ["SACPUAttentionBackend", "SACPUAttentionImpl"]


class SACPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, or SA-Softmax attention when the model's config asks for it (``self.sa``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sa = sa_options(_hf_block(get_current_vllm_config()))
        if self.sa is None:
            return
        missing = []
        if self.attn_type != AttentionType.DECODER:
            missing.append(f"attention type {self.attn_type!r} (decoder self-attention only)")
        if self.sinks is not None:
            missing.append("attention sinks")
        if self.is_fp8_kv_cache:
            missing.append(f"a quantized KV cache (kv_cache_dtype={self.kv_cache_dtype!r})")
        if missing:
            raise ValueError("sasoftmax vLLM backend: this SA model needs " + ", ".join(missing)
                             + ", which the SA backend does not support")
        # vLLM's sliding window counts the query itself: window N = the query and the N - 1 keys before it.
        self.window = None if self.sliding_window < 0 else (self.sliding_window - 1, 0)
        self.softcap = float(self.logits_soft_cap) if self.logits_soft_cap else None

    def do_kv_cache_update(self, layer: torch.nn.Module, key: Tensor, value: Tensor, kv_cache: Tensor,
                           slot_mapping: Tensor) -> None:
        if self.sa is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        block_size = kv_cache.shape[2]
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        keep = slots >= 0  # padded tokens carry slot -1
        slots = slots[keep]
        rows = torch.cat([key[:n][keep], value[:n][keep]], dim=-1).to(kv_cache.dtype)  # (n, Hkv, 2D)
        kv_cache[slots // block_size, :, slots % block_size] = rows

    def forward(self, layer: Any, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                attn_metadata: Any, output: Tensor, output_scale: Tensor | None = None,
                output_block_scale: Tensor | None = None) -> Tensor:
        if self.sa is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sasoftmax vLLM backend: fused output quantization is not supported")
        if attn_metadata is None:  # warm-up
            return output
        if attn_metadata.dynamic_causal is not None:
            raise NotImplementedError("sasoftmax vLLM backend: per-request causality is not supported")
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        out = output.view(output.shape[0], self.num_heads, -1)
        # Window and ALiBi distances count from each request's own last position, so only plain decodes batch.
        together = self.window is None and self.alibi_slopes is None
        decodes = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1] if together else []
        with torch.inference_mode():
            if len(decodes) > 1:
                self._decode_together(decodes, starts, query, kv_cache, attn_metadata, out)
            done = set(decodes) if len(decodes) > 1 else set()
            for i, seq_len in enumerate(seq_lens):
                q0, q1 = starts[i], starts[i + 1]
                if q1 == q0 or i in done:
                    continue
                k, v = self._history(kv_cache, attn_metadata.block_table[i : i + 1], seq_len)
                res = self._attend(query[q0:q1].transpose(0, 1)[None], k, v, None, bool(attn_metadata.causal))
                out[q0:q1] = res[0].transpose(0, 1).to(out.dtype)
        return output

    def _history(self, kv_cache: Tensor, block_table: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values ``(R, Hkv, length, D)`` of the ``R`` requests whose block-table rows are given."""
        num_blocks, heads, block_size, two_d = kv_cache.shape
        n_blocks = -(-length // block_size)
        blocks = block_table[:, :n_blocks].long()
        if n_blocks == 1:  # read only the filled slots
            kv = kv_cache[:, :, :length].index_select(0, blocks.flatten())
        else:
            kv = kv_cache.index_select(0, blocks.flatten()).view(-1, n_blocks, heads, block_size, two_d)
            kv = kv.transpose(1, 2).flatten(2, 3)[:, :, :length]
        return kv[..., : two_d // 2], kv[..., two_d // 2 :]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        assert self.sa is not None
        return sa_attention(q, k.to(q.dtype), v.to(q.dtype), mask, is_causal=causal, scale=self.scale,
                            window=self.window, softcap=self.softcap, alibi_slopes=self.alibi_slopes, **self.sa)

    def _decode_together(self, rows: list[int], starts: list[int], query: Tensor, kv_cache: Tensor,
                         attn_metadata: Any, out: Tensor) -> None:
        """One call for every request that decodes one token this step: histories padded to the longest, the
        padding masked out (a one-token query at the end of its history sees all of it)."""
        idx = torch.tensor(rows)
        lens = attn_metadata.seq_lens[idx].long()
        longest = int(lens.max())
        k, v = self._history(kv_cache, attn_metadata.block_table[idx], longest)
        tokens = torch.tensor([starts[i] for i in rows])
        q = query[tokens][:, :, None]  # (R, Hq, 1, D)
        visible = torch.arange(longest)[None, :] < lens[:, None]  # (R, longest)
        res = self._attend(q, k, v, visible[:, None, None, :], False)  # (R, Hq, 1, Dv)
        out[tokens] = res[:, :, 0].to(out.dtype)


class SACPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend with :class:`SACPUAttentionImpl` as its implementation (same name, metadata, cache)."""

    @staticmethod
    def get_impl_cls() -> type[SACPUAttentionImpl]:
        return SACPUAttentionImpl
