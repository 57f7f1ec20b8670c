"""Triton kernels of the fused SA attention (FlashAttention-2 structure, ``docs/contract.md`` section 3).

This module needs ``triton`` and is imported lazily by :mod:`sasoftmax.attention.triton_backend`. Whether the kernels
run on the GPU or under the Triton interpreter is decided when this module is imported: ``TRITON_INTERPRET=1`` must
be set in the environment before that (``INTERPRET`` records what was seen).

Kernels (``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``):

* ``sa_fwd``: one program per (block of ``BLOCK_M`` query rows, batch * query head); streams over key blocks with an
  online softmax (running max ``m``, running sum ``l``) and the SA accumulators ``acc1 = sum (s e) v`` and, for the
  normalized form, ``acc0 = sum e v`` and a running minimum. Writes the output and per-row statistics.
* ``sa_bwd_dkdv``: one program per (block of ``BLOCK_N`` keys, batch * key/value head); loops over the ``G`` query
  heads of its group and over the query blocks, recomputing scores; accumulates ``dk``, ``dv`` and writes (or, for a
  broadcast bias, atomically adds) the bias gradient.
* ``sa_bwd_dq``: one program per (block of query rows, batch * query head); accumulates ``dq`` and, when the range
  of the normalized form is differentiated, the two row sums of the sparse range correction (see ``_ds_tile``).

Each kernel splits its loop: tiles whose keys are all in range and (causal) visible to every row run a ``FULL``
variant of the tile function without masking; only the boundary tiles compute masks. ``N_BUCKET`` is not used by the
kernels; it is the power-of-two length bucket that keys the optional autotuning.

Scores ``s = scale * q.k + float-mask + bias + ALiBi`` are computed in float32; masked keys (causal, bool mask,
masked float-mask entries, out-of-range positions) take no part in the softmax or the min/max and get weight 0.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Dropout arguments (seed halves and keep threshold) are passed as ``value | 2**32`` so that Triton always types them
# as int64 (it types an int by its value, and a changing seed would otherwise compile new variants); the kernels keep
# the low 32 bits. They are also excluded from value specialization.
_DROPOUT_ARGS = ["seed_lo", "seed_hi", "drop_thr"]


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 (wrapping products), as in :mod:`sasoftmax.attention.dropout`."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _dropout_keep(offs_m, offs_n, row_base, Nk, seed_lo, seed_hi, drop_thr):
    """Keep decisions ``(BLOCK_M, BLOCK_N)`` of the scores at rows ``offs_m`` and keys ``offs_n`` of one (batch,
    head); ``row_base = (b * H + h) * Nq``. The same counter-based hash as the PyTorch backends: the score's flat index
    ``((b H + h) Nq + i) Nk + j`` is split into 32-bit halves and mixed with the seed, so every backend and block size
    drops exactly the same entries and the backward regenerates the forward's mask."""
    idx = (row_base + offs_m.to(tl.int64))[:, None] * Nk + offs_n[None, :]
    lo = idx.to(tl.uint32)  # truncation keeps the low 32 bits
    hi = (idx >> 32).to(tl.uint32)
    h = _fmix32(lo ^ seed_lo.to(tl.uint32))
    h = _fmix32(h ^ hi ^ seed_hi.to(tl.uint32))
    return h >= drop_thr.to(tl.uint32)


