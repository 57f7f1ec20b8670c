"""An independent float64 oracle for SA-Softmax and SA attention, written from ``docs/contract.md`` alone.

It deliberately shares no code with the package (``sasoftmax.functional`` / ``attention.reference``): it works one
row at a time, keeps only the visible entries of each row, and lets autograd differentiate plain float64 formulas,
so a bug in the package's vectorised masking or in its analytic backward cannot hide behind the same bug here.

Conventions (contract.md sections 1 and 4):

* layout ``(B, H, N, D)``; ``k``/``v`` may have ``Hkv`` heads with ``Hq % Hkv == 0``; query head ``h`` reads
  key/value head ``h // (Hq // Hkv)``;
* scores ``s = scale * q.k + float-mask value + bias + alibi`` with ``alibi = -slope * |Nk - Nq + i - j|``;
* a bool ``attn_mask`` is True = attend; a float ``attn_mask`` entry ``<= -65504`` (``-inf`` or a ``finfo.min``)
  marks the key as masked, any other entry is added to the score;
* ``is_causal`` is aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= Nk - Nq + i``;
* per row, over the visible keys only: ``p = softmax(s)``; plain ``w = s * p``; normalized ``a = min(min s, 0)``,
  ``b = max(max s, 0)``, ``w = (s - a) / (b - a + eps) * p``; masked keys and rows without a visible key get 0;
* dropout (given here as an explicit keep mask) multiplies ``w`` by ``keep / (1 - p)`` after the factor.

The runners that call the package under test live in ``helpers.py``, apart from the oracle.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASKED_AT_OR_BELOW = -65504.0  # float-mask entries at or below this mark a masked key (the contract's rule)


def row_range64(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b) = (min(min s, 0), max(max s, 0))`` of one row of visible scores; a gradient flows to the arg-min
    (arg-max) entry only when the minimum is < 0 (the maximum is > 0)."""
    lo, hi = s.min(), s.max()
    a = lo if lo.item() < 0 else torch.zeros((), dtype=s.dtype)
    b = hi if hi.item() > 0 else torch.zeros((), dtype=s.dtype)
    return a, b


def sa_row64(
    s: Tensor, *, normalize: bool, detach_range: bool, eps: float, frozen: tuple[float, float] | None = None
) -> Tensor:
    """SA weights of one row of *visible* float64 scores ``s`` (1-d, at least one entry), autograd-differentiable.

    ``frozen=(a, b)`` replaces the row's range by constants (for finite differences of the detached form)."""
    p = torch.exp(s - s.max().detach())
    p = p / p.sum()
    if not normalize:
        return s * p
    if frozen is not None:
        a, b = (torch.tensor(x, dtype=s.dtype) for x in frozen)
    else:
        a, b = row_range64(s)
    if detach_range:
        a, b = a.detach(), b.detach()
    return (s - a) / (b - a + eps) * p


def _rows64(
    s: Tensor, visible: Tensor, *, normalize: bool, detach_range: bool, eps: float, frozen: Tensor | None = None
) -> Tensor:
    """Apply :func:`sa_row64` to every row of ``s`` (..., N) with bool ``visible`` of the same shape.
    ``frozen`` (..., 2) holds constant ``(a, b)`` per row, or is None."""
    shape = s.shape
    n = shape[-1]
    flat_s = s.reshape(-1, n)
    flat_v = visible.reshape(-1, n)
    flat_f = None if frozen is None else frozen.reshape(-1, 2).tolist()
    rows = []
    for r in range(flat_s.shape[0]):
        idx = torch.nonzero(flat_v[r]).flatten()
        row = torch.zeros(n, dtype=torch.float64)
        if idx.numel() > 0:
            fr = None if flat_f is None else tuple(flat_f[r])
            w = sa_row64(flat_s[r][idx], normalize=normalize, detach_range=detach_range, eps=eps, frozen=fr)
            row = row.index_put((idx,), w)
        rows.append(row)
    # ``0 * sum`` keeps the result attached to the graph even when every row is fully masked (or empty); over the
    # finite scores only, so that a NaN in one row does not reach the others through the anchor.
    anchor = 0.0 * torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0).sum()
    if not rows:
        return torch.zeros(shape, dtype=torch.float64) + anchor
    return torch.stack(rows).reshape(shape) + anchor


