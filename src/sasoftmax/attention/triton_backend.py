"""The fused Triton backend: SA attention in FlashAttention-2 form, forward and backward (``docs/contract.md`` §3).

Public entry points (used by :mod:`sasoftmax.attention.api`):

* :func:`unsupported_reason` — ``None`` if the kernel can run a call, else a short reason (``backend="auto"`` then
  falls back to the chunked path; ``backend="triton"`` raises with that reason).
* :func:`triton_attention` — ``(B, Hq, Nq, Dv)`` output in the input dtype, differentiable in ``q``, ``k``, ``v`` and
  ``bias``.

What the kernels do: the forward streams over key blocks with an online softmax (running max and sum) plus the SA
accumulators ``acc1 = sum (s e) v`` and, for the normalized form, ``acc0 = sum e v`` and a running minimum; the
output is ``acc1 / l`` (plain) or ``c (acc1 - a acc0) / l`` (normalized). It saves the log-sum-exp and ``a``, ``b`` per
row, and when the range is differentiated also the arg-min/arg-max key per row and ``O0 = acc0 / l``. The backward is
FlashAttention-2's (one kernel for ``dk``/``dv``/``dbias`` over key blocks, one for ``dq`` over query blocks) with
``ds = p (fac dP - Delta)``; the range terms ``dL/da``, ``dL/db`` of the normalized form are added afterwards as an
O(N D) sparse correction at the arg-min/arg-max keys. No N x N buffer is allocated (except the bias gradient, which has
the bias' own shape).

Masks follow :mod:`sasoftmax.attention.inputs`: bool ``keep`` (True = attend), additive float-mask values, additive
``bias`` (may require grad), ALiBi slopes (computed in-kernel), causal aligned bottom-right; all 4-d masks are read
by strides, with stride 0 on broadcast dims. Rows with no visible key give output 0 and gradient 0.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dropout import draw_seed
from .inputs import AttentionInputs

try:  # triton is optional
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except Exception as err:  # pragma: no cover - depends on the environment
    _TRITON_ERROR = f"triton is not installed or failed to import ({type(err).__name__}: {err})"

__all__ = ["unsupported_reason", "triton_attention", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET_BLOCK = 16  # block sizes under the interpreter: small, so that the tests stay fast


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels_interpret() -> bool:
    """Whether the kernels run (or, once imported, will run) under the Triton interpreter."""
    import sys

    mod = sys.modules.get(__name__.rsplit(".", 1)[0] + ".triton_kernels")
    if mod is not None:
        return bool(mod.INTERPRET)
    return _interpret_env()


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """``None`` if :func:`triton_attention` can run ``inp``, else a short human-readable reason."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    q, v = inp.q, inp.v
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32 are)"
    interpret = _kernels_interpret()
    if not q.is_cuda and not interpret:
        return "tensors are not on CUDA and TRITON_INTERPRET is not set"
    if q.is_cuda and interpret:
        return "TRITON_INTERPRET is set, so the kernels were built for the interpreter, not for CUDA"
    if interpret and q.dtype == torch.bfloat16:
        return "bfloat16 is not supported under the Triton interpreter"
    D, Dv = q.shape[-1], v.shape[-1]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"head_dim {max(D, Dv)} > {MAX_HEAD_DIM}"
    if D < 1 or Dv < 1:
        return "head_dim 0"
    # in-kernel offsets within one (batch, head) slice are 32-bit
    for name, t in (("q", q), ("k", inp.k), ("v", v), ("attn_mask", inp.keep), ("attn_mask", inp.mask_add),
                    ("bias", inp.bias)):
        if t is not None and sum((t.shape[d] - 1) * t.stride(d) for d in (2, 3)) >= 2**31 - 1:
            return f"`{name}` is too large for the kernel's 32-bit offsets within one (batch, head)"
    if inp.bias is not None and inp.bias.requires_grad and inp.nq * inp.nk >= 2**31 - 1:
        return "the bias gradient is too large for the kernel's 32-bit offsets"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# launch configuration


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block_dim(d: int) -> int:
    return max(16, _pow2(d))


