"""The memory-efficient backend: tiles of whole key rows, with the analytic backward of ``docs/contract.md``.

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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ...env import positive_int
from ..dropout import keep_mask
from ..inputs import AttentionInputs, causal_block, tile
from ..op import BwdArgs, FwdArgs, define_attention_op, inputs_of, stats_dtype

# Scores per tile (elements) when short rows are grouped over heads/batch entries: a few of these float32 tiles stay
# in a CPU's L2/L3 cache, so the element-wise passes between the matrix products run from cache.
DEFAULT_TILE_ELEMENTS = 1 << 18
# Query rows per tile: ROW_TILE_ELEMENTS // Nk, clipped to [MIN_TILE_ROWS, MAX_TILE_ROWS].
ROW_TILE_ELEMENTS = 1 << 19
# Fewest query rows per tile (when the rows are long): keeps the matrix products efficient. Most rows per tile
# (when they are short): beyond this, more tiles schedule better over the worker threads. Measured on a 2-core CPU.
MIN_TILE_ROWS = 128
MAX_TILE_ROWS = 256


@dataclass(frozen=True)
class Tile:
    """Batch range ``bs``, query-head range ``hs`` (whole key/value-head groups ``ks``), query rows ``[i0, i1)``,
    keys ``[0, j1)`` (with a causal mask, later keys are invisible to every row of the tile and are skipped)."""

    bs: slice
    hs: slice
    ks: slice
    i0: int
    i1: int
    j1: int


def plan_tiles(inp: AttentionInputs, tile_elements: int | None = None, rows: int | None = None) -> list[Tile]:
    """Cover ``(B, Hq, Nq)`` with tiles of about ``tile_elements`` scores (default ``DEFAULT_TILE_ELEMENTS``), or
    of exactly ``rows`` query rows."""
    tile_elements = DEFAULT_TILE_ELEMENTS if tile_elements is None else tile_elements
    B, Hq, Hkv, Nq, Nk, G = inp.batch, inp.heads, inp.kv_heads, inp.nq, inp.nk, inp.groups
    nk = max(Nk, 1)
    if rows is None:
        rows = min(Nq, max(MIN_TILE_ROWS, min(MAX_TILE_ROWS, ROW_TILE_ELEMENTS // nk)))
    rows = max(1, min(rows, Nq))
    kv_per_tile = max(1, min(Hkv, tile_elements // (rows * nk * G)))
    batch_per_tile = max(1, min(B, tile_elements // (rows * nk * Hq))) if kv_per_tile == Hkv else 1
    out = []
    for b0 in range(0, B, batch_per_tile):
        bs = slice(b0, min(B, b0 + batch_per_tile))
        for k0 in range(0, Hkv, kv_per_tile):
            k1 = min(Hkv, k0 + kv_per_tile)
            for i0 in range(0, Nq, rows):
                i1 = min(Nq, i0 + rows)
                out.append(Tile(bs, slice(k0 * G, k1 * G), slice(k0, k1), i0, i1, inp.causal_key_end(i1)))
    return out


def _mm_in(t: Tensor, groups: int) -> Tensor:
    """``(b, h, n, x) -> (b * h/G, G * n, x)``: one matrix product per key/value head serves its G query heads."""
    b, h, n, x = t.shape
    return t.reshape(b * (h // groups), groups * n, x)


def _mm_out(t: Tensor, b: int, h: int) -> Tensor:
    """Inverse of :func:`_mm_in`: ``(b * h/G, G * n, x) -> (b, h, n, x)``."""
    return t.view(b, h, -1, t.shape[-1])


def _kv3(t: Tensor, tl: Tile) -> Tensor:
    """The tile's keys/values ``(B, Hkv, Nk, D) -> (b * hkv, j1, D)``."""
    x = t[tl.bs, tl.ks, : tl.j1]
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _acc3(t: Tensor, tl: Tile) -> Tensor:
    """A 3-d *view* ``(b * hkv, D, j1)`` of a transposed accumulator ``(B, Hkv, D, Nk)`` (tiles never split it in a
    way a view cannot express), for in-place accumulation."""
    x = t[tl.bs, tl.ks, :, : tl.j1]
    return x.view(-1, x.shape[-2], x.shape[-1])