@triton.jit
def _scores(
    qk, offs_m, offs_n, off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n,
    MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n,
    Slopes, ssl_b, ssl_h,
    IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, FULL: tl.constexpr,
):
    """Scores (float32, ``(BLOCK_M, BLOCK_N)``) of a tile and its visibility (True = the key takes part).

    ``FULL``: the caller guarantees that every key of the tile is in range and (causal) visible to every row of the
    tile, so only the row range (for safe loads) and a bool mask remain; ``vis`` may then be ``(BLOCK_M, 1)``."""
    s = qk * scale
    in_m = offs_m[:, None] < Nq
    if FULL:
        inb = in_m
        vis = in_m
    else:
        inb = in_m & (offs_n[None, :] < Nk)
        vis = inb
        if IS_CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + (Nk - Nq))
    if HAS_KEEP:
        kp = tl.load(Keep + off_b * skp_b + off_h * skp_h + offs_m[:, None] * skp_m + offs_n[None, :] * skp_n,
                     mask=inb, other=0)
        vis = vis & (kp != 0)
    if HAS_MADD:
        s += tl.load(MaskAdd + off_b * sma_b + off_h * sma_h + offs_m[:, None] * sma_m + offs_n[None, :] * sma_n,
                     mask=inb, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(Bias + off_b * sbi_b + off_h * sbi_h + offs_m[:, None] * sbi_m + offs_n[None, :] * sbi_n,
                     mask=inb, other=0.0).to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Slopes + off_b * ssl_b + off_h * ssl_h).to(tl.float32)
        dist = tl.abs(offs_m[:, None] + (Nk - Nq) - offs_n[None, :]).to(tl.float32)
        s += -slope * dist
    return s, vis