def _n_bucket(nq: int, nk: int) -> int:
    return _pow2(max(nq, nk, 1))


# Launch configurations on the GPU (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim. They were chosen
# for sm_90 (H100/H200) by compiling every candidate ahead of time and keeping the ones that fit in shared memory with
# the fewest register spills; set SASOFTMAX_TRITON_AUTOTUNE=1 to let Triton time a few candidates per shape instead.
_GPU_CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (64, 32, 4, 2)},
    "dkdv": {64: (32, 128, 8, 2), 128: (32, 128, 8, 2), 256: (16, 64, 4, 2)},
    "dq": {64: (128, 32, 8, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 2)},
}
# float32 inputs use exact (non-tensor-core) products, which need much more shared memory: smaller tiles, no autotune.
_GPU_CONFIGS_FP32: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {64: (64, 32, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)},
    "dkdv": {64: (32, 64, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 1)},
    "dq": {64: (64, 32, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)},
}
_AUTOTUNE_CANDIDATES: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 64, 8, 3), (64, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 2)],
    "dkdv": [(32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 4, 2), (16, 64, 4, 2)],
    "dq": [(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2)],
}

_TUNED: dict[str, Any] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("SASOFTMAX_TRITON_AUTOTUNE", "0") not in ("", "0")


def _kernel(kind: str, block_d: int, dtype: torch.dtype) -> tuple[Any, dict[str, int]]:
    """The kernel to launch for ``kind`` ("fwd", "dkdv", "dq") and its block sizes (plus warps/stages on the GPU);
    no options when the autotuned wrapper picks them."""
    L = _launchers()
    if L["interpret"]:
        return L[kind], {"BLOCK_M": _INTERPRET_BLOCK, "BLOCK_N": _INTERPRET_BLOCK}
    if dtype != torch.float32 and L["tuned"] is not None:
        return L["tuned"][kind], {}
    table = (_GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS)[kind]
    bm, bn, warps, stages = table[min(d for d in table if d >= block_d)]
    return L[kind], {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def _launchers() -> dict[str, Any]:
    """The three kernels: plain JIT functions (interpreter, or fixed GPU configurations) or autotuned wrappers."""
    if _TUNED:
        return _TUNED
    import triton

    from . import triton_kernels as tk

    _TUNED.update(fwd=tk.sa_fwd, dkdv=tk.sa_bwd_dkdv, dq=tk.sa_bwd_dq, interpret=tk.INTERPRET, tuned=None)
    if tk.INTERPRET or not _autotune_enabled():
        return _TUNED

    def configs(kind: str) -> list:
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in _AUTOTUNE_CANDIDATES[kind]]

    def prune_big_d(configs: list, named_args: dict, **kwargs: Any) -> list:
        # above head dim 128 keep only the small tiles (the others do not fit in shared memory / registers)
        big = max(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64)), kwargs.get("BLOCK_DV", named_args.get(
            "BLOCK_DV", 64)))
        if big > 128:
            small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32]
            return small or configs
        return configs

    keys = ["N_BUCKET", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "NORMALIZE", "RANGE_GRAD", "HAS_KEEP", "HAS_MADD",
            "HAS_BIAS", "HAS_ALIBI", "HAS_DROPOUT"]
    prune = {"early_config_prune": prune_big_d}
    _TUNED["tuned"] = {
        "fwd": triton.autotune(configs("fwd"), key=keys, prune_configs_by=prune)(tk.sa_fwd),
        # the dkdv kernel adds the bias gradient atomically: zero it before each timed trial
        "dkdv": triton.autotune(configs("dkdv"), key=[*keys, "BIAS_GRAD"], prune_configs_by=prune,
                                reset_to_zero=["DBias"])(tk.sa_bwd_dkdv),
        "dq": triton.autotune(configs("dq"), key=keys, prune_configs_by=prune)(tk.sa_bwd_dq),
    }
    return _TUNED


