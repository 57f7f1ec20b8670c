"""Triton kernels of the fused SA attention (FlashAttention-2 structure, ``docs/contract.md`` section 3).

This module needs ``triton`` and is imported by :mod:`sasoftmax.attention.backends.triton`. Whether the kernels run
on the GPU or under the Triton interpreter is decided when this module is imported: ``TRITON_INTERPRET=1`` must be
set in the environment before that (``INTERPRET`` records what was seen).

Kernels (``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``). Every grid is one-dimensional
(axis 0 holds ``blocks x (batch, head)``, so no launch ever meets CUDA's 65535 limit of axes 1 and 2); a program
splits its id into the block and the (batch, head) it works on. Matrix products per inner-loop iteration are in
brackets.

* ``sa_fwd``: one program per (block of ``BLOCK_M`` query rows, batch * query head).
  Plain form, one pass [2]: FlashAttention-2 with ``s e`` in place of ``e`` (``acc += (s e) V``, rescaled when the
  running max grows). Normalized form, two passes over the key blocks: pass 1 [1] computes the row statistics (running
  max ``m``, sum ``l``, minimum and, for the range gradient, the arg-min/arg-max key); pass 2 [2] computes the exact
  weights ``w = (s - a) c exp(s - m) / l`` and one accumulator ``acc += w V`` (no rescaling, no cancellation: the
  arg-min key's weight is exactly 0). Exponentials are ``exp2`` with ``log2 e`` folded into the max subtraction.
  Writes the output in the input dtype and per row ``m log2 e``, ``1 / l``, ``a``, ``b``,
  ``c`` (and the arg-min/arg-max key).
* ``sa_bwd_pre``: ``Delta = rowsum(dO * O)`` in float32; zeroes the ``dq`` accumulator (fast path).
* ``sa_bwd_kv``: one program per (block of ``BLOCK_N`` keys, batch * key/value head), looping over the ``G`` query
  heads of its group and the query blocks; computes ``K Q^T`` directly (tiles are ``(BLOCK_N, BLOCK_M)``), ``dk``,
  ``dv`` in registers and, on the fast path, adds ``dq`` with atomics [5: K Q^T, V dO^T, dv, dk, dq]; on the
  deterministic path [4] ``dq`` comes from ``sa_bwd_dq`` and the range terms are added to the ``ds`` tile in place.
* ``sa_bwd_dq`` (deterministic path): one program per query block [3: Q K^T, dO V^T, dq]; computes the exact row sums
  of the range correction, and in its epilogue gathers the arg-min/arg-max key rows for ``dq``.
* ``sa_bwd_post`` (fast path): ``dq = scale * acc`` in the input dtype; with the range gradient, the sparse
  correction: ``dq`` gathers the arg-min/arg-max key rows, ``dk`` and the bias gradient get them by atomics.

Scores ``s = scale * q.k + float-mask + bias + ALiBi`` (with soft-capping ``cap * tanh(scale * q.k / cap)`` in place
of the product) are computed in float32; masked keys (causal, sliding window, bool mask, masked float-mask entries,
out-of-range positions) take no part in the softmax or the min/max and get weight 0. With soft-capping the gradient
of the product is ``dL/ds (1 - tanh^2)``; the bias keeps ``dL/ds``. A window bounds every loop: the forward and the
dq kernel start at the block of the first key the query block's first row sees and stop after the last key its last
row sees; the key/value kernel likewise bounds its query rows.
Each loop is split: tiles whose keys are all in range and (causal) visible to every row run a ``FULL`` variant
without masking; only the boundary tiles compute masks. ``N_BUCKET`` is not used by the kernels; it is the
power-of-two length bucket that keys the optional autotuning.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

# The dropout threshold is passed as ``value | 2**32`` so that Triton always types it int64 (it types an int by its
# value); it is also excluded from value specialization. The seed is read from a tensor (no host round trip).
_DROPOUT_ARGS = ["drop_thr"]


# ----------------------------------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 (wrapping products), as in :mod:`sasoftmax.attention.dropout`."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _load_seed(Seed, HAS_DROPOUT: tl.constexpr):
    """The two 32-bit halves of the 62-bit dropout seed stored in ``Seed[0]`` (zeros without dropout)."""
    lo = tl.zeros([], dtype=tl.uint32)
    hi = tl.zeros([], dtype=tl.uint32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return lo, hi


@triton.jit
def _dropout_keep(rows, cols, Nk, seed_lo, seed_hi, drop_thr):
    """Keep decisions of the scores at flat rows ``rows`` (int64, ``(b H + h) Nq + i``) and keys ``cols``, two
    broadcastable 2-d index arrays. The same counter-based hash as the PyTorch backends: the score's flat index
    ``rows * Nk + j`` is split into 32-bit halves and mixed with the seed, so every backend, block size and tile
    orientation drops exactly the same entries and the backward regenerates the forward's mask. (A 64-bit index per
    score: its add-with-carry costs fewer registers than splitting a per-row base into 32-bit halves with an explicit
    carry, which ptxas -v showed spilling more.)"""
    idx = rows * Nk + cols
    lo = idx.to(tl.uint32)  # truncation keeps the low 32 bits
    hi = (idx >> 32).to(tl.uint32)
    h = _fmix32(lo ^ seed_lo)
    h = _fmix32(h ^ hi ^ seed_hi)
    return h >= drop_thr.to(tl.uint32)


@triton.jit
def _scores(
    qk, rm, cn, off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n,
    MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n,
    Slopes, ssl_b, ssl_h, win_left, win_right, cap,
    IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FULL: tl.constexpr,
):
    """Scores (float32, the shape of ``qk``) of a tile and its visibility (True = the key takes part). ``rm`` and
    ``cn`` are the query-row and key indices as broadcastable 2-d arrays (``(M, 1)``/``(1, N)`` for a ``Q K^T`` tile,
    ``(1, M)``/``(N, 1)`` for a ``K Q^T`` tile).

    ``FULL``: the caller guarantees that every key of the tile is in range and (causal) visible to every row of the
    tile, so only the row range (for safe loads), a bool mask and the window remain; ``vis`` may then have the shape
    of ``rm``. Scores are finite everywhere (masked loads read 0), so ``0 * s`` is always 0.

    Window: query ``i`` sees keys ``pos - win_left <= j <= pos + win_right`` with ``pos = i + Nk - Nq`` (an
    unbounded side comes as a value larger than any distance). Soft-capping: the scaled product becomes
    ``cap * tanh(scale q.k / cap)`` before the other terms; ``dcap`` is its derivative ``1 - tanh^2``, the factor
    between ``dL/ds`` and the product's gradient (returned unchanged as ``qk`` without soft-capping: unused)."""
    s = qk * scale
    dcap = qk
    if HAS_SOFTCAP:
        t, dcap = _tanh_grad(s / cap)
        s = t * cap
    in_m = rm < Nq
    if FULL:
        inb = in_m
        vis = in_m
    else:
        inb = in_m & (cn < Nk)
        vis = inb
        if IS_CAUSAL:
            vis = vis & (cn <= rm + (Nk - Nq))
    if HAS_WINDOW:
        vis = vis & (cn >= rm + (Nk - Nq) - win_left) & (cn <= rm + (Nk - Nq) + win_right)
    if HAS_KEEP:
        kp = tl.load(Keep + off_b * skp_b + off_h * skp_h + rm * skp_m + cn * skp_n, mask=inb, other=0)
        vis = vis & (kp != 0)
    if HAS_MADD:
        s += tl.load(MaskAdd + off_b * sma_b + off_h * sma_h + rm * sma_m + cn * sma_n,
                     mask=inb, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(Bias + off_b * sbi_b + off_h * sbi_h + rm * sbi_m + cn * sbi_n,
                     mask=inb, other=0.0).to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * ssl_b + off_h * ssl_h).to(tl.float32)
        s += -slope * tl.abs(rm + (Nk - Nq) - cn).to(tl.float32)
    return s, vis, dcap