def oracle_sa_softmax(
    x: Tensor,
    dim: int = -1,
    *,
    mask: Tensor | None = None,
    normalize: bool = True,
    detach_range: bool = False,
    eps: float = 1e-10,
    frozen_range: Tensor | None = None,
) -> Tensor:
    """Float64 SA-Softmax of ``x`` along ``dim``; ``mask`` (bool, True = keep) broadcasts to ``x``.
    ``frozen_range`` (x's shape with ``dim`` moved last and replaced by 2) fixes each row's ``(a, b)``."""
    x64 = x.double()
    vis = torch.ones(x.shape, dtype=torch.bool) if mask is None else mask.expand(x.shape)
    s = x64.movedim(dim, -1)
    w = _rows64(s, vis.movedim(dim, -1), normalize=normalize, detach_range=detach_range, eps=eps, frozen=frozen_range)
    return w.movedim(-1, dim)


def _to4(t: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape)


def oracle_scores(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Float64 scores ``(B, Hq, Nq, Nk)`` and the bool visibility of each score (True = the key takes part).

    ``window=(left, right)``: key ``j`` visible to query ``i`` iff ``-right <= (Nk - Nq + i) - j <= left`` (-1: that
    side unbounded). ``softcap=c``: the scaled product becomes ``c tanh(product / c)`` before anything is added."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    shape = (B, Hq, Nq, Nk)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    head_of = torch.arange(Hq) // (Hq // Hkv)
    k_full = k.double()[:, head_of]
    s = scale * torch.einsum("bhid,bhjd->bhij", q.double(), k_full)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    visible = torch.ones(shape, dtype=torch.bool)
    if window is not None:
        behind = (Nk - Nq + torch.arange(Nq)[:, None]) - torch.arange(Nk)[None, :]
        if window[0] != -1:
            visible = visible & (behind <= window[0])
        if window[1] != -1:
            visible = visible & (behind >= -window[1])
    if attn_mask is not None:
        m = _to4(attn_mask, shape)
        if m.dtype == torch.bool:
            visible = visible & m
        else:
            m64 = m.double()
            masked = m64 <= MASKED_AT_OR_BELOW
            visible = visible & ~masked
            s = s + torch.where(masked, torch.zeros_like(m64), m64)
    if is_causal:
        i = torch.arange(Nq)[:, None]
        j = torch.arange(Nk)[None, :]
        visible = visible & (j <= Nk - Nq + i)
    if bias is not None:
        s = s + _to4(bias.double(), shape)
    if alibi_slopes is not None:
        sl = alibi_slopes.double()
        sl = sl.reshape(1, Hq) if sl.dim() == 1 else sl
        i = torch.arange(Nq, dtype=torch.float64)[:, None]
        j = torch.arange(Nk, dtype=torch.float64)[None, :]
        dist = (Nk - Nq + i - j).abs()
        s = s - sl[:, :, None, None] * dist
    return s, visible


def oracle_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    normalize: bool = True,
    detach_range: bool = False,
    eps: float = 1e-10,
    dropout_keep: Tensor | None = None,
    dropout_p: float = 0.0,
    frozen_range: Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Float64 SA attention: returns ``(out (B, Hq, Nq, Dv), weights (B, Hq, Nq, Nk))``, differentiable with respect
    to every floating input that requires grad (``q``, ``k``, ``v``, ``bias``).

    ``dropout_keep`` (bool, broadcastable to the weights) applies dropout with rate ``dropout_p``;
    ``frozen_range`` ``(B, Hq, Nq, 2)`` replaces each row's ``(a, b)`` by constants (see :func:`oracle_ranges`)."""
    s, visible = oracle_scores(
        q, k, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes, window=window,
        softcap=softcap,
    )
    w = _rows64(s, visible, normalize=normalize, detach_range=detach_range, eps=eps, frozen=frozen_range)
    if dropout_keep is not None:
        w = w * dropout_keep.double() / (1.0 - dropout_p)
    Hq, Hkv = q.shape[1], v.shape[1]
    v_full = v.double()[:, torch.arange(Hq) // (Hq // Hkv)]
    out = torch.einsum("bhij,bhjd->bhid", w, v_full)
    return out, w


def oracle_ranges(s: Tensor, visible: Tensor) -> Tensor:
    """Per-row ``(a, b)`` of scores ``s`` (..., N) over the visible entries, as a constant (..., 2) tensor
    (rows without a visible key get (0, 0))."""
    n = s.shape[-1]
    flat_s, flat_v = s.detach().reshape(-1, n), visible.reshape(-1, n)
    out = torch.zeros(flat_s.shape[0], 2, dtype=torch.float64)
    for r in range(flat_s.shape[0]):
        vals = flat_s[r][flat_v[r]]
        if vals.numel() > 0:
            a, b = row_range64(vals)
            out[r, 0], out[r, 1] = a, b
    return out.reshape(*s.shape[:-1], 2)