def _grid(nblocks_of: int, block_key: str, programs: int):
    return lambda meta: (triton_cdiv(nblocks_of, meta[block_key]), programs)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a 4-d broadcastable tensor with 0 on the broadcast (size-1) dims; zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in range(4))  # type: ignore[return-value]


class _Extras:
    """Pointers and strides of the optional score terms, shared by the three kernels."""

    def __init__(self, inp: AttentionInputs, bias: Tensor | None, dummy: Tensor):
        keep = inp.keep
        self.keep = dummy if keep is None else keep.view(torch.uint8)
        self.madd = dummy if inp.mask_add is None else inp.mask_add
        self.bias = dummy if bias is None else bias
        sl = inp.alibi_slopes
        self.slopes = dummy if sl is None else sl
        self.args = [
            self.keep, self.madd, self.bias, self.slopes,
        ]
        self.strides = [
            *_strides4(keep), *_strides4(inp.mask_add), *_strides4(bias),
            *((0, 0) if sl is None else (0 if sl.shape[0] == 1 else sl.stride(0), sl.stride(1))),
        ]
        self.flags = {
            "IS_CAUSAL": inp.is_causal, "HAS_KEEP": keep is not None, "HAS_MADD": inp.mask_add is not None,
            "HAS_BIAS": bias is not None, "HAS_ALIBI": sl is not None,
        }


def _dropout_args(p: float, seed: int | None) -> tuple[list[Any], bool]:
    """Kernel arguments ``seed_lo, seed_hi, drop_thr, drop_scale`` and the ``HAS_DROPOUT`` flag.

    The integers go in as ``value | 2**32`` so that Triton types them int64 whatever the seed (the kernels use the low
    32 bits); the threshold is the one of :func:`sasoftmax.attention.dropout.keep_mask` (keep if hash >= p 2^32)."""
    if seed is None:
        return [1 << 32, 1 << 32, 1 << 32, 1.0], False
    lo, hi, thr = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, int(p * 2**32)
    return [lo | 1 << 32, hi | 1 << 32, thr | 1 << 32, 1.0 / (1.0 - p)], True