@triton.jit
def _tanh_grad(x):
    """``(tanh x, 1 - tanh^2 x)`` in float32 to about an ulp, from ``exp2`` alone (the interpreter has no libdevice):
    the odd Taylor series to ``x^15`` below ``|x| = 0.55`` (next term < 5e-8 relative), else ``(1 - e) / (1 + e)``
    with ``e = exp(-2|x|) <= 1/3`` (no cancellation), whose derivative ``4 e / (1 + e)^2`` keeps its relative
    accuracy where ``tanh`` saturates (``1 - t^2`` from a rounded ``t`` would not)."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * (-2.0 * LOG2E))
    r = 1.0 / (1.0 + e)
    t_big = (1.0 - e) * r
    g_big = 4.0 * e * r * r
    xs = tl.minimum(ax, 0.55)  # (the series only where it is used: no overflow beyond)
    x2 = xs * xs
    p = -0.0014558343870513183 * x2 + 0.003592128036572481
    p = p * x2 - 0.008863235529902197
    p = p * x2 + 0.021869488536155203
    p = p * x2 - 0.05396825396825397
    p = p * x2 + 0.13333333333333333
    p = p * x2 - 0.3333333333333333
    t_small = xs + xs * x2 * p
    small = ax < 0.55
    t = tl.where(small, t_small, t_big)
    g = tl.where(small, 1.0 - t_small * t_small, g_big)
    return tl.where(x < 0.0, -t, t), g


@triton.jit
def _split_pid(pid, n_rows, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """``(block index, batch-head index)`` of a program of a one-dimensional grid of ``cdiv(n_rows, BLOCK)`` blocks
    per (batch, head). ``REVERSE`` hands the last (for causal attention the heaviest) blocks out first."""
    n_blk = tl.cdiv(n_rows, BLOCK)
    pid_bh = pid // n_blk
    pid_blk = pid % n_blk
    if REVERSE:
        pid_blk = n_blk - 1 - pid_blk
    return pid_blk, pid_bh


@triton.jit
def _row_range(start_m, Nq, Nk, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key range of a query block: ``(lo, full_hi, hi)``: no row of the block sees a key below ``lo`` or from ``hi``
    on; keys in ``[lo, full_hi)`` are in range and (causal) visible to every row, up to the window. ``lo`` and
    ``full_hi`` are multiples of ``BLOCK_N``, ``lo <= max(lo, full_hi)``."""
    if IS_CAUSAL:
        # the last row of the block sees keys up to Nk - Nq + start_m + BLOCK_M - 1, its first row up to
        # Nk - Nq + start_m
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + Nk - Nq, 0))
        full_hi = tl.minimum(Nk, tl.maximum(start_m + Nk - Nq + 1, 0))
    else:
        hi = Nk
        full_hi = Nk
    lo = 0
    if HAS_WINDOW:
        # the block's first row sees keys from Nk - Nq + start_m - win_left on, its last row up to
        # Nk - Nq + start_m + BLOCK_M - 1 + win_right
        lo = (tl.maximum(start_m + Nk - Nq - win_left, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + Nk - Nq + win_right, 0))
        full_hi = tl.minimum(full_hi, hi)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    return lo, full_hi, hi