_NOTHING: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _nothing(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ignored ``input`` of ``baddbmm(beta=0)`` (broadcast, never read), cached per dtype and device."""
    key = (dtype, device)
    if key not in _NOTHING:
        _NOTHING[key] = torch.zeros(1, 1, 1, dtype=dtype, device=device)
    return _NOTHING[key]


class _Scores:
    """The scores of one tile, masked entries at -inf, plus what is needed to mask and un-mask them."""

    def __init__(self, inp: AttentionInputs, q: Tensor, bias: Tensor | None, tl: Tile, backward: bool = False):
        cdt = inp.compute_dtype
        qt = q[tl.bs, tl.hs, tl.i0:tl.i1]
        self.b, self.h = qt.shape[0], qt.shape[1]
        self.q3 = _mm_in(qt, inp.groups)  # (b*hkv, G*rows, D)
        kT = _kv3(inp.k, tl).transpose(1, 2)
        if q.dtype == cdt:  # float32/64: the scale rides on the product
            s = _mm_out(torch.baddbmm(_nothing(cdt, q.device), self.q3, kT, beta=0.0, alpha=inp.scale), self.b, self.h)
        else:  # half inputs: product in the input dtype, row math in float32 (like the reference)
            s = _mm_out(torch.bmm(self.q3, kT), self.b, self.h).to(cdt).mul_(inp.scale)
        # soft-capping c tanh(s / c) of the products; the backward keeps its derivative 1 - tanh^2 for dq, dk
        self.cap_grad = None
        if inp.softcap is not None:
            t = s.div_(inp.softcap).tanh_()
            if backward:
                self.cap_grad = torch.addcmul(torch.ones((), dtype=cdt, device=q.device), t, t, value=-1.0)
            s = t.mul_(inp.softcap)
        add = inp.additive(tl.i0, tl.i1, cdt, tl.bs, tl.hs, tl.j1)
        if add is not None:
            s.add_(add)
        if bias is not None:
            s.add_(_tile(bias, tl))
        # Masking touches only the columns `cols` of the tile (everything left of them is visible to every row):
        # for a causal-only mask, just the tile's diagonal block.
        self.cols = slice(0, tl.j1)
        if inp.keep is None and inp.is_causal and inp.window is None:
            self.cols = slice(min(max(0, tl.i0 + inp.nk - inp.nq + 1), tl.j1), tl.j1)
            vis = None  # e.g. a decoding step: every key of the tile is visible
            if self.cols.start < tl.j1:
                vis = causal_block(tl.i0, tl.i1, inp.nq, inp.nk, q.device, tl.j1)[:, self.cols]
        else:
            vis = inp.visible(tl.i0, tl.i1, tl.bs, tl.hs, tl.j1)
        self.masked = vis is not None
        self.empty = None  # rows with no visible key (their softmax would be NaN)
        if vis is not None:
            # -inf by adding a small broadcast 0/-inf tensor: much faster on CPU than masked_fill_ with a broadcast
            # mask. Scores are otherwise finite (bias and float-mask values are checked), so -inf <=> masked.
            neg = torch.zeros(vis.shape, dtype=cdt, device=q.device).masked_fill_(~vis, float("-inf"))
            s[..., self.cols].add_(neg)
            if inp.may_have_empty_rows() and self.cols.start == 0:  # (a row with a visible key left of cols is not)
                self.empty = ~vis.any(dim=-1, keepdim=True)
        self.s = s

    def zero_masked(self) -> Tensor:
        """Masked scores (-inf) -> 0 (in place), so that they can be multiplied safely; NaN/+inf stay as they are."""
        if self.masked:
            torch.nan_to_num_(self.s[..., self.cols], nan=float("nan"), posinf=float("inf"), neginf=0.0)
        return self.s


def _tile(t: Tensor, tl: Tile) -> Tensor:
    return tile(t, tl.i0, tl.i1, tl.bs, tl.hs, tl.j1)


def _dropout_keep(inp: AttentionInputs, seed: int, tl: Tile, device: torch.device) -> Tensor:
    return keep_mask(
        seed, inp.dropout_p, inp.batch, inp.heads, inp.nq, inp.nk, tl.i0, tl.i1, device, tl.bs, tl.hs, tl.j1
    )


def _forward_rows(sc: _Scores, norm: bool, want_idx: bool, eps: float):
    """Row math of one forward tile, in place on the tile's scores ``sc.s`` (masked entries -inf).

    Returns ``(w, r, a, b, imin, imax)``: unnormalized weights ``w`` (``s p`` or ``(s - a) p``), the per-row
    factor ``r`` the output still needs (``c`` or None), the clipped range and its arg-min/arg-max keys."""
    s = sc.s
    p = torch.softmax(s, dim=-1)
    if sc.empty is not None:  # rows with no visible key: 0, not NaN
        p.masked_fill_(sc.empty, 0.0)
    a = b = r = imin = imax = None
    if norm:
        if want_idx:
            mx, imax = s.max(dim=-1, keepdim=True)
        else:  # (two passes of amax/amin beat one of aminmax on CPU)
            mx = s.amax(dim=-1, keepdim=True)
    sc.zero_masked()  # never multiply -inf by 0
    if not norm:
        return s.mul_(p), r, a, b, imin, imax
    if want_idx:
        mn, imin = s.min(dim=-1, keepdim=True)
    else:
        mn = s.amin(dim=-1, keepdim=True)
    a, b = mn.clamp(max=0.0), mx.clamp(min=0.0)
    r = 1.0 / (b - a + eps)
    return s.sub_(a).mul_(p), r, a, b, imin, imax


def _backward_rows(sc: _Scores, dP, delta, ab, range_grad: bool, need_w: bool, eps: float):
    """Row math of one backward tile (``sc.s`` recomputed, masked entries -inf; ``dP`` already dropout-scaled;
    ``ab = (a, b)`` per row for the normalized form, None for the plain one).

    Returns ``(ds, w, delta0, c)``: the score gradient without the range terms, the applied weights (for dv),
    ``Delta0 = sum_j p_j dP_j`` (range gradient only) and ``c``."""
    p = torch.softmax(sc.s, dim=-1)
    if sc.empty is not None:
        p.masked_fill_(sc.empty, 0.0)
    s = sc.zero_masked()
    delta0 = c = None
    if ab is not None:
        a, b = ab
        c = 1.0 / (b - a + eps)
        if range_grad:
            delta0 = torch.linalg.vecdot(p, dP, dim=-1).unsqueeze(-1)
        if not need_w:
            ds = torch.addcmul((1.0 - a) * c, s, c)  # c (1 + s - a)
            return ds.mul_(dP).sub_(delta).mul_(p), None, delta0, c
        w = torch.addcmul(-a * c, s, c).mul_(p)  # (s - a) c p, in [0, 1]
        ds = torch.addcmul(w, p, c)  # c (1 + s - a) p
        return ds.mul_(dP).addcmul_(p, delta, value=-1.0), w, delta0, c
    # plain: ds = p (dP + (s dP - Delta)), with Delta = sum_j w_j dP_j taken from this tile rather than g.o: the two
    # large terms s dP and Delta then carry the same rounding and cancel cleanly when |s| is large.
    w = s * p
    delta = torch.linalg.vecdot(w, dP, dim=-1).unsqueeze(-1)
    ds = s.mul_(dP).sub_(delta).add_(dP).mul_(p)
    return ds, w, delta0, c


# Tiles run on several threads (each op single-threaded) when a CPU call is at least this big: small element-wise
# ops split over OpenMP threads scale poorly, independent tiles scale well.
PARALLEL_MIN_SCORES = 1 << 22
_EXECUTOR: ThreadPoolExecutor | None = None


def _workers(tiles: list[Tile], inp: AttentionInputs) -> int:
    """How many threads process the tiles of this call (1 = in the caller's thread, ops use torch's threads).

    ``SASOFTMAX_TILE_THREADS`` caps it (``1`` turns the tile threads off, e.g. when several Python threads call
    sa_attention at once); by default it is ``torch.get_num_threads()``."""
    threads = torch.get_num_threads()
    cap = positive_int("SASOFTMAX_TILE_THREADS")
    if cap is not None:
        threads = min(threads, cap)
    if threads <= 1 or inp.q.device.type != "cpu" or len(tiles) < 2:
        return 1
    if inp.batch * inp.heads * inp.nq * inp.nk < PARALLEL_MIN_SCORES:
        return 1
    groups = len({(tl.bs.start, tl.ks.start) for tl in tiles})
    return max(1, min(threads, groups))


def _for_each_tile(fn, tiles: list[Tile], inp: AttentionInputs, workers: int | None = None) -> None:
    """Run ``fn(tile, worker)`` over all tiles. With several workers, tiles that share a (batch, key/value-head)
    range go to the same worker, so the dk/dv accumulators of one head are only ever written by one thread.
    While the workers run, torch's intra-op thread count is 1 (process-wide) and is restored afterwards."""
    global _EXECUTOR
    workers = _workers(tiles, inp) if workers is None else workers
    if workers <= 1:
        for tl in tiles:
            fn(tl, 0)
        return
    fn(tiles[0], 0)  # first tile in the caller's thread: any one-off work (e.g. compiling) happens once, here
    groups: dict[tuple, list[Tile]] = {}
    for tl in tiles[1:]:
        groups.setdefault((tl.bs.start, tl.ks.start), []).append(tl)
    lanes: list[list[Tile]] = [[] for _ in range(workers)]
    first_group = (tiles[0].bs.start, tiles[0].ks.start)
    if first_group in groups:  # the rest of tile 0's group stays on worker 0
        lanes[0].extend(groups.pop(first_group))
    for group in groups.values():
        min(lanes, key=len).extend(group)
    grad_enabled = torch.is_grad_enabled()

    def lane(i: int) -> None:
        with torch.set_grad_enabled(grad_enabled):
            for tl in lanes[i]:
                fn(tl, i)

    if _EXECUTOR is None or _EXECUTOR._max_workers < workers:
        _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sasoftmax-tile")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for f in [_EXECUTOR.submit(lane, i) for i in range(workers)]:
            f.result()
    finally:
        torch.set_num_threads(threads)


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

    def one(tl: Tile, worker: int) -> None:
        sc = _Scores(inp, q, bias, tl)
        rows = (tl.bs, tl.hs, slice(tl.i0, tl.i1))
        w, r, a, b, imin, imax = _forward_rows(sc, norm, want_idx, inp.eps)
        if a_all is not None and b_all is not None:
            a_all[rows], b_all[rows] = a, b
        if i_min is not None and i_max is not None:
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

    _for_each_tile(one, tiles, inp)
    return out, (a_all, b_all, i_min, i_max)


def _seed(t: Tensor | None) -> int | None:
    return None if t is None else int(t.item())


def _forward(a: FwdArgs) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, stats, idx)``: ``stats = [a, b]`` per row (normalized form) and ``idx = [arg-min, arg-max]``
    (differentiated range), each ``(B, Hq, Nq, 2)`` when ``need_stats`` (a backward will follow), else empty."""
    inp = inputs_of(a)
    tiles = plan_tiles(inp, rows=a.block_rows or None)
    out, (a_all, b_all, i_min, i_max) = _forward_tiles(inp, tiles, _seed(a.seed), with_stats=a.need_stats)
    stats = torch.cat([a_all, b_all], dim=-1) if a_all is not None else out.new_empty(0, dtype=inp.compute_dtype)
    idx = torch.cat([i_min, i_max], dim=-1) if i_min is not None else out.new_empty(0, dtype=torch.long)
    return out, stats, idx


def _stats_shapes(a: FwdArgs):
    B, Hq, Nq = a.q.shape[0], a.q.shape[1], a.q.shape[2]
    keep_stats = a.need_stats and a.normalize
    keep_idx = keep_stats and not a.detach_range
    return (((B, Hq, Nq, 2) if keep_stats else (0,), stats_dtype(a)),
            ((B, Hq, Nq, 2) if keep_idx else (0,), torch.int64))


def _backward(a: BwdArgs):
    """``(dq, dk, dv, dbias)`` for the inputs flagged ``need_*`` (None for the others), from the forward's ``out``,
    ``stats`` and ``idx``."""
    inp = inputs_of(a)
    seed, block_rows, grad_out, out, stats, idx = _seed(a.seed), a.block_rows or None, a.grad_out, a.out, a.stats, a.idx
    needs = (a.need_dq, a.need_dk, a.need_dv, a.need_dbias)
    q, k, v, bias = inp.q, inp.k, inp.v, inp.bias
    cdt, G = inp.compute_dtype, inp.groups
    norm, range_grad = inp.normalize, inp.normalize and not inp.detach_range
    need_q, need_k, need_v, need_bias = needs
    need_bias = need_bias and bias is not None
    tiles = plan_tiles(inp, rows=block_rows)
    a_all, b_all = (stats[..., 0:1], stats[..., 1:2]) if norm else (None, None)
    i_min, i_max = (idx[..., 0:1], idx[..., 1:2]) if range_grad else (None, None)
    # Scores are recomputed exactly as in the forward; everything after runs in the compute dtype.
    kc, vc, qc = k.to(cdt), v.to(cdt), q.to(cdt)
    g_all = grad_out.to(cdt)
    delta_all = (g_all * out.to(cdt)).sum(dim=-1, keepdim=True)  # Delta = g . o per row
    dq = torch.empty_like(qc, memory_format=torch.contiguous_format) if need_q else None
    # dk and dv accumulate transposed, (B, Hkv, D, Nk): the products then read the tile in its natural layout
    dkT = kc.new_zeros(kc.shape[0], kc.shape[1], kc.shape[3], kc.shape[2]) if need_k else None
    dvT = vc.new_zeros(vc.shape[0], vc.shape[1], vc.shape[3], vc.shape[2]) if need_v else None
    dbias = torch.zeros(bias.shape, dtype=cdt, device=q.device) if need_bias and bias is not None else None
    workers = _workers(tiles, inp)
    # a broadcast bias is shared between tiles of different workers: each worker sums into its own buffer
    dbias_w = None if dbias is None else [dbias] + [torch.zeros_like(dbias) for _ in range(workers - 1)]

    def one(tl: Tile, worker: int) -> None:
        sc = _Scores(inp, q, bias, tl, backward=True)
        rows = (tl.bs, tl.hs, slice(tl.i0, tl.i1))
        g = g_all[rows]
        g3 = _mm_in(g, G)
        delta = delta_all[rows]
        dP = _mm_out(torch.bmm(g3, _kv3(vc, tl).transpose(1, 2)), sc.b, sc.h)
        keep = None
        if seed is not None:
            keep = _dropout_keep(inp, seed, tl, q.device).to(cdt).mul_(1.0 / (1.0 - inp.dropout_p))
            dP.mul_(keep)
        ab = None if a_all is None or b_all is None else (a_all[rows], b_all[rows])
        ds, w, delta0, c = _backward_rows(sc, dP, delta, ab, range_grad, dvT is not None, inp.eps)
        if i_min is not None and i_max is not None and ab is not None and c is not None and delta0 is not None:
            a, b = ab  # the range terms (contract section 2) at the arg-min / arg-max keys
            ds.scatter_add_(-1, i_min[rows], c * (delta - delta0) * (a < 0))
            ds.scatter_add_(-1, i_max[rows], -c * delta * (b > 0))
        if dvT is not None:
            if keep is not None:
                w.mul_(keep)
            _acc3(dvT, tl).baddbmm_(g3.transpose(1, 2), _mm_in(w, G))
        if dbias_w is not None:  # the bias is added after soft-capping: its gradient is ds itself
            _accumulate_bias_grad(dbias_w[worker], ds, tl)
        if sc.cap_grad is not None:
            ds.mul_(sc.cap_grad)
        ds3 = _mm_in(ds, G)
        if dq is not None:
            dq[rows] = _mm_out(torch.bmm(ds3, _kv3(kc, tl)), sc.b, sc.h).mul_(inp.scale)
        if dkT is not None:
            q3 = sc.q3 if sc.q3.dtype == cdt else _mm_in(qc[rows], G)
            _acc3(dkT, tl).baddbmm_(q3.transpose(1, 2), ds3, alpha=inp.scale)

    _for_each_tile(one, tiles, inp, workers)
    if dbias is not None and dbias_w is not None:
        for extra in dbias_w[1:]:
            dbias += extra
    return (
        None if dq is None else dq.to(q.dtype),
        None if dkT is None else dkT.transpose(-1, -2).to(k.dtype, memory_format=torch.contiguous_format),
        None if dvT is None else dvT.transpose(-1, -2).to(v.dtype, memory_format=torch.contiguous_format),
        None if dbias is None or bias is None else dbias.to(bias.dtype),
    )


def _accumulate_bias_grad(dbias: Tensor, ds: Tensor, tl: Tile) -> None:
    """Add the tile's ``ds`` into the bias gradient, summing over the bias's broadcast dims."""
    dims = [d for d in range(4) if dbias.shape[d] == 1 and ds.shape[d] != 1]
    red = ds.sum(dim=dims, keepdim=True) if dims else ds
    _tile(dbias, tl).add_(red)


_OP = define_attention_op("chunked", _forward, _backward, _stats_shapes)


def load_error() -> str | None:
    """Always available (plain torch operations)."""
    return None


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """Runs every call."""
    return None


def run(inp: AttentionInputs, block_size: int | None = None) -> Tensor:
    """Memory-efficient SA attention (the ``sasoftmax::chunked_fwd`` custom op); ``block_size`` fixes the query rows
    per tile (default: sized automatically). Returns ``(B, Hq, Nq, Dv)``."""
    return _OP(inp, block_size)
