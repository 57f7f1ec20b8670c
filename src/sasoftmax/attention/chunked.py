"""The memory-efficient backend: tiles of whole key rows, with the analytic backward of ``design/math.md``.

The score matrix is processed in tiles of ``(batch range, key/value-head range, query rows) x all keys``. Each
tile sees whole rows, so softmax, min and max are exact per tile. The forward keeps only per-row statistics (for
the normalized form ``a``, ``b`` and the arg-min/arg-max keys); the backward recomputes each tile's scores.
Activation memory is O(N * D) plus one tile of scores at a time.

Gradients (per row, ``g = dL/do``, ``dP_j = g . v_j`` (times the dropout scale), ``Delta = g . o``):

* plain:       ``ds_j = p_j ((1 + s_j) dP_j - Delta)``
* normalized:  ``ds_j = p_j (c (1 + s_j - a) dP_j - Delta)``, plus, unless ``detach_range``,
  ``c (Delta - Delta0)`` at the arg-min key (if ``min s < 0``) and ``-c Delta`` at the arg-max key (if ``max s > 0``),
  with ``Delta0 = sum_j p_j dP_j``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dropout import draw_seed, keep_mask
from .inputs import AttentionInputs

# Scores per tile (elements): a few of these float32 tiles stay in a CPU's L2/L3 cache, so the element-wise passes
# between the matrix products run from cache.
DEFAULT_TILE_ELEMENTS = 1 << 18
# Fewest query rows per tile (when the rows are long): keeps the matrix products efficient.
MIN_TILE_ROWS = 64
# With SASOFTMAX_COMPILE=auto (default), calls with at least this many scores run the tile math compiled.
COMPILE_MIN_SCORES = 1 << 24


@dataclass(frozen=True)
class Tile:
    """Batch range ``bs``, query-head range ``hs`` (whole key/value-head groups ``ks``), query rows ``[i0, i1)``."""

    bs: slice
    hs: slice
    ks: slice
    i0: int
    i1: int


def plan_tiles(inp: AttentionInputs, tile_elements: int = DEFAULT_TILE_ELEMENTS, rows: int | None = None) -> list[Tile]:
    """Cover ``(B, Hq, Nq)`` with tiles of about ``tile_elements`` scores (or exactly ``rows`` query rows)."""
    B, Hq, Hkv, Nq, Nk, G = inp.batch, inp.heads, inp.kv_heads, inp.nq, inp.nk, inp.groups
    nk = max(Nk, 1)
    if rows is None:
        rows = min(Nq, max(MIN_TILE_ROWS, tile_elements // nk))
    rows = max(1, min(rows, Nq))
    kv_per_tile = max(1, min(Hkv, tile_elements // (rows * nk * G)))
    batch_per_tile = max(1, min(B, tile_elements // (rows * nk * Hq))) if kv_per_tile == Hkv else 1
    out = []
    for b0 in range(0, B, batch_per_tile):
        bs = slice(b0, min(B, b0 + batch_per_tile))
        for k0 in range(0, Hkv, kv_per_tile):
            k1 = min(Hkv, k0 + kv_per_tile)
            for i0 in range(0, Nq, rows):
                out.append(Tile(bs, slice(k0 * G, k1 * G), slice(k0, k1), i0, min(Nq, i0 + rows)))
    return out


def _mm_in(t: Tensor, groups: int) -> Tensor:
    """``(b, h, n, x) -> (b * h/G, G * n, x)``: one matrix product per key/value head serves its G query heads."""
    b, h, n, x = t.shape
    return t.reshape(b * (h // groups), groups * n, x)


def _mm_out(t: Tensor, b: int, h: int) -> Tensor:
    """Inverse of :func:`_mm_in`: ``(b * h/G, G * n, x) -> (b, h, n, x)``."""
    return t.view(b, h, -1, t.shape[-1])


def _kv3(t: Tensor, tl: Tile) -> Tensor:
    x = t[tl.bs, tl.ks]
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _acc3(t: Tensor, tl: Tile) -> Tensor:
    """A 3-d *view* of a contiguous per-key/value-head accumulator (tiles never split it non-contiguously)."""
    x = t[tl.bs, tl.ks]
    return x.view(-1, x.shape[-2], x.shape[-1])


class _Scores:
    """The scores of one tile, masked entries at -inf, plus what is needed to mask and un-mask them."""

    def __init__(self, inp: AttentionInputs, q: Tensor, bias: Tensor | None, tl: Tile):
        cdt = inp.compute_dtype
        qt = q[tl.bs, tl.hs, tl.i0:tl.i1]
        self.b, self.h = qt.shape[0], qt.shape[1]
        self.q3 = _mm_in(qt, inp.groups)  # (b*hkv, G*rows, D)
        kT = _kv3(inp.k, tl).transpose(1, 2)
        if q.dtype == cdt:  # float32/64: the scale rides on the product
            s = _mm_out(torch.baddbmm(_NOTHING.to(cdt), self.q3, kT, beta=0.0, alpha=inp.scale), self.b, self.h)
        else:  # half inputs: product in the input dtype, row math in float32 (like the reference)
            s = _mm_out(torch.bmm(self.q3, kT), self.b, self.h).to(cdt).mul_(inp.scale)
        add = inp.additive(tl.i0, tl.i1, cdt, tl.bs, tl.hs)
        if add is not None:
            s.add_(add)
        if bias is not None:
            s.add_(_tile(bias, tl))
        self.vis = inp.visible(tl.i0, tl.i1, tl.bs, tl.hs)
        self.empty = None  # rows with no visible key (their softmax would be NaN)
        if self.vis is not None:
            s.masked_fill_(~self.vis, float("-inf"))
            if inp.may_have_empty_rows():
                self.empty = ~self.vis.any(dim=-1, keepdim=True)
        self.s = s

    def softmax(self) -> Tensor:
        p = torch.softmax(self.s, dim=-1)
        if self.empty is not None:  # rows with no visible key: 0, not NaN
            p.masked_fill_(self.empty, 0.0)
        return p

    def zero_masked(self) -> Tensor:
        """Masked scores -> 0 (in place), so that they can be multiplied safely."""
        if self.vis is not None:
            self.s.masked_fill_(~self.vis, 0.0)
        return self.s


def _tile(t: Tensor, tl: Tile) -> Tensor:
    from .inputs import tile

    return tile(t, tl.i0, tl.i1, tl.bs, tl.hs)


def _dropout_keep(inp: AttentionInputs, seed: int, tl: Tile, device: torch.device) -> Tensor:
    return keep_mask(seed, inp.dropout_p, inp.batch, inp.heads, inp.nq, inp.nk, tl.i0, tl.i1, device, tl.bs, tl.hs)


def _fwd_eager(s: Tensor, vis: Tensor | None, empty: Tensor | None, norm: bool, want_idx: bool, eps: float):
    """Row math of one forward tile, in place on the tile's scores ``s`` (masked entries -inf).

    Returns ``(w, r, a, b, imin, imax)``: unnormalized weights ``w`` (``s p`` or ``(s - a) p``), the per-row
    factor ``r`` the output still needs (``c`` or None), the clipped range and its arg-min/arg-max keys."""
    p = torch.softmax(s, dim=-1)
    if empty is not None:  # rows with no visible key: 0, not NaN
        p.masked_fill_(empty, 0.0)
    a = b = r = imin = imax = None
    if norm:
        if want_idx:
            mx, imax = s.max(dim=-1, keepdim=True)
        elif vis is None:
            mn, mx = torch.aminmax(s, dim=-1, keepdim=True)
        else:
            mx = s.amax(dim=-1, keepdim=True)
    if vis is not None:
        s.masked_fill_(~vis, 0.0)  # never multiply -inf by 0
    if not norm:
        return s.mul_(p), r, a, b, imin, imax
    if want_idx:
        mn, imin = s.min(dim=-1, keepdim=True)
    elif vis is not None:
        mn = s.amin(dim=-1, keepdim=True)
    a, b = mn.clamp(max=0.0), mx.clamp(min=0.0)
    r = 1.0 / (b - a + eps)
    return s.sub_(a).mul_(p), r, a, b, imin, imax


def _bwd_eager(s, vis, empty, dP, delta, a, b, norm: bool, range_grad: bool, need_w: bool, eps: float):
    """Row math of one backward tile (``s`` recomputed, masked entries -inf; ``dP`` already dropout-scaled).

    Returns ``(ds, w, delta0, c)``: the score gradient without the range terms, the applied weights (for dv),
    ``Delta0 = sum_j p_j dP_j`` (range gradient only) and ``c``."""
    p = torch.softmax(s, dim=-1)
    if empty is not None:
        p.masked_fill_(empty, 0.0)
    if vis is not None:
        s.masked_fill_(~vis, 0.0)
    delta0 = c = None
    if norm:
        c = 1.0 / (b - a + eps)
        if range_grad:
            delta0 = torch.linalg.vecdot(p, dP, dim=-1).unsqueeze(-1)
        w = torch.addcmul(-a * c, s, c).mul_(p) if need_w else None  # (s - a) c p
        ds = torch.addcmul((1.0 - a) * c, s, c)  # c (1 + s - a)
        return ds.mul_(dP).sub_(delta).mul_(p), w, delta0, c
    # plain: ds = p (dP + (s dP - Delta)), with Delta = sum_j w_j dP_j taken from this tile rather than g.o: the two
    # large terms s dP and Delta then carry the same rounding and cancel cleanly when |s| is large.
    w = s * p
    delta = torch.linalg.vecdot(w, dP, dim=-1).unsqueeze(-1)
    ds = s.mul_(dP).sub_(delta).add_(dP).mul_(p)
    return ds, w, delta0, c


def _fwd_functional(s: Tensor, vis: Tensor | None, empty: Tensor | None, norm: bool, want_idx: bool, eps: float):
    """Out-of-place twin of :func:`_fwd_eager`, written for ``torch.compile`` to fuse into a few loops."""
    p = torch.softmax(s, dim=-1)
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    sz = s if vis is None else s.masked_fill(~vis, 0.0)
    if not norm:
        return sz * p, None, None, None, None, None
    if want_idx:
        mx, imax = s.max(dim=-1, keepdim=True)
        mn, imin = sz.min(dim=-1, keepdim=True)
    else:
        mx, mn, imin, imax = s.amax(dim=-1, keepdim=True), sz.amin(dim=-1, keepdim=True), None, None
    a, b = mn.clamp(max=0.0), mx.clamp(min=0.0)
    return (sz - a) * p, 1.0 / (b - a + eps), a, b, imin, imax


def _bwd_functional(s, vis, empty, dP, delta, a, b, norm: bool, range_grad: bool, need_w: bool, eps: float):
    """Out-of-place twin of :func:`_bwd_eager`, written for ``torch.compile``."""
    p = torch.softmax(s, dim=-1)
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    sz = s if vis is None else s.masked_fill(~vis, 0.0)
    if not norm:
        w = sz * p
        delta = (w * dP).sum(dim=-1, keepdim=True)
        return p * (dP + (sz * dP - delta)), w, None, None
    c = 1.0 / (b - a + eps)
    delta0 = (p * dP).sum(dim=-1, keepdim=True) if range_grad else None
    w = (sz - a) * c * p if need_w else None
    return p * (c * (1.0 + sz - a) * dP - delta), w, delta0, c


_COMPILED: tuple | None = None
_COMPILE_BROKEN = False
_NOTHING = torch.zeros(1, 1, 1)  # the ignored `input` of baddbmm(beta=0)


def _compile_wanted(inp: AttentionInputs) -> bool:
    """Whether this call's tile math runs through ``torch.compile``; see ``SASOFTMAX_COMPILE`` in the docs."""
    mode = os.environ.get("SASOFTMAX_COMPILE", "auto").lower()
    if mode in ("0", "never", "false", "off") or _COMPILE_BROKEN:
        return False
    if mode in ("1", "always", "true", "on"):
        return True
    if mode != "auto":
        raise ValueError(f"SASOFTMAX_COMPILE must be auto, 1/always or 0/never, got {mode!r}")
    # auto: only when one call has enough scores for the one-off compile to pay for itself, and off CUDA
    # (on CUDA the Triton kernel is the fast path).
    work = inp.batch * inp.heads * inp.nq * inp.nk
    return work >= COMPILE_MIN_SCORES and not inp.q.is_cuda