@triton.jit
def _row_stats(stat, m_ok, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr, RangeA, RangeB, RangeC, IdxMin,
               IdxMax):
    """Per-row ``a``, ``b``, ``c`` and arg-min/arg-max key of the normalized form (zeros otherwise)."""
    zero = tl.zeros(m_ok.shape, dtype=tl.float32)
    ra = zero
    rb = zero
    rc = zero
    i_min = tl.zeros(m_ok.shape, dtype=tl.int32)
    i_max = i_min
    if NORMALIZE:
        ra = tl.load(RangeA + stat, mask=m_ok, other=0.0)
        rb = tl.load(RangeB + stat, mask=m_ok, other=0.0)
        rc = tl.load(RangeC + stat, mask=m_ok, other=0.0)
        if RANGE_GRAD:
            i_min = tl.load(IdxMin + stat, mask=m_ok, other=-1)
            i_max = tl.load(IdxMax + stat, mask=m_ok, other=-1)
    return ra, rb, rc, i_min, i_max


@triton.jit
def _ds(
    s, vis, dp, m2, il, delta, ra, rb, rc, i_min, i_max, cn, eps, keep, drop_scale,
    NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_WINDOW: tl.constexpr, FULL: tl.constexpr,
):
    """The backward of one tile from its scores ``s`` and ``dp = dO v`` (either orientation; the row vectors ``m2``
    (row max times log2 e), ``il`` (1 / softmax sum), ``delta``, ``ra``, ``rb``, ``rc``, ``i_min``, ``i_max`` come
    already broadcast along the key axis). ``p = exp2(s log2e - m2) * il``; the factor ``il`` is folded into the row
    constants, so this costs no more than ``exp(s - lse)`` and keeps ``sum p = 1`` to a few ulps (a rounded lse
    would shift every ``p`` of the row by the same relative error).

    Returns ``(wd, ds, e, dp, w, at_min, at_max)``: the weights applied to ``v`` (after dropout; what multiplies
    ``dO`` for ``dv``), ``ds = dL/ds`` without the sparse range terms, ``e = p l`` (the softmax times the row's sum),
    ``dp`` after dropout, the SA weights ``w`` and where the row's arg-min (if ``a < 0``) / arg-max
    (if ``b > 0``) key is. With ``RANGE_GRAD`` the factor at those two keys is taken without the part that the range
    correction cancels exactly (``c`` at the arg-min, ``c (1 - c eps)`` at the arg-max), so that no O(c) terms cancel
    in floating point: the correction added afterwards is then ``c (Delta - sum_{j != argmin} p dp)`` and
    ``-c sum_{j != argmax} w dp``."""
    if FULL and not HAS_KEEP and not HAS_WINDOW:  # every key visible; rows past Nq have m2 = +inf: e = 0 there
        e = tl.math.exp2(s * LOG2E - m2)
    else:
        e = tl.math.exp2(tl.where(vis, s, float("-inf")) * LOG2E - m2)  # m2 = +inf on empty rows -> 0
    if HAS_DROPOUT:
        dp = tl.where(keep, dp * drop_scale, 0.0)
    at_min = cn < 0  # all False unless RANGE_GRAD
    at_max = cn < 0
    if NORMALIZE:
        cl = rc * il
        fw = (s - ra) * cl  # fac_w / l
        fac = fw + cl  # fac / l
        if RANGE_GRAD:
            at_min = (cn == i_min) & (ra < 0.0)
            at_max = (cn == i_max) & (rb > 0.0)
            fac = tl.where(at_min, fw, fac)
            fac = tl.where(at_max, fw + cl * rc * eps, fac)
    else:
        fw = s * il
        fac = fw + il
    ds = e * (fac * dp - delta * il)
    w = fw * e
    wd = w
    if HAS_DROPOUT:
        wd = tl.where(keep, w * drop_scale, 0.0)
    return wd, ds, e, dp, w, at_min, at_max


# ----------------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_stats_tile(
    q, k_base, sk_n, sk_d, start_n, offs_n0, offs_m, offs_d, D, off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
    m_i, mn_i, l_i, i_max, i_min,
    IS_CAUSAL: tl.constexpr, RANGE_GRAD: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr, FULL: tl.constexpr,
):
    """Pass 1 of the normalized forward, one key block: running max, sum, minimum (and arg-min/arg-max)."""
    offs_n = start_n + offs_n0
    kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d,
                 mask=(offs_n[None, :] < Nk) & (offs_d[:, None] < D), other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PREC)
    s, vis, dcap = _scores(
        qk, offs_m[:, None], offs_n[None, :], off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
        IS_CAUSAL, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, FULL,
    )
    if FULL and not HAS_KEEP and not HAS_WINDOW:  # every key visible (rows past Nq are never stored)
        s_ninf = s
        s_pinf = s
    else:
        s_ninf = tl.where(vis, s, float("-inf"))
        s_pinf = tl.where(vis, s, float("inf"))
    if RANGE_GRAD:
        b_max, a_max = tl.max(s_ninf, 1, return_indices=True)
        b_min, a_min = tl.min(s_pinf, 1, return_indices=True)
        i_max = tl.where(b_max > m_i, a_max.to(tl.int32) + start_n, i_max)
        i_min = tl.where(b_min < mn_i, a_min.to(tl.int32) + start_n, i_min)
    else:
        b_max = tl.max(s_ninf, 1)
        b_min = tl.min(s_pinf, 1)
    mn_i = tl.minimum(mn_i, b_min)
    m_new = tl.maximum(m_i, b_max)
    m2 = tl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E
    alpha = tl.math.exp2(m_i * LOG2E - m2)
    l_i = l_i * alpha + tl.sum(tl.math.exp2(s_ninf * LOG2E - m2[:, None]), 1)
    return m_new, mn_i, l_i, i_max, i_min


