"""``sa_attention_varlen``: packed documents in FlashAttention's varlen layout.

Documents are concatenated along the token dim (``q`` is ``(total_q, Hq, D)``) and delimited by cumulative lengths
``cu_seqlens`` (int32 ``(n_docs + 1,)``, starting at 0), so no attention crosses a document boundary and no
``(total, total)`` mask exists. Each document is one call of the chosen backend on ``(1, Hq, n_d, D)`` views: the
result is by construction that of :func:`sasoftmax.sa_attention` on the document alone, and the work and memory are
those of the separate calls (the row min/max of SA are taken over the document's own keys).

Dropout: one seed is drawn per call; document ``d`` uses :func:`doc_seed` of it, so its mask is that of a separate
call with that seed (documents do not share dropout decisions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import DEFAULT_EPS
from .api import check_backend_name, select
from .dropout import seed_tensor
from .inputs import autocast_inputs, prepare, run_without_autocast

__all__ = ["sa_attention_varlen", "check_cu_seqlens", "doc_seed"]

_SEED_MOD = 2**62
_GOLDEN = 0x9E3779B97F4A7C15  # Weyl increment: consecutive documents get well separated seeds


def doc_seed(seed: Tensor, doc: int) -> Tensor:
    """The dropout seed of document ``doc`` from the call's seed (an int64 ``(1,)`` tensor in ``[0, 2**62)``)."""
    return (seed + (doc * _GOLDEN) % _SEED_MOD) % _SEED_MOD


def check_cu_seqlens(cu: object, name: str, total: int, max_seqlen: object, max_name: str) -> list[int]:
    """The offsets of ``cu`` as Python ints, after checking the varlen conventions (``ValueError``/``TypeError``
    naming ``name`` or ``max_name``)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"`{name}` must be an int32 tensor of shape (n_docs + 1,), got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"`{name}` must be an int32 tensor of shape (n_docs + 1,), got {cu.dtype} "
                         f"{tuple(cu.shape)}")
    offsets = [int(x) for x in cu.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"`{name}` must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise ValueError(f"`{name}` must be non-decreasing (cumulative document lengths), got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"`{name}` ends at {offsets[-1]} but the packed tensor has {total} tokens")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"`{max_name}` must be an int, got {type(max_seqlen).__name__}")
    longest = max((b - a for a, b in zip(offsets, offsets[1:], strict=False)), default=0)
    if max_seqlen < longest:
        raise ValueError(f"`{max_name}`={max_seqlen} is less than the longest document ({longest} tokens)")
    return offsets


def _check_packed(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"`{name}` must be 3-d (total_tokens, heads, head_dim) in the varlen layout, got shape "
                             f"{tuple(t.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"`k` and `v` must have the same number of tokens, got {k.shape[0]} and {v.shape[0]}")


def sa_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    normalize: bool = True,
    detach_range: bool = False,
    dropout_p: float = 0.0,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """SA-Softmax attention over packed documents (FlashAttention's ``flash_attn_varlen_func`` layout).

    Args:
        q: ``(total_q, Hq, D)``. k: ``(total_k, Hkv, D)``. v: ``(total_k, Hkv, Dv)``; ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(n_docs + 1,)``, cumulative lengths starting at 0 and ending at
            ``total_q`` / ``total_k``: document ``d`` is tokens ``[cu[d], cu[d+1])``. Documents may be empty.
        max_seqlen_q, max_seqlen_k: at least the longest document (checked; as in FlashAttention).
        is_causal: causal within each document, aligned bottom-right (query ``i`` of a document with ``nq`` queries
            and ``nk`` keys sits at key position ``nk - nq + i``).
        window, softcap, scale, normalize, detach_range, eps, backend: as in :func:`sasoftmax.sa_attention`, per
            document (window positions are the document's own).
        alibi_slopes: ``(Hq,)`` or ``(n_docs, Hq)``; distances restart in each document.
        dropout_p, generator: dropout on the weights; one seed per call, document ``d`` uses :func:`doc_seed`.

    Returns:
        ``(total_q, Hq, Dv)`` in the input dtype; query rows of a document with no key are 0.

    The offsets are read on the host (one synchronization for CUDA tensors; a graph break under ``torch.compile``).
    """
    _check_packed(q, k, v)
    cq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    ck = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    if len(cq) != len(ck):
        raise ValueError(f"`cu_seqlens_q` describes {len(cq) - 1} documents but `cu_seqlens_k` {len(ck) - 1}")
    n_docs = len(cq) - 1
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.dim() not in (1, 2):
            raise ValueError("`alibi_slopes` must be a tensor of shape (Hq,) or (n_docs, Hq)")
        if alibi_slopes.dim() == 2 and alibi_slopes.shape[0] != n_docs:
            raise ValueError(f"`alibi_slopes` of shape {tuple(alibi_slopes.shape)} has {alibi_slopes.shape[0]} "
                             f"rows; expected (Hq,) or (n_docs={n_docs}, Hq)")
    check_backend_name(backend)
    q, k, v, ac_dev = autocast_inputs(q, k, v)
    seed = seed_tensor(generator) if dropout_p > 0 else None
    outs = []
    for d in range(n_docs):
        q0, q1, k0, k1 = cq[d], cq[d + 1], ck[d], ck[d + 1]
        if q1 == q0:
            continue
        slopes = None if alibi_slopes is None else (alibi_slopes[d] if alibi_slopes.dim() == 2 else alibi_slopes)
        inp = prepare(
            q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None],
            is_causal=is_causal, scale=scale, alibi_slopes=slopes, normalize=normalize, detach_range=detach_range,
            dropout_p=dropout_p, eps=eps, generator=generator, window=window, softcap=softcap,
        )
        if seed is not None:
            inp.seed = doc_seed(seed, d)
        out = run_without_autocast(select(inp, backend).run, ac_dev, inp)  # (1, Hq, n_d, Dv)
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]) + 0.0 * (q.sum() + k.sum() + v.sum())
    return torch.cat(outs, dim=0)