@triton.jit
def _fwd_tile(
    q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
    off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n,
    MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n,
    Slopes, ssl_b, ssl_h,
    m_i, mn_i, l_i, acc1, acc0, i_max, i_min, row_base, seed_lo, seed_hi, drop_thr,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, FULL: tl.constexpr,
):
    """One key block of the forward: update the online-softmax state and the SA accumulators. Dropout zeroes the
    dropped entries of what multiplies ``V`` (not of the softmax sum); the caller applies ``1 / (1 - p)``."""
    offs_n = start_n + offs_n0
    kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d,
                 mask=(offs_n[None, :] < Nk) & (offs_d[:, None] < D), other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PREC)
    s, vis = _scores(
        qk, offs_m, offs_n, off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h,
        IS_CAUSAL, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, FULL,
    )
    if FULL and not HAS_KEEP:  # every key visible (rows past Nq are never stored)
        s_ninf = s
        s_pinf = s
        s_zero = s
    else:
        s_ninf = tl.where(vis, s, float("-inf"))
        s_pinf = tl.where(vis, s, float("inf"))
        s_zero = tl.where(vis, s, 0.0)
    b_max = tl.max(s_ninf, 1)
    if RANGE_GRAD:
        a_max = tl.argmax(s_ninf, 1).to(tl.int32) + start_n
        i_max = tl.where(b_max > m_i, a_max, i_max)
    if NORMALIZE:
        b_min = tl.min(s_pinf, 1)
        if RANGE_GRAD:
            a_min = tl.argmin(s_pinf, 1).to(tl.int32) + start_n
            i_min = tl.where(b_min < mn_i, a_min, i_min)
        mn_i = tl.minimum(mn_i, b_min)
    m_new = tl.maximum(m_i, b_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    e = tl.exp(s_ninf - m_safe[:, None])  # masked -> 0
    l_i = l_i * alpha + tl.sum(e, 1)
    v = tl.load(v_base + offs_n[:, None] * sv_n + offs_dv[None, :] * sv_d,
                mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < DV), other=0.0)
    pv1 = s_zero * e
    pv0 = e
    if HAS_DROPOUT:
        keep = _dropout_keep(offs_m, offs_n, row_base, Nk, seed_lo, seed_hi, drop_thr)
        pv1 = tl.where(keep, pv1, 0.0)
        pv0 = tl.where(keep, pv0, 0.0)
    acc1 = acc1 * alpha[:, None] + tl.dot(pv1.to(v.dtype), v, input_precision=DOT_PREC)
    if NORMALIZE:
        acc0 = acc0 * alpha[:, None] + tl.dot(pv0.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, mn_i, l_i, acc1, acc0, i_max, i_min


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def sa_fwd(
    Q, K, V, Out, Lse, RangeA, RangeB, IdxMin, IdxMax,
    Keep, MaskAdd, Bias, Slopes,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_m, so_d,
    skp_b, skp_h, skp_m, skp_n,
    sma_b, sma_h, sma_m, sma_n,
    sbi_b, sbi_h, sbi_m, sbi_n,
    ssl_b, ssl_h,
    H, G, Nq, Nk, D, DV, scale, eps, N_BUCKET, seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_base = pid_bh.to(tl.int64) * Nq

    q_ptrs = Q + off_b * sq_b + off_h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    k_base = K + off_b * sk_b + off_hkv * sk_h
    v_base = V + off_b * sv_b + off_hkv * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    mn_i = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    i_max = tl.zeros([BLOCK_M], dtype=tl.int32)
    i_min = tl.zeros([BLOCK_M], dtype=tl.int32)

    if IS_CAUSAL:
        # the last row of the block sees keys up to Nk - Nq + start_m + BLOCK_M - 1, its first row up to
        # Nk - Nq + start_m: key blocks below the latter are visible to every row (no masking needed)
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + Nk - Nq, 0))
        full_hi = tl.minimum(Nk, tl.maximum(start_m + Nk - Nq + 1, 0))
    else:
        hi = Nk
        full_hi = Nk
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_hi, BLOCK_N):
        m_i, mn_i, l_i, acc1, acc0, i_max, i_min = _fwd_tile(
            q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h,
            m_i, mn_i, l_i, acc1, acc0, i_max, i_min, row_base, seed_lo, seed_hi, drop_thr,
            IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DOT_PREC, True,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        m_i, mn_i, l_i, acc1, acc0, i_max, i_min = _fwd_tile(
            q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h,
            m_i, mn_i, l_i, acc1, acc0, i_max, i_min, row_base, seed_lo, seed_hi, drop_thr,
            IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DOT_PREC, False,
        )

    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    row_ok = offs_m < Nq
    stat = row_base + offs_m
    if NORMALIZE:
        a = tl.minimum(mn_i, 0.0)
        b = tl.maximum(m_i, 0.0)
        c = tl.where(empty, 0.0, 1.0 / (b - a + eps))
        o = (acc1 - a[:, None] * acc0) * (c * inv_l)[:, None]
        tl.store(RangeA + stat, a, mask=row_ok)
        tl.store(RangeB + stat, b, mask=row_ok)
        if RANGE_GRAD:
            tl.store(IdxMin + stat, i_min, mask=row_ok)
            tl.store(IdxMax + stat, i_max, mask=row_ok)
    else:
        o = acc1 * inv_l[:, None]
    if HAS_DROPOUT:
        o = o * drop_scale
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(Lse + stat, lse, mask=row_ok)
    o_ptrs = Out + off_b * so_b + off_h * so_h + offs_m[:, None] * so_m + offs_dv[None, :] * so_d
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _ds_tile(
    q, kt, vt, do, lse, delta, ra, rb, rc, i_min, i_max, eps,
    offs_m, offs_n, off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n,
    MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n,
    Slopes, ssl_b, ssl_h,
    row_base, seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, FULL: tl.constexpr,
):
    """Recompute one tile. Returns ``(w, wd, ds, p, dp, at_min, at_max)``: the SA weights ``w``, the weights applied
    to ``v`` ``wd`` (``w`` after dropout; what multiplies ``dO`` for ``dv``), ``ds = dL/ds`` without the sparse range
    terms, the softmax ``p``, ``dp = dL/dw = (dO v^T)`` after dropout (all float32 ``(BLOCK_M, BLOCK_N)``, 0 where
    masked), and where the row's arg-min (if ``a < 0``) / arg-max (if ``b > 0``) key is. With ``RANGE_GRAD`` the
    factor at those two keys is taken without the part that the range correction cancels exactly (``c`` at the
    arg-min, ``c (1 - c eps)`` at the arg-max), so that no O(c) terms cancel in floating point: the correction added
    afterwards is then ``c (Delta - sum_{j != argmin} p dp)`` and ``-c sum_{j != argmax} w dp``."""
    qk = tl.dot(q, kt, input_precision=DOT_PREC)
    s, vis = _scores(
        qk, offs_m, offs_n, off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h,
        IS_CAUSAL, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, FULL,
    )
    if FULL and not HAS_KEEP:  # every key visible; rows past Nq have lse = +inf, so p = 0 there
        p = tl.exp(s - lse[:, None])
        s_zero = s
    else:
        p = tl.exp(tl.where(vis, s, float("-inf")) - lse[:, None])  # lse = +inf on empty rows -> 0
        s_zero = tl.where(vis, s, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(offs_m, offs_n, row_base, Nk, seed_lo, seed_hi, drop_thr)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    at_min = offs_n[None, :] < 0  # all False unless RANGE_GRAD
    at_max = offs_n[None, :] < 0
    if NORMALIZE:
        fac_w = (s_zero - ra[:, None]) * rc[:, None]
        fac = fac_w + rc[:, None]
        if RANGE_GRAD:
            at_min = (offs_n[None, :] == i_min[:, None]) & (ra < 0.0)[:, None]
            at_max = (offs_n[None, :] == i_max[:, None]) & (rb > 0.0)[:, None]
            fac = tl.where(at_min, fac_w, fac)
            fac = tl.where(at_max, fac_w + (rc * rc * eps)[:, None], fac)
    else:
        fac_w = s_zero
        fac = s_zero + 1.0
    ds = p * (fac * dp - delta[:, None])
    w = fac_w * p
    wd = w
    if HAS_DROPOUT:
        wd = tl.where(keep, w * drop_scale, 0.0)
    return w, wd, ds, p, dp, at_min, at_max


@triton.jit
def _row_stats(stat, m_ok, delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, NORMALIZE: tl.constexpr,
               RANGE_GRAD: tl.constexpr):
    """Per-row ``a``, ``b``, ``c`` and arg-min/arg-max key of the normalized form (placeholders otherwise)."""
    ra = delta
    rb = delta
    rc = delta
    i_min = m_ok.to(tl.int32)
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
def _dkdv_tile(
    Q, q_base, do_base, sq_m, sq_d, sdo_m, sdo_d, Lse, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax,
    DBias, sdb_b, sdb_h, sdb_m, sdb_n, stat_base, start_m, offs_m0, offs_n, offs_d, offs_dv, n_ok,
    kt, vt, dk, dv, D, DV, off_b, off_h, Nq, Nk, scale, eps,
    Keep, skp_b, skp_h, skp_m, skp_n,
    MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n,
    Slopes, ssl_b, ssl_h,
    seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_BCAST_M: tl.constexpr, DB_BCAST_N: tl.constexpr, DB_ATOMIC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, FULL: tl.constexpr,
):
    """One query block of the dk/dv kernel: accumulate ``dk``, ``dv`` and write (or add) the bias gradient."""
    offs_m = start_m + offs_m0
    m_ok = offs_m < Nq
    q = tl.load(q_base + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + stat_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + stat_base + offs_m, mask=m_ok, other=0.0)
    ra, rb, rc, i_min, i_max = _row_stats(
        stat_base + offs_m, m_ok, delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, NORMALIZE, RANGE_GRAD)
    w, wd, ds, p, dp, at_min, at_max = _ds_tile(
        q, kt, vt, do, lse, delta, ra, rb, rc, i_min, i_max, eps,
        offs_m, offs_n, off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h,
        stat_base, seed_lo, seed_hi, drop_thr, drop_scale,
        IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DOT_PREC, FULL,
    )
    dv += tl.dot(tl.trans(wd.to(do.dtype)), do, input_precision=DOT_PREC)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    if BIAS_GRAD:
        db_base = DBias + off_b * sdb_b + off_h * sdb_h
        if DB_BCAST_M:
            if DB_BCAST_N:
                tl.atomic_add(db_base, tl.sum(tl.sum(ds, 1), 0))
            else:
                tl.atomic_add(db_base + offs_n * sdb_n, tl.sum(ds, 0), mask=n_ok)
        else:
            if DB_BCAST_N:
                tl.atomic_add(db_base + offs_m * sdb_m, tl.sum(ds, 1), mask=m_ok)
            else:
                db_ptrs = db_base + offs_m[:, None] * sdb_m + offs_n[None, :] * sdb_n
                if DB_ATOMIC:
                    tl.atomic_add(db_ptrs, ds, mask=m_ok[:, None] & n_ok[None, :])
                else:
                    tl.store(db_ptrs, ds, mask=m_ok[:, None] & n_ok[None, :])
    return dk, dv


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def sa_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, DK, DV_, DBias,
    Keep, MaskAdd, Bias, Slopes,
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
    H, HKV, G, Nq, Nk, D, DV, scale, eps, N_BUCKET, seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_GRAD: tl.constexpr, DB_BCAST_M: tl.constexpr, DB_BCAST_N: tl.constexpr, DB_ATOMIC: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    off_b = (pid_bk // HKV).to(tl.int64)
    off_hkv = (pid_bk % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk

    # K^T (BLOCK_D, BLOCK_N) and V^T (BLOCK_DV, BLOCK_N); K (BLOCK_N, BLOCK_D) for nothing else is needed.
    kt = tl.load(K + off_b * sk_b + off_hkv * sk_h + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d,
                 mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    vt = tl.load(V + off_b * sv_b + off_hkv * sv_h + offs_n[None, :] * sv_n + offs_dv[:, None] * sv_d,
                 mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
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
    mid_lo = tl.minimum(mid, Nq)
    for g in range(0, G):
        off_h = off_hkv * G + g
        q_base = Q + off_b * sq_b + off_h * sq_h
        do_base = DO + off_b * sdo_b + off_h * sdo_h
        stat_base = (off_b * H + off_h) * Nq
        for start_m in range(lo, mid_lo, BLOCK_M):
            dk, dv = _dkdv_tile(
                Q, q_base, do_base, sq_m, sq_d, sdo_m, sdo_d, Lse, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax,
                DBias, sdb_b, sdb_h, sdb_m, sdb_n, stat_base, start_m, offs_m0, offs_n, offs_d, offs_dv, n_ok,
                kt, vt, dk, dv, D, DV, off_b, off_h, Nq, Nk, scale, eps,
                Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
                Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, seed_lo, seed_hi, drop_thr, drop_scale,
                IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI,
                BIAS_GRAD, DB_BCAST_M, DB_BCAST_N, DB_ATOMIC, HAS_DROPOUT, DOT_PREC, False,
            )
        for start_m in range(mid, Nq, BLOCK_M):
            dk, dv = _dkdv_tile(
                Q, q_base, do_base, sq_m, sq_d, sdo_m, sdo_d, Lse, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax,
                DBias, sdb_b, sdb_h, sdb_m, sdb_n, stat_base, start_m, offs_m0, offs_n, offs_d, offs_dv, n_ok,
                kt, vt, dk, dv, D, DV, off_b, off_h, Nq, Nk, scale, eps,
                Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
                Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, seed_lo, seed_hi, drop_thr, drop_scale,
                IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI,
                BIAS_GRAD, DB_BCAST_M, DB_BCAST_N, DB_ATOMIC, HAS_DROPOUT, DOT_PREC, True,
            )

    dk = dk * scale
    tl.store(DK + off_b * sdk_b + off_hkv * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + off_b * sdv_b + off_hkv * sdv_h + offs_n[:, None] * sdv_n + offs_dv[None, :] * sdv_d,
             dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(
    q, do, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
    lse, delta, ra, rb, rc, i_min, i_max, eps, dq, r_a, r_b, off_b, off_h, Nq, Nk, scale,
    Keep, skp_b, skp_h, skp_m, skp_n,
    MaskAdd, sma_b, sma_h, sma_m, sma_n,
    Bias, sbi_b, sbi_h, sbi_m, sbi_n,
    Slopes, ssl_b, ssl_h,
    row_base, seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, FULL: tl.constexpr,
):
    """One key block of the dq kernel: accumulate ``dq`` and the row sums of the range correction."""
    offs_n = start_n + offs_n0
    n_ok = offs_n < Nk
    k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    vt = tl.load(v_base + offs_n[None, :] * sv_n + offs_dv[:, None] * sv_d,
                 mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    w, wd, ds, p, dp, at_min, at_max = _ds_tile(
        q, tl.trans(k), vt, do, lse, delta, ra, rb, rc, i_min, i_max, eps,
        offs_m, offs_n, off_b, off_h, Nq, Nk, scale,
        Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
        Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h,
        row_base, seed_lo, seed_hi, drop_thr, drop_scale,
        IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DOT_PREC, FULL,
    )
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    if RANGE_GRAD:
        r_a += tl.sum(tl.where(at_min, 0.0, p * dp), 1)
        r_b += tl.sum(tl.where(at_max, 0.0, w * dp), 1)
    return dq, r_a, r_b


@triton.jit(do_not_specialize=_DROPOUT_ARGS)
def sa_bwd_dq(
    Q, K, V, DO, Lse, Delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, RowA, RowB, DQ,
    Keep, MaskAdd, Bias, Slopes,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdq_b, sdq_h, sdq_m, sdq_d,
    skp_b, skp_h, skp_m, skp_n,
    sma_b, sma_h, sma_m, sma_n,
    sbi_b, sbi_h, sbi_m, sbi_n,
    ssl_b, ssl_h,
    H, G, Nq, Nk, D, DV, scale, eps, N_BUCKET, seed_lo, seed_hi, drop_thr, drop_scale,
    IS_CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, RANGE_GRAD: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_MADD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    row_base = pid_bh.to(tl.int64) * Nq

    q = tl.load(Q + off_b * sq_b + off_h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + off_b * sdo_b + off_h * sdo_h + offs_m[:, None] * sdo_m + offs_dv[None, :] * sdo_d,
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    stat = row_base + offs_m
    lse = tl.load(Lse + stat, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + stat, mask=m_ok, other=0.0)
    ra, rb, rc, i_min, i_max = _row_stats(
        stat, m_ok, delta, RangeA, RangeB, RangeC, IdxMin, IdxMax, NORMALIZE, RANGE_GRAD)
    r_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = K + off_b * sk_b + off_hkv * sk_h
    v_base = V + off_b * sv_b + off_hkv * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if IS_CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(start_m + BLOCK_M + Nk - Nq, 0))
        full_hi = tl.minimum(Nk, tl.maximum(start_m + Nk - Nq + 1, 0))
    else:
        hi = Nk
        full_hi = Nk
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_hi, BLOCK_N):
        dq, r_a, r_b = _dq_tile(
            q, do, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            lse, delta, ra, rb, rc, i_min, i_max, eps, dq, r_a, r_b, off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, row_base, seed_lo, seed_hi, drop_thr, drop_scale,
            IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DOT_PREC, True,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        dq, r_a, r_b = _dq_tile(
            q, do, k_base, v_base, sk_n, sk_d, sv_n, sv_d, start_n, offs_n0, offs_m, offs_d, offs_dv, D, DV,
            lse, delta, ra, rb, rc, i_min, i_max, eps, dq, r_a, r_b, off_b, off_h, Nq, Nk, scale,
            Keep, skp_b, skp_h, skp_m, skp_n, MaskAdd, sma_b, sma_h, sma_m, sma_n,
            Bias, sbi_b, sbi_h, sbi_m, sbi_n, Slopes, ssl_b, ssl_h, row_base, seed_lo, seed_hi, drop_thr, drop_scale,
            IS_CAUSAL, NORMALIZE, RANGE_GRAD, HAS_KEEP, HAS_MADD, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DOT_PREC, False,
        )
    dq = dq * scale
    if RANGE_GRAD:
        tl.store(RowA + stat, r_a, mask=m_ok)
        tl.store(RowB + stat, r_b, mask=m_ok)
    tl.store(DQ + off_b * sdq_b + off_h * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))