@triton.jit
def _fwd_acc_tile(
    q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
    off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
    acc, m_i, l_i, m2, ra, cl, row_base, seed_lo, seed_hi, drop_thr,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    FULL: tl.constexpr,
):
    """One key block of the accumulating pass: normalized, pass 2 with the exact weights ``(s - a) (c / l)
    exp2(s log2e - m2)`` (``m_i``, ``l_i`` unused);
    plain, FlashAttention-2's online softmax with ``s e`` in place of ``e``. Dropout zeroes the dropped weights (not
    the softmax sum); the caller applies ``1 / (1 - p)``."""
    offs_n = start_n + offs_n0
    kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d,
                 mask=(offs_n[None, :] < Nk) & (offs_d[:, None] < D), other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PREC)
    s, vis, dcap = _scores(
        qk, offs_m[:, None], offs_n[None, :], off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
        IS_CAUSAL, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, FULL,
    )
    if FULL and not HAS_KEEP and not HAS_WINDOW:
        s_ninf = s
    else:
        s_ninf = tl.where(vis, s, float("-inf"))
    if NORMALIZE:
        # exact weights; 0 where masked (p = 0 and s finite), exactly 0 at the arg-min key (s == a)
        w = (s - ra[:, None]) * (cl[:, None] * tl.math.exp2(s_ninf * LOG2E - m2[:, None]))
    else:
        m_new = tl.maximum(m_i, tl.max(s_ninf, 1))
        m2 = tl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E
        alpha = tl.math.exp2(m_i * LOG2E - m2)
        e = tl.math.exp2(s_ninf * LOG2E - m2[:, None])
        l_i = l_i * alpha + tl.sum(e, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        w = s * e
    if HAS_DROPOUT:
        keep = _dropout_keep((row_base + offs_m.to(tl.int64))[:, None], offs_n[None, :], Nk, seed_lo, seed_hi,
                             drop_thr)
        w = tl.where(keep, w, 0.0)
    v = tl.load(v_base + offs_n[:, None] * sv_n + offs_dv[None, :] * sv_d,
                mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)
    acc += tl.dot(w.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def sa_fwd(
    Q, K, V, Out, RowM, RowL, RangeA, RangeB, RangeC, IdxMin, IdxMax,
    Keep, MaskAdd, Bias, Slopes, Seed,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_m, so_d,
    skp_b, skp_h, skp_m, skp_n,
    sma_b, sma_h, sma_m, sma_n,
    sbi_b, sbi_h, sbi_m, sbi_n,
    ssl_b, ssl_h,
    H, G, Nq, Nk, D, DV, scale, eps, N_BUCKET, drop_thr, drop_scale, win_left, win_right, cap,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, pid_bh = _split_pid(tl.program_id(0), Nq, BLOCK_M, IS_CAUSAL)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_base = pid_bh.to(tl.int64) * Nq
    seed_lo, seed_hi = _load_seed(Seed, HAS_DROPOUT)

    q = tl.load(Q + off_b * sq_b + off_h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    k_base = K + off_b * sk_b + off_hkv * sk_h
    v_base = V + off_b * sv_b + off_hkv * sv_h
    lo, full_hi, hi = _row_range(start_m, Nq, Nk, win_left, win_right, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    mid = tl.maximum(lo, full_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    zero_m = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = zero_m
    ra = zero_m
    cl = zero_m
    row_ok = offs_m < Nq
    stat = row_base + offs_m

    if NORMALIZE:
        # pass 1: statistics only (one matrix product per key block)
        mn_i = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        i_max = tl.zeros([BLOCK_M], dtype=tl.int32)
        i_min = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start_n in range(lo, full_hi, BLOCK_N):
            m_i, mn_i, l_i, i_max, i_min = _fwd_stats_tile(
                q, k_base, sk_n, sk_d, start_n, offs_n0, offs_m, offs_d, D, off_b, off_h, Nq, Nk, scale,
                Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
                Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap, m_i, mn_i, l_i,
                i_max, i_min,
                IS_CAUSAL, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, DOT_PREC, True,
            )
        for start_n in range(mid, hi, BLOCK_N):
            m_i, mn_i, l_i, i_max, i_min = _fwd_stats_tile(
                q, k_base, sk_n, sk_d, start_n, offs_n0, offs_m, offs_d, D, off_b, off_h, Nq, Nk, scale,
                Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
                Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap, m_i, mn_i, l_i,
                i_max, i_min,
                IS_CAUSAL, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, DOT_PREC,
                False,
            )
        empty = l_i == 0.0
        # the same m2 as the last update of l_i (so that sum p = 1 to a few ulps)
        m2 = tl.where(empty, float("inf"), m_i * LOG2E)
        il = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
        ra = tl.minimum(mn_i, 0.0)
        rb = tl.maximum(m_i, 0.0)
        rc = tl.where(empty, 0.0, 1.0 / (rb - ra + eps))
        cl = rc * il
        tl.store(RangeA + stat, ra, mask=row_ok)
        tl.store(RangeB + stat, rb, mask=row_ok)
        tl.store(RangeC + stat, rc, mask=row_ok)
        if RANGE_GRAD:
            tl.store(IdxMin + stat, i_min, mask=row_ok)
            tl.store(IdxMax + stat, i_max, mask=row_ok)

    # the accumulating pass (normalized: pass 2; plain: the only pass)
    for start_n in range(lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_acc_tile(
            q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
            acc, m_i, l_i, m2, ra, cl, row_base, seed_lo, seed_hi, drop_thr,
            IS_CAUSAL, NORMALIZE, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT,
            DOT_PREC, True,
        )
    for start_n in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_acc_tile(
            q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
            acc, m_i, l_i, m2, ra, cl, row_base, seed_lo, seed_hi, drop_thr,
            IS_CAUSAL, NORMALIZE, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, HAS_DROPOUT,
            DOT_PREC, False,
        )

    if NORMALIZE:
        o = acc
    else:
        empty = l_i == 0.0
        il = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
        o = acc * il[:, None]
        m2 = tl.where(empty, float("inf"), m_i * LOG2E)
    if HAS_DROPOUT:
        o = o * drop_scale
    tl.store(RowM + stat, m2, mask=row_ok)
    tl.store(RowL + stat, il, mask=row_ok)
    o_off = off_b * so_b + off_h * so_h + offs_m[:, None] * so_m + offs_dv[None, :] * so_d
    o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(Out + o_off, o.to(Out.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def sa_bwd_pre(
    Out, DO, Delta, DQacc, RowA, RowB,
    so_b, so_h, so_m, so_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    H, Nq, D, DV,
    ZERO_DQ: tl.constexpr, ZERO_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``Delta = rowsum(dO * O)`` (float32 sums of the output in its own dtype); zeroes the float32
    ``dq`` accumulator (contiguous ``(B, H, Nq, D)``) and the range-correction row sums of the fast path."""
    pid_m, pid_bh = _split_pid(tl.program_id(0), Nq, BLOCK_M, False)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    o_off = off_b * so_b + off_h * so_h + offs_m[:, None] * so_m + offs_dv[None, :] * so_d
    o = tl.load(Out + o_off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdo_b + off_h * sdo_h + offs_m[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                 mask=mask, other=0.0).to(tl.float32)
    stat = pid_bh.to(tl.int64) * Nq + offs_m
    tl.store(Delta + stat, tl.sum(o * do, 1), mask=m_ok)
    if ZERO_DQ:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(DQacc + stat[:, None] * D + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                 mask=m_ok[:, None] & (offs_d[None, :] < D))
    if ZERO_ROWS:
        zero = tl.zeros([BLOCK_M], dtype=tl.float32)
        tl.store(RowA + stat, zero, mask=m_ok)
        tl.store(RowB + stat, zero, mask=m_ok)


@triton.jit
def _kv_tile(
    q_base, do_base, sq_m, sq_d, sdo_m, sdo_d, RowM, RowL, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, DA, DB,
    RowA, RowB, dq_base, DBias, sdb_b, sdb_h, sdb_m, sdb_n, stat_base, start_m, offs_m0, offs_n, offs_d, offs_dv,
    n_ok, pid_n, k, v, dk, dv, db_acc, D, DV, off_b, off_h, Nq, Nk, scale, eps,
    Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
    seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_BCAST_M: tl.constexpr, DB_BCAST_N: tl.constexpr, DB_ATOMIC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, NEED_DQ: tl.constexpr, NEED_KV: tl.constexpr,
    DOT_PREC: tl.constexpr, FULL: tl.constexpr,
):
    """One query block of the key/value kernel, in the transposed orientation (``(BLOCK_N, BLOCK_M)`` tiles)."""
    offs_m = start_m + offs_m0
    m_ok = offs_m < Nq
    qt = tl.load(q_base + offs_m[None, :] * sq_m + offs_d[:, None] * sq_d,
                 mask=m_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    dot_ = tl.load(do_base + offs_m[None, :] * sdo_m + offs_dv[:, None] * sdo_d,
                   mask=m_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    stat = stat_base + offs_m
    m2 = tl.load(RowM + stat, mask=m_ok, other=float("inf"))
    il = tl.load(RowL + stat, mask=m_ok, other=0.0)
    delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
    ra, rb, rc, i_min, i_max = _row_stats(stat, m_ok, NORMALIZE, RANGE_GRAD, RangeA, RangeB, RangeC, IdxMin, IdxMax)
    rm = offs_m[None, :]
    cn = offs_n[:, None]
    s, vis, dcap = _scores(
        tl.dot(k, qt, input_precision=DOT_PREC), rm, cn, off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
        IS_CAUSAL, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, FULL,
    )
    dp = tl.dot(v, dot_, input_precision=DOT_PREC)
    keep = vis
    if HAS_DROPOUT:
        keep = _dropout_keep(stat.to(tl.int64)[None, :], cn, Nk, seed_lo, seed_hi, drop_thr)
    wd, ds, e, dp, w, at_min, at_max = _ds(
        s, vis, dp, m2[None, :], il[None, :], delta[None, :], ra[None, :], rb[None, :], rc[None, :], i_min[None, :],
        i_max[None, :], cn, eps, keep, drop_scale, NORMALIZE, RANGE_GRAD, HAS_DROPOUT, HAS_KEEP,
        HAS_WINDOW, FULL,
    )
    if RANGE_GRAD:
        if ATOMIC_DQ:  # fast path: partial row sums of the range correction, completed by atomics
            tl.atomic_add(RowA + stat, il * tl.sum(tl.where(at_min, 0.0, e * dp), 0), mask=m_ok, sem="relaxed")
            tl.atomic_add(RowB + stat, tl.sum(tl.where(at_max, 0.0, w * dp), 0), mask=m_ok, sem="relaxed")
        else:  # deterministic path: the range terms (known from the dq kernel) enter ds at their keys
            da = tl.load(DA + stat, mask=m_ok, other=0.0)
            db = tl.load(DB + stat, mask=m_ok, other=0.0)
            ds += tl.where(at_min, da[None, :], 0.0) + tl.where(at_max, db[None, :], 0.0)
    if HAS_SOFTCAP:  # dk and dq see the product's gradient; the bias sees dL/ds
        ds_lo = (ds * dcap).to(qt.dtype)
    else:
        ds_lo = ds.to(qt.dtype)
    if NEED_KV:
        dv += tl.dot(wd.to(dot_.dtype), tl.trans(dot_), input_precision=DOT_PREC)
        dk += tl.dot(ds_lo, tl.trans(qt), input_precision=DOT_PREC)
    if ATOMIC_DQ and NEED_DQ:
        dq = tl.dot(tl.trans(ds_lo), k, input_precision=DOT_PREC)
        tl.atomic_add(dq_base + offs_m[:, None] * D + offs_d[None, :], dq,
                      mask=m_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
    if BIAS_GRAD:
        db_base = DBias + off_b * sdb_b + off_h * sdb_h
        if DB_BCAST_M:  # summed over the rows: accumulated by the caller, written once per head
            if DB_BCAST_N:
                db_acc += tl.sum(tl.sum(ds, 1), 0)
            else:
                db_acc += tl.sum(ds, 1)
        elif DB_BCAST_N:  # summed over the keys: one partial per key block (deterministic) or atomics
            ptrs = db_base + offs_m * sdb_m + pid_n * sdb_n
            if DB_ATOMIC:
                tl.atomic_add(ptrs, tl.sum(ds, 0), mask=m_ok, sem="relaxed")
            else:
                tl.store(ptrs, tl.sum(ds, 0), mask=m_ok)
        else:
            ptrs = db_base + offs_m[None, :] * sdb_m + offs_n[:, None] * sdb_n
            if DB_ATOMIC:
                tl.atomic_add(ptrs, ds, mask=m_ok[None, :] & n_ok[:, None], sem="relaxed")
            else:
                tl.store(ptrs, ds, mask=m_ok[None, :] & n_ok[:, None])
    return dk, dv, db_acc


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def sa_bwd_kv(
    Q, K, V, DO, RowM, RowL, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, DA, DB, RowA, RowB, DQacc, DK, DV_,
    DBias,
    Keep, MaskAdd, Bias, Slopes, Seed,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_n, sdv_d,
    sdb_b, sdb_h, sdb_m, sdb_n,
    skp_b, skp_h, skp_m, skp_n,
    sma_b, sma_h, sma_m, sma_n,
    sbi_b, sbi_h, sbi_m, sbi_n,
    ssl_b, ssl_h,
    H, HKV, G, Nq, Nk, D, DV, scale, eps, N_BUCKET, drop_thr, drop_scale, win_left, win_right, cap,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_BCAST_M: tl.constexpr, DB_BCAST_N: tl.constexpr, DB_ATOMIC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, NEED_DQ: tl.constexpr, NEED_KV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n, pid_bk = _split_pid(tl.program_id(0), Nk, BLOCK_N, False)
    off_b = (pid_bk // HKV).to(tl.int64)
    off_hkv = (pid_bk % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk
    seed_lo, seed_hi = _load_seed(Seed, HAS_DROPOUT)

    k = tl.load(K + off_b * sk_b + off_hkv * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + off_b * sv_b + off_hkv * sv_h + offs_n[:, None] * sv_n + offs_dv[None, :] * sv_d,
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if IS_CAUSAL:
        # the first query row that sees key start_n is start_n - (Nk - Nq); from row start_n + BLOCK_N - 1 - (Nk - Nq)
        # on, every key of the block is visible (no masking needed)
        lo = tl.maximum(start_n - (Nk - Nq), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - (Nk - Nq), lo)
        mid = ((mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    mid = tl.where(start_n + BLOCK_N > Nk, Nq, mid)  # a key block past the end is masked everywhere
    hi_m = Nq
    if HAS_WINDOW:
        # rows that see a key of the block: start_n - (Nk - Nq) - win_right <= i < start_n + BLOCK_N - (Nk - Nq)
        # + win_left
        lo = tl.maximum(lo, (tl.maximum(start_n - (Nk - Nq) - win_right, 0) // BLOCK_M) * BLOCK_M)
        hi_m = tl.minimum(Nq, tl.maximum(start_n + BLOCK_N - (Nk - Nq) + win_left, 0))
        mid = tl.maximum(mid, lo)
    mid_lo = tl.minimum(mid, hi_m)
    for g in range(0, G):
        off_h = off_hkv * G + g
        q_base = Q + off_b * sq_b + off_h * sq_h
        do_base = DO + off_b * sdo_b + off_h * sdo_h
        stat_base = (off_b * H + off_h) * Nq
        dq_base = DQacc + stat_base * D
        if DB_BCAST_N:
            db_acc = tl.zeros([], dtype=tl.float32)
        else:
            db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start_m in range(lo, mid_lo, BLOCK_M):
            dk, dv, db_acc = _kv_tile(
                q_base, do_base, sq_m, sq_d, sdo_m, sdo_d, RowM, RowL, Delta, RangeA, RangeB, RangeC, IdxMin,
                IdxMax, DA,
                DB, RowA, RowB, dq_base, DBias, sdb_b, sdb_h, sdb_m, sdb_n, stat_base, start_m, offs_m0, offs_n,
                offs_d, offs_dv, n_ok, pid_n, k, v, dk, dv, db_acc, D, DV, off_b, off_h, Nq, Nk, scale, eps,
                Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
                Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap, seed_lo, seed_hi,
                drop_thr, drop_scale,
                IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP,
                BIAS_GRAD, DB_BCAST_M, DB_BCAST_N, DB_ATOMIC, HAS_DROPOUT, ATOMIC_DQ, NEED_DQ, NEED_KV, DOT_PREC,
                False,
            )
        for start_m in range(mid, hi_m, BLOCK_M):
            dk, dv, db_acc = _kv_tile(
                q_base, do_base, sq_m, sq_d, sdo_m, sdo_d, RowM, RowL, Delta, RangeA, RangeB, RangeC, IdxMin,
                IdxMax, DA,
                DB, RowA, RowB, dq_base, DBias, sdb_b, sdb_h, sdb_m, sdb_n, stat_base, start_m, offs_m0, offs_n,
                offs_d, offs_dv, n_ok, pid_n, k, v, dk, dv, db_acc, D, DV, off_b, off_h, Nq, Nk, scale, eps,
                Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
                Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap, seed_lo, seed_hi,
                drop_thr, drop_scale,
                IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP,
                BIAS_GRAD, DB_BCAST_M, DB_BCAST_N, DB_ATOMIC, HAS_DROPOUT, ATOMIC_DQ, NEED_DQ, NEED_KV, DOT_PREC,
                True,
            )
        if BIAS_GRAD and DB_BCAST_M:
            db_base = DBias + off_b * sdb_b + off_h * sdb_h
            if DB_BCAST_N:
                if DB_ATOMIC:
                    tl.atomic_add(db_base + pid_n * sdb_n, db_acc, sem="relaxed")
                else:
                    tl.store(db_base + pid_n * sdb_n, db_acc)
            else:
                if DB_ATOMIC:
                    tl.atomic_add(db_base + offs_n * sdb_n, db_acc, mask=n_ok, sem="relaxed")
                else:
                    tl.store(db_base + offs_n * sdb_n, db_acc, mask=n_ok)

    if NEED_KV:  # (without it the kernel only adds dq and the range-correction row sums: q alone needs a gradient)
        dk = dk * scale
        tl.store(DK + off_b * sdk_b + off_hkv * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
                 dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
        tl.store(DV_ + off_b * sdv_b + off_hkv * sdv_h + offs_n[:, None] * sdv_n + offs_dv[None, :] * sdv_d,
                 dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(
    q, do, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
    m2, il, delta, ra, rb, rc, i_min, i_max, eps, dq, r_a, r_b, off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
    stat, seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, FULL: tl.constexpr,
):
    """One key block of the dq kernel: accumulate ``dq`` and the exact row sums of the range correction."""
    offs_n = start_n + offs_n0
    n_ok = offs_n < Nk
    k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + offs_n[:, None] * sv_n + offs_dv[None, :] * sv_d,
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    rm = offs_m[:, None]
    cn = offs_n[None, :]
    s, vis, dcap = _scores(
        tl.dot(q, tl.trans(k), input_precision=DOT_PREC), rm, cn, off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap,
        IS_CAUSAL, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP, FULL,
    )
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    keep = vis
    if HAS_DROPOUT:
        keep = _dropout_keep(stat.to(tl.int64)[:, None], cn, Nk, seed_lo, seed_hi, drop_thr)
    wd, ds, e, dp, w, at_min, at_max = _ds(
        s, vis, dp, m2[:, None], il[:, None], delta[:, None], ra[:, None], rb[:, None], rc[:, None], i_min[:, None],
        i_max[:, None], cn, eps, keep, drop_scale, NORMALIZE, RANGE_GRAD, HAS_DROPOUT, HAS_KEEP,
        HAS_WINDOW, FULL,
    )
    if HAS_SOFTCAP:
        ds = ds * dcap
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    if RANGE_GRAD:
        r_a += il * tl.sum(tl.where(at_min, 0.0, e * dp), 1)
        r_b += tl.sum(tl.where(at_max, 0.0, w * dp), 1)
    return dq, r_a, r_b


@triton.jit
def _range_terms(delta, ra, rb, rc, r_a, r_b):
    """``dL/da`` (at the arg-min key, if ``a < 0``) and ``dL/db`` (at the arg-max key, if ``b > 0``) from the row sums
    ``r_a = sum_{j != argmin} p dP`` and ``r_b = sum_{j != argmax} w dP`` (see ``_ds``)."""
    da = tl.where(ra < 0.0, rc * (delta - r_a), 0.0)
    db = tl.where(rb > 0.0, -rc * r_b, 0.0)
    return da, db


@triton.jit
def _gather_keys(dq, da, db, i_min, i_max, k_base, sk_n, sk_d, offs_d, m_ok, D):
    """``dq += da k[argmin] + db k[argmax]`` (row by row, a gather of two key rows per query row)."""
    d_ok = offs_d[None, :] < D
    k_min = tl.load(k_base + i_min[:, None] * sk_n + offs_d[None, :] * sk_d,
                    mask=(m_ok & (da != 0.0))[:, None] & d_ok, other=0.0).to(tl.float32)
    k_max = tl.load(k_base + i_max[:, None] * sk_n + offs_d[None, :] * sk_d,
                    mask=(m_ok & (db != 0.0))[:, None] & d_ok, other=0.0).to(tl.float32)
    return dq + da[:, None] * k_min + db[:, None] * k_max


@triton.jit
def _capped_terms(q, da, db, i_min, i_max, k_base, sk_n, sk_d, offs_d, m_ok, D, scale, cap):
    """Soft-capping: ``da``, ``db`` times ``1 - tanh^2`` of the capped product at each row's arg-min / arg-max key
    (what the range terms contribute to ``dq`` and ``dk``; the bias gradient takes them unscaled). ``q``: the rows'
    queries ``(BLOCK_M, BLOCK_D)``; the two products are recomputed in float32."""
    d_ok = offs_d[None, :] < D
    qf = q.to(tl.float32)
    k_min = tl.load(k_base + i_min[:, None] * sk_n + offs_d[None, :] * sk_d,
                    mask=(m_ok & (da != 0.0))[:, None] & d_ok, other=0.0).to(tl.float32)
    k_max = tl.load(k_base + i_max[:, None] * sk_n + offs_d[None, :] * sk_d,
                    mask=(m_ok & (db != 0.0))[:, None] & d_ok, other=0.0).to(tl.float32)
    _, g_min = _tanh_grad(tl.sum(qf * k_min, 1) * scale / cap)
    _, g_max = _tanh_grad(tl.sum(qf * k_max, 1) * scale / cap)
    return da * g_min, db * g_max


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def sa_bwd_dq(
    Q, K, V, DO, RowM, RowL, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, DA, DB, DQ,
    Keep, MaskAdd, Bias, Slopes, Seed,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdq_b, sdq_h, sdq_m, sdq_d,
    skp_b, skp_h, skp_m, skp_n,
    sma_b, sma_h, sma_m, sma_n,
    sbi_b, sbi_h, sbi_m, sbi_n,
    ssl_b, ssl_h,
    H, G, Nq, Nk, D, DV, scale, eps, N_BUCKET, drop_thr, drop_scale, win_left, win_right, cap,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, NEED_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, pid_bh = _split_pid(tl.program_id(0), Nq, BLOCK_M, IS_CAUSAL)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    seed_lo, seed_hi = _load_seed(Seed, HAS_DROPOUT)

    q = tl.load(Q + off_b * sq_b + off_h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + off_b * sdo_b + off_h * sdo_h + offs_m[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    stat = pid_bh.to(tl.int64) * Nq + offs_m
    m2 = tl.load(RowM + stat, mask=m_ok, other=float("inf"))
    il = tl.load(RowL + stat, mask=m_ok, other=0.0)
    delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
    ra, rb, rc, i_min, i_max = _row_stats(stat, m_ok, NORMALIZE, RANGE_GRAD, RangeA, RangeB, RangeC, IdxMin, IdxMax)
    r_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = K + off_b * sk_b + off_hkv * sk_h
    v_base = V + off_b * sv_b + off_hkv * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_hi, hi = _row_range(start_m, Nq, Nk, win_left, win_right, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    mid = tl.maximum(lo, full_hi)
    for start_n in range(lo, full_hi, BLOCK_N):
        dq, r_a, r_b = _dq_tile(
            q, do, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            m2, il, delta, ra, rb, rc, i_min, i_max, eps, dq, r_a, r_b, off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap, stat, seed_lo, seed_hi,
            drop_thr, drop_scale,
            IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP,
            HAS_DROPOUT, DOT_PREC, True,
        )
    for start_n in range(mid, hi, BLOCK_N):
        dq, r_a, r_b = _dq_tile(
            q, do, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            m2, il, delta, ra, rb, rc, i_min, i_max, eps, dq, r_a, r_b, off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, win_left, win_right, cap, stat, seed_lo, seed_hi,
            drop_thr, drop_scale,
            IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_WINDOW, HAS_SOFTCAP,
            HAS_DROPOUT, DOT_PREC, False,
        )
    if RANGE_GRAD:
        da, db = _range_terms(delta, ra, rb, rc, r_a, r_b)
        tl.store(DA + stat, da, mask=m_ok)
        tl.store(DB + stat, db, mask=m_ok)
        if HAS_SOFTCAP:
            da, db = _capped_terms(q, da, db, i_min, i_max, k_base, sk_n, sk_d, offs_d, m_ok, D, scale, cap)
        dq = _gather_keys(dq, da, db, i_min, i_max, k_base, sk_n, sk_d, offs_d, m_ok, D)
    if NEED_DQ:
        tl.store(DQ + off_b * sdq_b + off_h * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :] * sdq_d,
                 (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def sa_bwd_post(
    Q, K, DQacc, DQ, DK, DBias, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, RowA, RowB,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sdq_b, sdq_h, sdq_m, sdq_d,
    sdk_b, sdk_h, sdk_n, sdk_d,
    sdb_b, sdb_h, sdb_m, sdb_n,
    H, G, Nq, D, scale, cap,
    RANGE_GRAD: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, BIAS_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fast path, after ``sa_bwd_kv``: ``dq = scale * acc`` in the output dtype, plus (range gradient) the sparse
    correction at each row's arg-min/arg-max key: ``dq_i += scale (da k_argmin + db k_argmax)``, and by atomics
    ``dk_argmin += scale da q_i``, ``dk_argmax += scale db q_i`` (float32 ``DK``), ``dbias[i, argmin] += da`` etc."""
    pid_m, pid_bh = _split_pid(tl.program_id(0), Nq, BLOCK_M, False)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    md = m_ok[:, None] & (offs_d[None, :] < D)
    stat = pid_bh.to(tl.int64) * Nq + offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NEED_DQ:
        dq = tl.load(DQacc + stat[:, None] * D + offs_d[None, :], mask=md, other=0.0)
    if RANGE_GRAD:
        delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
        ra, rb, rc, i_min, i_max = _row_stats(stat, m_ok, True, True, RangeA, RangeB, RangeC, IdxMin, IdxMax)
        r_a = tl.load(RowA + stat, mask=m_ok, other=0.0)
        r_b = tl.load(RowB + stat, mask=m_ok, other=0.0)
        da, db = _range_terms(delta, ra, rb, rc, r_a, r_b)
        k_base = K + off_b * sk_b + off_hkv * sk_h
        q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if NEED_DK or HAS_SOFTCAP:
            q = tl.load(Q + off_b * sq_b + off_h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                        mask=md, other=0.0).to(tl.float32)
        da_qk = da  # what reaches the product q.k (soft-capping scales it; the bias takes da, db)
        db_qk = db
        if HAS_SOFTCAP:
            da_qk, db_qk = _capped_terms(q, da, db, i_min, i_max, k_base, sk_n, sk_d, offs_d, m_ok, D, scale, cap)
        if NEED_DQ:
            dq = _gather_keys(dq, da_qk, db_qk, i_min, i_max, k_base, sk_n, sk_d, offs_d, m_ok, D)
        if NEED_DK:
            q = q * scale
            dk_base = DK + off_b * sdk_b + off_hkv * sdk_h
            tl.atomic_add(dk_base + i_min[:, None] * sdk_n + offs_d[None, :] * sdk_d, da_qk[:, None] * q,
                          mask=md & (da_qk != 0.0)[:, None], sem="relaxed")
            tl.atomic_add(dk_base + i_max[:, None] * sdk_n + offs_d[None, :] * sdk_d, db_qk[:, None] * q,
                          mask=md & (db_qk != 0.0)[:, None], sem="relaxed")
        if BIAS_GRAD:
            db_base = DBias + off_b * sdb_b + off_h * sdb_h + offs_m * sdb_m
            tl.atomic_add(db_base + i_min * sdb_n, da, mask=m_ok & (da != 0.0), sem="relaxed")
            tl.atomic_add(db_base + i_max * sdb_n, db, mask=m_ok & (db != 0.0), sem="relaxed")
    if NEED_DQ:
        tl.store(DQ + off_b * sdq_b + off_h * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :] * sdq_d,
                 (dq * scale).to(DQ.dtype.element_ty), mask=md)