def _dot_prec(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (no TF32), so that the accuracy rule against float32 holds
    return "ieee" if dtype == torch.float32 else "tf32"


class _TritonSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, inp: AttentionInputs, need_grad: bool):
        B, H, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        dev = q.device
        norm = inp.normalize
        range_grad = norm and not inp.detach_range and need_grad
        # For half inputs that need a gradient the kernel writes a float32 output, which the backward uses for
        # Delta = g . o: with the rounded output, Delta's error (amplified by the SA factor 1 + s) dominates dq and dk.
        o_dtype = torch.float32 if need_grad else q.dtype
        out = torch.empty(B, H, Nq, Dv, dtype=o_dtype, device=dev)
        lse = torch.empty(B, H, Nq, dtype=torch.float32, device=dev)
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        ra = torch.empty_like(lse) if norm else dummy
        rb = torch.empty_like(lse) if norm else dummy
        idx_dummy = torch.empty(1, dtype=torch.int32, device=dev)
        imin = torch.empty(B, H, Nq, dtype=torch.int32, device=dev) if range_grad else idx_dummy
        imax = torch.empty(B, H, Nq, dtype=torch.int32, device=dev) if range_grad else idx_dummy
        ex = _Extras(inp, bias, dummy)
        seed = draw_seed(inp.generator) if inp.dropout_p > 0 else None
        drop, has_drop = _dropout_args(inp.dropout_p, seed)
        kernel, opts = _kernel("fwd", max(_block_dim(D), _block_dim(Dv)), q.dtype)
        kernel[_grid(Nq, "BLOCK_M", B * H)](
            q, k, v, out, lse, ra, rb, imin, imax, *ex.args,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ex.strides,
            H, H // Hkv, Nq, Nk, D, Dv, inp.scale, inp.eps, _n_bucket(Nq, Nk), *drop,
            NORMALIZE=norm, RANGE_GRAD=range_grad, HAS_DROPOUT=has_drop, DOT_PREC=_dot_prec(q.dtype),
            BLOCK_D=_block_dim(D), BLOCK_DV=_block_dim(Dv), **ex.flags, **opts,
        )
        ctx.save_for_backward(q, k, v, bias, out, lse, ra if norm else None, rb if norm else None,
                              imin if range_grad else None, imax if range_grad else None)
        ctx.inp = inp
        ctx.seed = seed
        ctx.range_grad = range_grad
        return out if out.dtype == q.dtype else out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, out, lse, ra, rb, imin, imax = ctx.saved_tensors
        inp: AttentionInputs = ctx.inp
        B, H, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = H // Hkv
        dev = q.device
        norm = inp.normalize
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        need_bias = bool(need_bias and bias is not None)
        do = grad_out
        dof = do.float()
        delta = (dof * out).sum(dim=-1)  # (B, H, Nq): Delta = g . o, with o in float32
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        if norm:
            rc = torch.where(torch.isinf(lse), torch.zeros_like(lse), 1.0 / (rb - ra + inp.eps))
        else:
            ra = rb = rc = dummy
        range_grad = ctx.range_grad
        if not range_grad:
            imin = imax = torch.empty(1, dtype=torch.int32, device=dev)
        ex = _Extras(inp, bias, dummy)
        drop, has_drop = _dropout_args(inp.dropout_p, ctx.seed)
        common = dict(DOT_PREC=_dot_prec(q.dtype), BLOCK_D=_block_dim(D), BLOCK_DV=_block_dim(Dv), NORMALIZE=norm,
                      RANGE_GRAD=range_grad, HAS_DROPOUT=has_drop, **ex.flags)
        bd = max(_block_dim(D), _block_dim(Dv))
        bucket = _n_bucket(Nq, Nk)

        dq = dk = dv = dbias = None
        row_a = row_b = dummy
        if need_q or range_grad:  # the dq kernel also computes the row sums of the range correction
            dq = torch.empty(B, H, Nq, D, dtype=torch.float32, device=dev)
            if range_grad:
                row_a = torch.empty_like(lse)
                row_b = torch.empty_like(lse)
            kernel, opts = _kernel("dq", bd, q.dtype)
            kernel[_grid(Nq, "BLOCK_M", B * H)](
                q, k, v, do, lse, delta, ra, rb, rc, imin, imax, row_a, row_b, dq, *ex.args,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *ex.strides,
                H, G, Nq, Nk, D, Dv, inp.scale, inp.eps, bucket, *drop, **common, **opts,
            )
            if not need_q:
                dq = None
        if need_k or need_v or need_bias:
            dk = torch.empty(B, Hkv, Nk, D, dtype=torch.float32, device=dev)
            dv = torch.empty(B, Hkv, Nk, Dv, dtype=torch.float32, device=dev)
            if need_bias:
                dbias = torch.zeros(bias.shape, dtype=torch.float32, device=dev)
                sdb = _strides4(dbias)
                bm = bias.shape[2] == 1 and Nq > 1
                bn = bias.shape[3] == 1 and Nk > 1
                batomic = (bias.shape[0] == 1 and B > 1) or (bias.shape[1] == 1 and H > 1)
            else:
                sdb, bm, bn, batomic = (0, 0, 0, 0), False, False, False
            kernel, opts = _kernel("dkdv", bd, q.dtype)
            kernel[_grid(Nk, "BLOCK_N", B * Hkv)](
                q, k, v, do, lse, delta, ra, rb, rc, imin, imax, dk, dv, dummy if dbias is None else dbias, *ex.args,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *sdb, *ex.strides,
                H, Hkv, G, Nq, Nk, D, Dv, inp.scale, inp.eps, bucket, *drop,
                BIAS_GRAD=need_bias, DB_BCAST_M=bm, DB_BCAST_N=bn, DB_ATOMIC=batomic, **common, **opts,
            )
        if range_grad:
            _range_correction(inp, q, k, delta, ra, rb, rc, row_a, row_b, imin, imax, dq, dk, dbias)
        return (
            dq.to(q.dtype) if need_q else None,
            dk.to(k.dtype) if need_k else None,
            dv.to(v.dtype) if need_v else None,
            dbias.to(bias.dtype) if need_bias else None,
            None,
            None,
        )


