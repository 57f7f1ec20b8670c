"""The SA-aware ``CPU_ATTN`` backend (imported by vLLM from the path :func:`sasoftmax.integrations.vllm.register`
registers). Shapes and the cache layout for SA models: :mod:`.paged`."""

from __future__ import annotations

from typing import Any

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .paged import SAPagedAttention

__all__ = ["SACPUAttentionBackend", "SACPUAttentionImpl"]


class SACPUAttentionImpl(SAPagedAttention, CPUAttentionBackendImpl):
    """vLLM's CPU attention, or SA-Softmax attention when the model's config asks for it (``self.sa``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        refused = ["attention sinks"] if self.sinks is not None else []
        if self.is_fp8_kv_cache:
            refused.append(f"a quantized KV cache (kv_cache_dtype={self.kv_cache_dtype!r})")
        self._sa_setup(get_current_vllm_config(), is_decoder=self.attn_type == AttentionType.DECODER,
                       window=None if self.sliding_window < 0 else self.sliding_window,
                       softcap=self.logits_soft_cap, refused=refused)


class SACPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend with :class:`SACPUAttentionImpl` as its implementation (same name, metadata, cache)."""

    @staticmethod
    def get_impl_cls() -> type[SACPUAttentionImpl]:
        return SACPUAttentionImpl
