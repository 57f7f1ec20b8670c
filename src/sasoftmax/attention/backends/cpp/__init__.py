"""The ``"cpp"`` backend: the fused CPU kernel (``csrc/``, docs/cpu_kernel.md) behind the ``sasoftmax::cpp_fwd`` /
``sasoftmax::cpp_bwd`` custom ops. :mod:`.build` compiles and loads it.

Where the kernel cannot be had (no compiler, no ninja, a failed build, ``SASOFTMAX_CPP=0``), :func:`load_error` says
why; ``backend="auto"`` then logs one warning and uses the next backend, ``backend="cpp"`` raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ....functional import compute_dtype
from ...inputs import AttentionInputs
from ...op import BwdArgs, FwdArgs, define_attention_op, stats_dtype
from .build import default_panel_rows, extension, gemm_in_use, hardware_capabilities, load_error, score_products_in_use

__all__ = ["run", "unsupported_reason", "load_error", "block_rows", "compute_operands", "extension", "gemm_in_use",
           "score_products_in_use", "hardware_capabilities", "MAX_DIM"]

# Query rows per block: about ROW_BUFFER_ELEMENTS scores in the forward's per-thread (rows x Nk) buffer, between
# MIN_ROWS and MAX_ROWS (the backward's buffers are rows x 256). More rows per block reuse each streamed key/value
# row more often; 32-256 rows measured within 5% of each other on a 2-core AVX2 CPU (docs/cpu_kernel.md).
ROW_BUFFER_ELEMENTS = 1 << 19
MIN_ROWS = 16
MAX_ROWS = 128
MAX_DIM = 2**31 - 1  # the kernel passes sizes to BLAS as 32-bit integers


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """``None`` if :func:`run` can run ``inp``, else a short human-readable reason."""
    if inp.q.device.type != "cpu":
        return f"tensors are on {inp.q.device.type}, the kernel is for the CPU"
    err = load_error()
    if err is not None:
        return err
    if max(inp.nq, inp.nk, inp.q.shape[-1], inp.v.shape[-1]) > MAX_DIM // 2:
        return "a sequence length or head_dim too large for the kernel's 32-bit BLAS sizes"
    return None


def block_rows(nk: int, rows: int | None = None) -> int:
    """Query rows per block of the kernel for ``nk`` keys (``rows`` forces it)."""
    if rows is not None:
        return max(1, int(rows))
    return max(MIN_ROWS, min(MAX_ROWS, ROW_BUFFER_ELEMENTS // max(nk, 1)))


def compute_operands(q: Tensor, mask_add: Tensor | None, bias: Tensor | None, slopes: Tensor | None):
    """The float operands in the kernel's compute dtype (float64 for float64 inputs, else float32), converted
    without materializing broadcast dims: ``(mask_add, bias, slopes)``."""
    cdt = compute_dtype(q.dtype)
    slopes = None if slopes is None else slopes.to(cdt).contiguous()
    return _compact_to(mask_add, cdt), _compact_to(bias, cdt), slopes


def _compact_to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``; dims broadcast with stride 0 are converted once and expanded again."""
    if t is None or t.dtype == dtype:
        return t
    index = tuple(slice(0, 1) if t.stride(d) == 0 and t.shape[d] > 1 else slice(None) for d in range(t.dim()))
    return t[index].to(dtype).expand(t.shape)


def _kernel_args(a: FwdArgs | BwdArgs) -> tuple:
    """The kernel arguments after q, k, v (and what the forward saved) that forward and backward share."""
    madd, bias, slopes = compute_operands(a.q, a.mask_add, a.bias, a.slopes)
    seed = 0 if a.seed is None else int(a.seed.item())
    return (a.keep, madd, bias, slopes, a.is_causal, a.scale, a.normalize, a.detach_range, a.eps, a.dropout_p,
            a.window_left, a.window_right, a.softcap, seed, block_rows(a.k.shape[2], a.block_rows or None),
            a.panel_rows or default_panel_rows())


def _forward(a: FwdArgs) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, stats, idx)``: stats ``(B, Hq, Nq, 4)`` = row max, 1/sum of exp(s - max), ``a``, row min."""
    out, stats, idx = extension().forward(a.q, a.k, a.v, *_kernel_args(a), a.need_stats)
    return out, stats, idx


def _backward(a: BwdArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, db = extension().backward(a.grad_out, a.q, a.k, a.v, a.out, a.stats, a.idx, *_kernel_args(a),
                                          a.need_dq, a.need_dk, a.need_dv, a.need_dbias)
    return dq, dk, dv, (db.to(a.bias.dtype) if a.need_dbias and a.bias is not None else db)


def _stats_shapes(a: FwdArgs):
    B, Hq, Nq = a.q.shape[0], a.q.shape[1], a.q.shape[2]
    keep_idx = a.need_stats and a.normalize and not a.detach_range
    return (((B, Hq, Nq, 4) if a.need_stats else (0,), stats_dtype(a)),
            ((B, Hq, Nq, 2) if keep_idx else (0,), torch.int64))


_OP = define_attention_op("cpp", _forward, _backward, _stats_shapes)


def run(inp: AttentionInputs, block_size: int | None = None, panel_rows: int | None = None) -> Tensor:
    """SA attention of a validated CPU call through the fused kernel, ``(B, Hq, Nq, Dv)``. ``block_size``: query
    rows per block (default sized from the key count); ``panel_rows``: query rows per key/value head from which the
    score products use K/V panels (default :func:`.build.default_panel_rows`; 1 forces them). Raises
    ``ValueError`` if the kernel cannot run this call and ``RuntimeError`` if the kernel is unavailable."""
    reason = unsupported_reason(inp)
    if reason is not None:
        if reason == load_error():
            raise RuntimeError(f"backend='cpp' is unavailable: {reason}")
        raise ValueError(f"backend='cpp' cannot run this call: {reason}")
    return _OP(inp, block_size, panel_rows)