def _math(inp: AttentionInputs):
    """``(forward row math, backward row math)``: compiled when wanted and working, else the eager versions."""
    global _COMPILED, _COMPILE_BROKEN
    if not _compile_wanted(inp):
        return _fwd_eager, _bwd_eager
    if _COMPILED is None:
        try:
            _COMPILED = (torch.compile(_fwd_functional, dynamic=True), torch.compile(_bwd_functional, dynamic=True))
        except Exception as err:  # pragma: no cover - depends on the platform's compiler
            _COMPILE_BROKEN = True
            warnings.warn(f"sasoftmax: torch.compile unavailable ({err}); using eager tile math", stacklevel=3)
            return _fwd_eager, _bwd_eager
    return _COMPILED


def _forward_tiles(inp: AttentionInputs, tiles: list[Tile], seed: int | None, with_stats: bool):
    """The forward over all tiles. Returns ``(out, stats)``; ``stats`` (the per-row ``a``, ``b`` and arg-min/arg-max
    keys of the normalized form) only when ``with_stats`` (a backward will follow)."""
    q, v, bias = inp.q, inp.v, inp.bias
    B, Hq, Nq, _ = q.shape
    cdt, G = inp.compute_dtype, inp.groups
    norm = inp.normalize
    want_idx = norm and with_stats and not inp.detach_range
    out = torch.empty(B, Hq, Nq, v.shape[-1], dtype=q.dtype, device=q.device)
    keep_stats = norm and with_stats
    stat = lambda dt=cdt: torch.empty(B, Hq, Nq, 1, dtype=dt, device=q.device)  # noqa: E731
    a_all, b_all = (stat(), stat()) if keep_stats else (None, None)
    i_min, i_max = (stat(torch.long), stat(torch.long)) if want_idx else (None, None)
    fwd_math = _math(inp)[0]
    for tl in tiles:
        sc = _Scores(inp, q, bias, tl)
        rows = (tl.bs, tl.hs, slice(tl.i0, tl.i1))
        w, r, a, b, imin, imax = fwd_math(sc.s, sc.vis, sc.empty, norm, want_idx, inp.eps)
        if keep_stats:
            a_all[rows], b_all[rows] = a, b
        if want_idx:
            i_min[rows], i_max[rows] = imin, imax
        if seed is not None:
            w.mul_(_dropout_keep(inp, seed, tl, q.device))
            r = (1.0 if r is None else r) / (1.0 - inp.dropout_p)
        v3 = _kv3(v, tl)
        if v.dtype == cdt:
            o = _mm_out(torch.bmm(_mm_in(w, G), v3), sc.b, sc.h)
            if r is not None:
                o.mul_(r)
        else:  # half: finish the weights in float32, then one product in the input dtype (as the reference)
            if r is not None:
                w.mul_(r)
            o = _mm_out(torch.bmm(_mm_in(w.to(v.dtype), G), v3), sc.b, sc.h)
        out[rows] = o
    return out, (a_all, b_all, i_min, i_max)


