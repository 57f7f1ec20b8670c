"""The ``CUSTOM`` attention backend for CUDA (imported by vLLM from the path
:func:`sasoftmax.integrations.vllm.register` registers; selected with ``--attention-backend CUSTOM``, which
``sasoftmax serve`` adds for SA models on CUDA).

A subclass of vLLM's ``TRITON_ATTN`` backend: for a model without the ``sasoftmax`` block it is that backend; for an
SA model the cache layout and attention are :mod:`.paged`'s, with :func:`sasoftmax.sa_attention` on the GPU (the
fused Triton kernel where it can run the call, else the chunked path). SA attention syncs with the host for the
request boundaries, so the backend declares no CUDA-graph support (vLLM then runs attention outside its graphs).
"""

from __future__ import annotations

from typing import Any, ClassVar

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from .paged import SAPagedAttention

__all__ = ["SAGPUAttentionBackend", "SAGPUAttentionImpl", "SAGPUMetadataBuilder"]


class SAGPUAttentionImpl(SAPagedAttention, TritonAttentionImpl):
    """vLLM's Triton attention, or SA-Softmax attention when the model's config asks for it (``self.sa``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        refused = ["attention sinks"] if self.sinks is not None else []
        if self.kv_cache_dtype != "auto" and not self.kv_cache_dtype.startswith(("float", "bfloat")):
            refused.append(f"a quantized KV cache (kv_cache_dtype={self.kv_cache_dtype!r})")
        if self.use_alibi_sqrt:
            refused.append("square-root ALiBi")
        left = self.sliding_window[0]
        self._sa_setup(get_current_vllm_config(), is_decoder=self.attn_type == AttentionType.DECODER,
                       window=None if left < 0 else left + 1, softcap=self.logits_soft_cap, refused=refused)

    def fused_rope_kvcache_supported(self) -> bool:
        return False if self.sa is not None else super().fused_rope_kvcache_supported()


class SAGPUMetadataBuilder(TritonAttentionMetadataBuilder):
    """Triton's metadata, without CUDA-graph capture of attention (the SA path reads request boundaries on the
    host)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class SAGPUAttentionBackend(TritonAttentionBackend):
    """``CUSTOM``: vLLM's Triton backend with :class:`SAGPUAttentionImpl` (same cache shape)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SAGPUAttentionImpl]:
        return SAGPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SAGPUMetadataBuilder]:
        return SAGPUMetadataBuilder
