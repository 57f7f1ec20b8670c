"""SA attention over a paged key/value cache, the layout serving engines keep (inference only, no gradient).

The cache is ``(num_blocks, Hkv, block_size, 2 * D)``: slot ``t`` of block ``b`` holds ``[key | value]`` of one token
for each key/value head (keys in ``[..., :D]``, values in ``[..., D:]``). Request ``r`` has ``seq_lens[r]`` tokens,
token ``t`` in block ``block_table[r, t // block_size]`` at slot ``t % block_size``.

:func:`paged_store` writes a step's new keys and values into their slots; :func:`paged_history` reads requests' keys
and values out of the cache (a copy); :func:`sa_paged_decode` attends
one new token per request over its whole history, on CPU in the fused kernel reading the cache in place (no copy of
the history per step), elsewhere (or without the kernel) through :func:`paged_history` and :func:`sa_attention`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import DEFAULT_EPS, compute_dtype
from .api import sa_attention

__all__ = ["paged_store", "paged_history", "sa_paged_decode"]


def paged_store(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor, *, backend: str = "auto") -> None:
    """Write token ``i``'s key and value ``(n, Hkv, D)`` rows into slot ``slot_mapping[i]`` of ``kv_cache`` (block
    ``slot // block_size``, position ``slot % block_size``), in the cache's dtype. Negative slots (padding tokens)
    are skipped, and so are tokens past ``slot_mapping``'s length. ``backend``: ``"auto"`` (the fused kernel's
    one-pass store on CPU where it is built, else indexed assignment), ``"cpp"`` or ``"torch"``. ``ValueError`` for
    a slot past the cache."""
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"`backend` must be 'auto', 'cpp' or 'torch', got {backend!r}")
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"`key` and `value` must be (n, Hkv, D) of one shape, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    if kv_cache.dim() != 4 or kv_cache.shape[1] != key.shape[1] or kv_cache.shape[3] != 2 * key.shape[2]:
        raise ValueError(f"`kv_cache` must be (num_blocks, {key.shape[1]}, block_size, {2 * key.shape[2]}), got "
                         f"{tuple(kv_cache.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.is_floating_point():
        raise ValueError(f"`slot_mapping` must be a 1-d integer tensor, got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if backend != "torch" and kv_cache.device.type == "cpu" and kv_cache.stride(3) == 1:
        from .backends import cpp

        reason = cpp.load_error()
        if reason is None:
            cpp.extension().paged_store(key, value, kv_cache, slot_mapping)
            return
        if backend == "cpp":
            raise RuntimeError(f"backend='cpp' is unavailable: {reason}")
    elif backend == "cpp":
        raise ValueError("backend='cpp' needs a CPU cache with unit stride along its last dim")
    block_size = kv_cache.shape[2]
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].long()
    keep = slots >= 0
    slots = slots[keep]
    if slots.numel() and int(slots.max()) >= kv_cache.shape[0] * block_size:
        raise ValueError(f"`slot_mapping` has slot {int(slots.max())}, past the cache's "
                         f"{kv_cache.shape[0] * block_size} slots")
    rows = torch.cat([key[:n][keep], value[:n][keep]], dim=-1).to(kv_cache.dtype)  # (n, Hkv, 2D)
    kv_cache[slots // block_size, :, slots % block_size] = rows


def paged_history(kv_cache: Tensor, block_table: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Keys and values ``(R, Hkv, length, D)`` of the ``R`` requests whose block-table rows ``(R, max_blocks)`` are
    given: their first ``length`` tokens (a copy)."""
    _, heads, block_size, two_d = kv_cache.shape
    n_blocks = -(-length // block_size)
    blocks = block_table[:, :n_blocks].long()
    if n_blocks == 1:  # read only the filled slots
        kv = kv_cache[:, :, :length].index_select(0, blocks.flatten())
    else:
        kv = kv_cache.index_select(0, blocks.flatten()).view(-1, n_blocks, heads, block_size, two_d)
        kv = kv.transpose(1, 2).flatten(2, 3)[:, :, :length]
    return kv[..., : two_d // 2], kv[..., two_d // 2 :]


def sa_paged_decode(
    query: Tensor,
    kv_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    *,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """SA attention of one query token per request, the last of its ``seq_lens[r]`` tokens, over the paged cache.

    Args:
        query: ``(R, Hq, D)``, ``Hq`` a multiple of the cache's ``Hkv`` (grouped-query attention as in
            :func:`sa_attention`).
        kv_cache: ``(num_blocks, Hkv, block_size, 2 * D)`` in the layout of this module, unit stride along the last
            dim; its dtype may differ from the query's (the values are read in the query's compute dtype).
        block_table: ``(R, max_blocks)`` integer block ids. seq_lens: ``(R,)`` integer, each in
            ``[1, max_blocks * block_size]``, the query's own token included (it is already in the cache).
        scale, normalize, eps, softcap: as in :func:`sa_attention`.
        window: ``(left, right)`` as in :func:`sa_attention` (the query sees itself and the ``left`` keys before
            it; ``right`` has no key to reach), or None.
        alibi_slopes: ``(Hq,)``: adds ``-slope * (seq_len - 1 - j)`` to the score of key ``j``.
        backend: ``"auto"`` (the fused kernel on CPU where it is built, else the gather route), ``"cpp"`` (the
            kernel, raising if it cannot run) or ``"gather"`` (:func:`paged_history` and :func:`sa_attention`).

    Returns ``(R, Hq, D)`` in the query's dtype. ``ValueError`` naming the argument for shapes or values that do
    not fit; ``RuntimeError`` for a gradient request (this is an inference path).
    """
    _check_shapes(query, kv_cache, block_table, seq_lens, window, alibi_slopes, backend)
    if torch.is_grad_enabled() and (query.requires_grad or kv_cache.requires_grad):
        raise RuntimeError("sa_paged_decode computes no gradient: call it under torch.no_grad() or "
                           "torch.inference_mode(), or use sa_attention on the gathered history")
    if query.shape[0] == 0:
        return torch.empty_like(query)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    left = -1 if window is None else int(window[0])
    if backend != "gather" and query.device.type == "cpu":
        from .backends import cpp

        reason = cpp.load_error()
        if reason is None:
            slopes = None if alibi_slopes is None else alibi_slopes.to(compute_dtype(query.dtype)).contiguous()
            return cpp.extension().paged_decode(query, kv_cache, block_table, seq_lens, slopes, scale, normalize,
                                                float(eps), left, float(softcap or 0.0))
        if backend == "cpp":
            raise RuntimeError(f"backend='cpp' is unavailable: {reason}")
    elif backend == "cpp":
        raise ValueError(f"backend='cpp' needs CPU tensors, got {query.device.type}")
    _check_values(kv_cache, block_table, seq_lens)  # (the kernel checks these itself)
    return _decode_gathered(query, kv_cache, block_table, seq_lens, scale=scale, normalize=normalize, eps=eps,
                            window=window, softcap=softcap, alibi_slopes=alibi_slopes)


def _decode_gathered(query: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor, **options: Any) -> Tensor:
    """One :func:`sa_attention` call (``options``: its keyword arguments) over the histories padded to the longest,
    the padding masked out. Window and ALiBi distances count from each request's own last token, so with either one
    call per request."""
    lens = seq_lens.to(query.device).long()
    out = torch.empty_like(query)
    if options["window"] is not None or options["alibi_slopes"] is not None:
        for r, length in enumerate(lens.tolist()):
            k, v = paged_history(kv_cache, block_table[r : r + 1], length)
            res = sa_attention(query[r : r + 1, :, None], k.to(query.dtype), v.to(query.dtype), is_causal=True,
                               **options)
            out[r] = res[0, :, 0]
        return out
    longest = int(lens.max())
    k, v = paged_history(kv_cache, block_table.to(query.device), longest)
    visible = torch.arange(longest, device=query.device)[None, :] < lens[:, None]  # (R, longest)
    # the padding slots hold whatever the cache has there (NaN included): zero, or 0 * NaN reaches the output
    pad = ~visible[:, None, :, None]
    k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    res = sa_attention(query[:, :, None], k.to(query.dtype), v.to(query.dtype), visible[:, None, None, :],
                       **options)
    return res[:, :, 0]


def _check_shapes(query: Tensor, kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                  window: tuple[int, int] | None, alibi_slopes: Tensor | None, backend: str) -> None:
    """What can be checked without reading a tensor (a decode step calls this once per layer)."""
    if backend not in ("auto", "cpp", "gather"):
        raise ValueError(f"`backend` must be 'auto', 'cpp' or 'gather', got {backend!r}")
    if query.dim() != 3:
        raise ValueError(f"`query` must be (R, Hq, D), got shape {tuple(query.shape)}")
    R, Hq, D = query.shape
    if kv_cache.dim() != 4 or kv_cache.shape[3] != 2 * D:
        raise ValueError(f"`kv_cache` must be (num_blocks, Hkv, block_size, 2 * D) with D = {D}, got shape "
                         f"{tuple(kv_cache.shape)}")
    if kv_cache.stride(3) != 1:
        raise ValueError("`kv_cache` must have unit stride along its last dim")
    if not kv_cache.is_floating_point() or not query.is_floating_point():
        raise ValueError(f"`query` and `kv_cache` must be floating point, got {query.dtype} and {kv_cache.dtype}")
    if kv_cache.shape[1] == 0 or Hq % kv_cache.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of the cache's key/value heads "
                         f"({kv_cache.shape[1]})")
    if block_table.dim() != 2 or block_table.shape[0] != R or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`block_table` must be an int32/int64 (R, max_blocks) tensor with R = {R}, got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != R or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`seq_lens` must be an int32/int64 (R,) tensor with R = {R}, got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    if window is not None and (len(window) != 2 or int(window[0]) < -1):
        raise ValueError(f"`window` must be (left, right) with left >= -1, got {window!r}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (Hq,):
        raise ValueError(f"`alibi_slopes` must be (Hq,) = ({Hq},), got shape {tuple(alibi_slopes.shape)}")


def _check_values(kv_cache: Tensor, block_table: Tensor, seq_lens: Tensor) -> None:
    """Lengths and block ids that would read outside the cache (the messages the kernel gives for the same)."""
    if not seq_lens.numel():
        return
    capacity = block_table.shape[1] * kv_cache.shape[2]
    if int(seq_lens.min()) < 1 or int(seq_lens.max()) > capacity:
        r = int(((seq_lens < 1) | (seq_lens > capacity)).nonzero()[0])
        raise ValueError(f"`seq_lens` must be in [1, max_blocks * block_size = {capacity}], got seq_lens[{r}] = "
                         f"{int(seq_lens[r])}")
    used = torch.arange(block_table.shape[1], device=seq_lens.device)[None, :] * kv_cache.shape[2] < seq_lens[:, None]
    ids = block_table.to(seq_lens.device)
    bad = used & ((ids < 0) | (ids >= kv_cache.shape[0]))
    if bool(bad.any()):
        r, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"`block_table`[{r}, {i}] = {int(ids[r, i])} is not a block of the cache "
                         f"({kv_cache.shape[0]} blocks)")