class _ChunkedSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, inp: AttentionInputs, tiles: list[Tile]):
        seed = draw_seed(inp.generator) if inp.dropout_p > 0 else None
        out, stats = _forward_tiles(inp, tiles, seed, with_stats=True)
        ctx.save_for_backward(q, k, v, bias, out, *stats)
        ctx.inp, ctx.tiles, ctx.seed = inp, tiles, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, out, a_all, b_all, i_min, i_max = ctx.saved_tensors
        inp: AttentionInputs = ctx.inp
        cdt, G = inp.compute_dtype, inp.groups
        norm, range_grad = inp.normalize, inp.normalize and not inp.detach_range
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        # Scores are recomputed exactly as in the forward; everything after runs in the compute dtype.
        kc, vc, qc = k.to(cdt), v.to(cdt), q.to(cdt)
        g_all = grad_out.to(cdt)
        delta_all = (g_all * out.to(cdt)).sum(dim=-1, keepdim=True)  # Delta = g . o per row
        dq = torch.empty_like(qc, memory_format=torch.contiguous_format) if need_q else None
        # dk and dv accumulate transposed, (B, Hkv, D, Nk): the products then read the tile in its natural layout
        dkT = kc.new_zeros(kc.shape[0], kc.shape[1], kc.shape[3], kc.shape[2]) if need_k else None
        dvT = vc.new_zeros(vc.shape[0], vc.shape[1], vc.shape[3], vc.shape[2]) if need_v else None
        dbias = torch.zeros(bias.shape, dtype=cdt, device=q.device) if need_bias else None
        bwd_math = _math(inp)[1]
        for tl in ctx.tiles:
            sc = _Scores(inp, q, bias, tl)
            rows = (tl.bs, tl.hs, slice(tl.i0, tl.i1))
            g = g_all[rows]
            g3 = _mm_in(g, G)
            delta = delta_all[rows]
            dP = _mm_out(torch.bmm(g3, _kv3(vc, tl).transpose(1, 2)), sc.b, sc.h)
            keep = None
            if ctx.seed is not None:
                keep = _dropout_keep(inp, ctx.seed, tl, q.device).to(cdt).mul_(1.0 / (1.0 - inp.dropout_p))
                dP.mul_(keep)
            a = b = None
            if norm:
                a, b = a_all[rows], b_all[rows]
            ds, w, delta0, c = bwd_math(sc.s, sc.vis, sc.empty, dP, delta, a, b, norm, range_grad, need_v, inp.eps)
            if range_grad:
                ds.scatter_add_(-1, i_min[rows], c * (delta - delta0) * (a < 0))
                ds.scatter_add_(-1, i_max[rows], -c * delta * (b > 0))
            if need_v:
                if keep is not None:
                    w.mul_(keep)
                _acc3(dvT, tl).baddbmm_(g3.transpose(1, 2), _mm_in(w, G))
            ds3 = _mm_in(ds, G)
            if need_q:
                dq[rows] = _mm_out(torch.bmm(ds3, _kv3(kc, tl)), sc.b, sc.h).mul_(inp.scale)
            if need_k:
                q3 = sc.q3 if sc.q3.dtype == cdt else _mm_in(qc[rows], G)
                _acc3(dkT, tl).baddbmm_(q3.transpose(1, 2), ds3, alpha=inp.scale)
            if need_bias:
                _accumulate_bias_grad(dbias, ds, tl)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dkT is None else dkT.transpose(-1, -2).to(k.dtype, memory_format=torch.contiguous_format),
            None if dvT is None else dvT.transpose(-1, -2).to(v.dtype, memory_format=torch.contiguous_format),
            None if dbias is None else dbias.to(bias.dtype),
            None,
            None,
        )