def _range_correction(
    inp: AttentionInputs, q: Tensor, k: Tensor, delta: Tensor, ra: Tensor, rb: Tensor, rc: Tensor,
    row_a: Tensor, row_b: Tensor, imin: Tensor, imax: Tensor, dq: Tensor | None, dk: Tensor | None,
    dbias: Tensor | None,
) -> None:
    """Add the gradient through the row range (normalized form, range not detached), in place, O(N D).

    ``docs/contract.md``: ``dL/da = c (Delta - Delta0)`` goes to the arg-min key when ``min s < 0`` and
    ``dL/db = -c Delta`` to the arg-max key when ``max s > 0``. The kernels already left out of ``ds`` the part of the
    factor at those keys that these terms cancel exactly, so what is added here is ``c (Delta - sum_{j != argmin}
    p_j dP_j)`` and ``-c sum_{j != argmax} w_j dP_j`` (the row sums ``row_a``, ``row_b`` come from the dq kernel).
    Each enters ``ds`` at one key per row: ``dq_i += scale t k_j``, ``dk_j += scale t q_i``, ``dbias[i, j] += t``."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    da = torch.where(ra < 0, rc * (delta - row_a), torch.zeros_like(delta))
    db = torch.where(rb > 0, -rc * row_b, torch.zeros_like(delta))
    # flat row index of key (b, h // G, j) in k viewed as (B * Hkv * Nk, D)
    bidx = torch.arange(B, device=dev).view(B, 1, 1)
    hidx = torch.arange(H, device=dev).view(1, H, 1)
    kv_row = (bidx * Hkv + hidx // G) * Nk  # (B, H, 1)
    qf = q.float()
    kflat = k.float().reshape(B * Hkv * Nk, D)
    dk_flat = None if dk is None else dk.view(B * Hkv * Nk, D)
    if dbias is not None:
        sb = _strides4(dbias)
        irow = torch.arange(Nq, device=dev).view(1, 1, Nq)
        bias_row = bidx * sb[0] + hidx * sb[1] + irow * sb[2]  # (B, H, Nq)
    for coef, idx in ((da, imin), (db, imax)):
        idx = idx.long()
        flat = (kv_row + idx).reshape(-1)
        if dq is not None:
            dq.add_(inp.scale * coef[..., None] * kflat.index_select(0, flat).view(B, H, Nq, D))
        if dk_flat is not None:
            dk_flat.index_add_(0, flat, (inp.scale * coef[..., None] * qf).reshape(-1, D))
        if dbias is not None:
            dbias.view(-1).index_add_(0, (bias_row + idx * sb[3]).reshape(-1), coef.reshape(-1))


def triton_attention(inp: AttentionInputs) -> Tensor:
    """Fused SA attention: ``(B, Hq, Nq, Dv)`` in the input dtype; differentiable in q, k, v and bias.

    Raises ``ValueError`` with :func:`unsupported_reason` if the kernel cannot run this call."""
    reason = unsupported_reason(inp)
    if reason is not None:
        raise ValueError(f"the Triton SA kernel cannot run this call: {reason}")
    q, k, v, bias = inp.q, inp.k, inp.v, inp.bias
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        shape = (inp.batch, inp.heads, inp.nq, v.shape[-1])
        zeros = q.new_zeros(shape)
        # keep the graph connected so that .backward() works and yields zero gradients
        return zeros + 0.0 * (q.sum() + k.sum() + v.sum())
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias)
    )
    return _TritonSA.apply(q, k, v, bias, inp, need_grad)
