"""Serve SA-Softmax models with vLLM (0.32; optional dependency, the ``serve`` extra).

:func:`register` is a vLLM general plugin (entry point ``vllm.general_plugins``): vLLM calls it in every process it
starts. On CPU it overrides the ``CPU_ATTN`` backend with :class:`SACPUAttentionBackend`, a subclass of vLLM's own
CPU backend: for a model whose ``config.json`` carries a ``sasoftmax`` block (see :func:`sa_options`) attention is
SA-Softmax over vLLM's paged KV cache; for every other model the subclass is vLLM's backend, unchanged. On CUDA it
registers ``CUSTOM`` (:mod:`.gpu`, a subclass of vLLM's Triton backend with the same SA path), which SA models select
with ``--attention-backend CUSTOM`` (``sasoftmax serve`` adds it; vLLM's defaults would serve softmax).

The block, written by ``sasoftmax export --format gpt-neox`` and by ``sasoftmax mark-sa DIR``::

    "sasoftmax": {"normalizer": "sa_softmax", "eps": 1e-10, "detach_range": false}

``normalizer`` is ``sa_softmax`` (the paper's normalized form) or ``sa_softmax_plain`` (``x * softmax(x)``);
``detach_range`` changes only gradients, so it is accepted and ignored here (serving computes no gradient).

Attention for SA models: the new keys and values are written into the paged cache in a plain layout (block, kv head,
slot, dim) — the SA path never uses vLLM's ISA-specific cache kernels. Requests that decode one token are attended
together by :func:`sasoftmax.attention.sa_paged_decode` (on CPU the fused kernel, reading the pages in place); a
prefill (or a chunk of one) reads its request's keys and values from its blocks and is attended with
:func:`sasoftmax.sa_attention` (causal, bottom-right aligned); both with the layer's sliding window, soft-cap and
ALiBi slopes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...functional import DEFAULT_EPS
from ...utils import write_json_atomic

__all__ = ["register", "sa_options", "mark_sa", "is_sa_model", "CONFIG_KEY", "NORMALIZERS"]

CONFIG_KEY = "sasoftmax"
NORMALIZERS = {"sa_softmax": True, "sa_softmax_plain": False}  # name -> normalize


def sa_options(block: Any) -> dict[str, Any] | None:
    """The ``sa_attention`` options a model's ``sasoftmax`` config block asks for; None when there is no block.

    ``ValueError`` naming the field for a block this backend cannot serve (an unknown normalizer, a bad eps, an
    unknown key), so that a model fails at load time instead of producing wrong tokens."""
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ValueError(f"config.json `{CONFIG_KEY}` must be an object, got {type(block).__name__}")
    unknown = sorted(set(block) - {"normalizer", "eps", "detach_range", "version"})
    if unknown:
        raise ValueError(f"config.json `{CONFIG_KEY}` has fields this sasoftmax cannot serve: {unknown}")
    name = block.get("normalizer", "sa_softmax")
    if name not in NORMALIZERS:
        raise ValueError(f"config.json `{CONFIG_KEY}.normalizer`={name!r}: the vLLM backend serves "
                         f"{sorted(NORMALIZERS)}")
    eps = block.get("eps", DEFAULT_EPS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"config.json `{CONFIG_KEY}.eps` must be a finite number >= 0, got {eps!r}")
    return {"normalize": NORMALIZERS[name], "eps": float(eps)}


def mark_sa(directory: str | os.PathLike, normalizer: str = "sa_softmax", eps: float = DEFAULT_EPS) -> Path:
    """Write the ``sasoftmax`` block into ``directory/config.json`` (a transformers checkpoint directory), so that
    vLLM with this plugin serves it with SA-Softmax attention. Returns the config path; atomic (temp file + rename).
    ``ValueError`` for an unknown normalizer or a directory without ``config.json``."""
    block = {"normalizer": normalizer, "eps": eps}
    sa_options(block)  # validates
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"`directory`={str(directory)!r} has no config.json (expected a transformers checkpoint "
                         "directory)")
    config = json.loads(path.read_text())
    config[CONFIG_KEY] = block
    return write_json_atomic(path, config)


def _hf_block(vllm_config: Any) -> Any:
    hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    block = getattr(hf, CONFIG_KEY, None)
    if block is None and hf is not None and hasattr(hf, "to_dict"):
        block = hf.to_dict().get(CONFIG_KEY)
    return block


def register() -> None:
    """The vLLM plugin (idempotent; vLLM may call it more than once): on CPU make ``CPU_ATTN`` the SA-aware subclass;
    on CUDA register ``CUSTOM``, the SA-aware subclass of ``TRITON_ATTN`` (:mod:`.gpu`), which an SA model must
    select (``--attention-backend CUSTOM``; ``sasoftmax serve`` adds it)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.cpu.SACPUAttentionBackend")
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.gpu.SAGPUAttentionBackend")


def is_sa_model(directory: str | os.PathLike) -> bool:
    """Whether ``directory/config.json`` carries a ``sasoftmax`` block (False when there is no readable config)."""
    try:
        return CONFIG_KEY in json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