def _accumulate_bias_grad(dbias: Tensor, ds: Tensor, tl: Tile) -> None:
    """Add the tile's ``ds`` into the bias gradient, summing over the bias's broadcast dims."""
    dims = [d for d in range(4) if dbias.shape[d] == 1 and ds.shape[d] != 1]
    red = ds.sum(dim=dims, keepdim=True) if dims else ds
    _tile(dbias, tl).add_(red)


def chunked_attention(inp: AttentionInputs, block_size: int | None = None) -> Tensor:
    """Memory-efficient SA attention. ``block_size`` fixes the query rows per tile (default: sized automatically)."""
    if inp.nq == 0 or inp.nk == 0 or inp.batch == 0 or inp.heads == 0 or inp.q.shape[-1] == 0:
        out = inp.q.new_zeros(inp.batch, inp.heads, inp.nq, inp.v.shape[-1])
        # keep the graph connected so that .backward() works and yields zero gradients
        parts = [t.sum() for t in (inp.q, inp.k, inp.v, inp.bias) if t is not None and t.requires_grad]
        return out + 0.0 * sum(parts) if parts else out
    if block_size is not None and int(block_size) < 1:
        raise ValueError(f"`block_size` must be a positive number of query rows, got {block_size}")
    # Tiles slice k/v per key/value head and q per row block: contiguous inputs keep those slices views
    # (a no-op for inputs that already are; O(N*D) copies for transposed views such as (B, N, H, D).transpose(1, 2)).
    inp = replace(inp, q=inp.q.contiguous(), k=inp.k.contiguous(), v=inp.v.contiguous())
    tiles = plan_tiles(inp, rows=None if block_size is None else int(block_size))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (inp.q, inp.k, inp.v, inp.bias)
    )
    if not needs_grad:  # inference: no statistics kept, no autograd node
        seed = draw_seed(inp.generator) if inp.dropout_p > 0 else None
        return _forward_tiles(inp, tiles, seed, with_stats=False)[0]
    return _ChunkedSA.apply(inp.q, inp.k, inp.v, inp.bias, inp, tiles)
