"""The fused Triton backend: SA attention in FlashAttention-2 form, forward and backward (``docs/contract.md`` §3).

Public entry points (used by :mod:`sasoftmax.attention.api`):

* :func:`unsupported_reason` — ``None`` if the kernel can run a call, else a short reason (``backend="auto"`` then
  falls back to the chunked path; ``backend="triton"`` raises with that reason).
* :func:`triton_attention` — ``(B, Hq, Nq, Dv)`` output in the input dtype, differentiable in ``q``, ``k``, ``v`` and
  ``bias``.

The kernels (:mod:`.kernels`) run behind two ``torch.library`` custom operators,
``sasoftmax::triton_sa_fwd`` and ``sasoftmax::triton_sa_bwd``, with fake (meta) implementations and a registered
autograd formula, so ``torch.compile(..., fullgraph=True)`` traces through a call without a graph break. Only tensors,
bools and floats cross the operator boundary; the dropout seed is a tensor (drawn without ``.item()``).

Forward: plain SA in one pass, normalized SA in two (statistics, then exact weights into one accumulator). Backward:
``Delta = rowsum(dO * O)`` in a small kernel, then either

* the fast path (default): one kernel over key blocks computing ``dk``, ``dv`` and adding ``dq`` with float32
  atomics (five matrix products per tile), then a small kernel that converts ``dq`` and applies the sparse range
  correction of the normalized form (a gather for ``dq``, atomics for ``dk`` and the bias gradient); or
* the deterministic path (:data:`DETERMINISTIC`, ``SASOFTMAX_TRITON_DETERMINISTIC=1`` or
  ``torch.use_deterministic_algorithms(True)``): a ``dq`` kernel over query blocks (three products per tile), which
  also completes the range terms, then the key/value kernel (four products per tile) adding them to ``ds`` in place.
  No atomics anywhere: the gradients are bitwise repeatable.

No N x N buffer is allocated (except the bias gradient, which has the bias' own shape; in deterministic mode a
broadcast bias' gradient is reduced from per-(batch, head) partials).

Masks follow :mod:`sasoftmax.attention.inputs`: bool ``keep`` (True = attend), additive float-mask values, additive
``bias`` (may require grad), ALiBi slopes (computed in-kernel), causal aligned bottom-right; all 4-d masks are read
by strides, with stride 0 on broadcast dims. Rows with no visible key give output 0 and gradient 0. Sliding windows
(``window=(left, right)``) and soft-capping (``softcap``) are computed in-kernel; every kernel skips the key (or
query) blocks that no row of its block can see through the window, so a window of ``w`` keys costs O(N w).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor

from ....env import flag
from ...dropout import seed_tensor
from ...inputs import AttentionInputs
from ...op import double_backward_error

try:  # triton is optional
    from . import kernels as _tk

    _TRITON_ERROR: str | None = None
    INTERPRET: bool = _tk.INTERPRET
except Exception as err:  # pragma: no cover - depends on the environment
    _tk = None  # type: ignore[assignment]
    _TRITON_ERROR = f"triton is not installed or failed to import ({type(err).__name__}: {err})"
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

__all__ = ["unsupported_reason", "triton_attention", "MAX_HEAD_DIM", "DETERMINISTIC", "launch_grid",
           "launch_plan", "CUDA_GRID_LIMITS"]

MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRET_BLOCK = 16  # block sizes under the interpreter: small, so that the tests stay fast
_INT32_MAX = 2**31 - 1

DETERMINISTIC: bool | None = None
"""Backward path switch. ``None`` (default): deterministic if the environment variable
``SASOFTMAX_TRITON_DETERMINISTIC`` is set to 1 when this module is imported, or if
``torch.are_deterministic_algorithms_enabled()``; else the fast path. ``True``/``False`` force one path. The
deterministic path has no atomics (gradients bitwise repeatable) and does two more matrix products per tile."""

_ENV_DETERMINISTIC = flag("SASOFTMAX_TRITON_DETERMINISTIC")
_AUTOTUNE = flag("SASOFTMAX_TRITON_AUTOTUNE")


def deterministic() -> bool:
    """Whether the next backward uses the deterministic (atomic-free) path; see :data:`DETERMINISTIC`."""
    if DETERMINISTIC is not None:
        return bool(DETERMINISTIC)
    return _ENV_DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------------------------------------------------
# launch configuration

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim, for sm_90 (H100/H200). Chosen without a
# GPU by compiling the candidates ahead of time (benchmarks/triton_static.py --sweep): the largest tiles with no
# register spills for bf16/fp16 and every feature set but "all", within shared memory. ``kv``/``kv_det`` are the
# key/value kernel of the fast / deterministic path (BLOCK_N keys per program, BLOCK_M queries per iteration).
GPU_CONFIGS: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)},
    "kv": {64: (32, 128, 8, 2), 128: (16, 64, 8, 2), 256: (32, 32, 8, 2)},
    "kv_det": {64: (32, 128, 8, 2), 128: (16, 128, 8, 2), 256: (32, 32, 8, 2)},
    "dq": {64: (128, 32, 8, 2), 128: (128, 32, 8, 2), 256: (32, 32, 4, 2)},
}
# float32 inputs use exact (non-tensor-core) products, which need more registers and shared memory: smaller tiles
# (chosen the same way for the common training case; several still spill, float32 has no spill target).
GPU_CONFIGS_FP32: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "fwd": {64: (64, 32, 8, 2), 128: (32, 32, 8, 2), 256: (64, 32, 8, 2)},
    "kv": {64: (16, 32, 8, 2), 128: (16, 32, 8, 2), 256: (16, 16, 4, 1)},
    "kv_det": {64: (32, 64, 8, 2), 128: (16, 32, 8, 2), 256: (16, 32, 8, 2)},
    "dq": {64: (64, 32, 8, 2), 128: (32, 32, 8, 2), 256: (32, 32, 8, 2)},
}
# the small row kernels (Delta; dq conversion and range correction): BLOCK_M rows of ROW_ELEMENTS / head dim, 4 warps
# (64 rows at D = 64; fewer at larger D, where the gathers, atomics and their addresses would spill)
ROW_ELEMENTS = 4096
ROW_WARPS = 4


def row_block(bd: int) -> int:
    """Rows per program of the row kernels at padded head dim ``bd`` on the GPU."""
    return max(16, min(64, ROW_ELEMENTS // bd))
# the autotuner's candidates (GPU, SASOFTMAX_TRITON_AUTOTUNE=1): the static choices, larger tiles that spill a little,
# smaller ones; above head dim 128 only tiles of at most 64 x 64 are kept
AUTOTUNE_CANDIDATES: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
    "kv": [(32, 128, 8, 2), (16, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2), (32, 32, 8, 2)],
    "kv_det": [(32, 128, 8, 2), (16, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2), (64, 128, 8, 2), (32, 32, 8, 2)],
    "dq": [(128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (32, 32, 4, 2)],
}

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_dim(d: int) -> int:
    """The padded head dim a kernel is compiled for (a power of two >= 16)."""
    return max(16, _pow2(d))


def _n_bucket(nq: int, nk: int) -> int:
    return _pow2(max(nq, nk, 1))


def gpu_config(kind: str, bd: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``kind`` for padded head dim ``bd`` on the GPU."""
    table = (GPU_CONFIGS_FP32 if dtype == torch.float32 else GPU_CONFIGS)[kind]
    return table[min(d for d in table if d >= bd)]


def launch_grid(rows: int, block: int, programs: int) -> tuple[int, int, int]:
    """The CUDA grid of a kernel over ``cdiv(rows, block)`` blocks times ``programs`` (batch x heads): everything on
    axis 0 (limit 2^31 - 1), so that a large batch never meets the 65535 limit of axes 1 and 2."""
    n = -(-rows // block) * programs
    if n > CUDA_GRID_LIMITS[0]:
        raise ValueError(f"{n} programs exceed CUDA's grid limit of {CUDA_GRID_LIMITS[0]}")
    return (max(n, 1), 1, 1)


def launch_plan(B: int, H: int, Hkv: int, Nq: int, Nk: int, D: int, Dv: int, dtype: torch.dtype,
                deterministic: bool = False) -> dict[str, tuple[int, int, int]]:
    """The grids of every kernel of one call (forward and backward) on the GPU, by kernel name."""
    bd = max(block_dim(D), block_dim(Dv))
    fwd = gpu_config("fwd", bd, dtype)
    kv = gpu_config("kv_det" if deterministic else "kv", bd, dtype)
    plan = {
        "sa_fwd": launch_grid(Nq, fwd[0], B * H),
        "sa_bwd_pre": launch_grid(Nq, row_block(bd), B * H),
        "sa_bwd_kv": launch_grid(Nk, kv[1], B * Hkv),
    }
    if deterministic:
        plan["sa_bwd_dq"] = launch_grid(Nq, gpu_config("dq", bd, dtype)[0], B * H)
    else:
        plan["sa_bwd_post"] = launch_grid(Nq, row_block(bd), B * H)
    return plan


_TUNED: dict[str, Any] = {}


def _autotuned(kind: str) -> Any:
    """``triton.autotune`` wrappers of the three big kernels (GPU, ``SASOFTMAX_TRITON_AUTOTUNE=1``)."""
    if kind in _TUNED:
        return _TUNED[kind]
    import triton

    def prune_big_d(configs: list, named_args: dict, **kwargs: Any) -> list:
        # above head dim 128 keep only the small tiles (the others do not fit in shared memory / registers)
        big = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
        if big > 128:
            small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
            return small or configs
        return configs

    keys = ["N_BUCKET", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "NORMALIZE", "RANGE_GRAD", "HAS_KEEP", "HAS_MADD",
            "HAS_BIAS", "HAS_ALIBI", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_DROPOUT"]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
               for bm, bn, w, st in AUTOTUNE_CANDIDATES[kind]]
    prune = {"early_config_prune": prune_big_d}
    fn = {"fwd": _tk.sa_fwd, "kv": _tk.sa_bwd_kv, "kv_det": _tk.sa_bwd_kv, "dq": _tk.sa_bwd_dq}[kind]
    extra: dict[str, Any] = {}
    if kind == "kv":  # atomics: zero the accumulators before each timed trial
        extra["reset_to_zero"] = ["DQacc", "RowA", "RowB", "DBias"]
        keys = [*keys, "BIAS_GRAD", "NEED_DQ"]
    elif kind == "kv_det":
        keys = [*keys, "BIAS_GRAD"]
    _TUNED[kind] = triton.autotune(configs, key=keys, prune_configs_by=prune, **extra)(fn)
    return _TUNED[kind]


LAUNCH_HOOK: Any = None
"""If set, ``LAUNCH_HOOK(kind, fn, grid, args, kwargs)`` is called instead of launching a kernel (used by
``benchmarks/triton_static.py`` to compile, for sm_90, exactly what the launcher would run)."""


def _run(kind: str, fn: Any, grid: Any, args: list, kwargs: dict[str, Any]) -> None:
    if LAUNCH_HOOK is not None:
        LAUNCH_HOOK(kind, fn, grid, args, kwargs)
        return
    fn[grid](*args, **kwargs)


def _launch(kind: str, fn: Any, rows: int, programs: int, bd: int, dtype: torch.dtype, args: list,
            consts: dict[str, Any]) -> None:
    """Launch ``fn`` (kind "fwd", "kv", "kv_det", "dq") on a one-dimensional grid (see :func:`launch_grid`)."""
    block_key = "BLOCK_N" if kind.startswith("kv") else "BLOCK_M"
    if INTERPRET:
        opts: dict[str, int] = {"BLOCK_M": _INTERPRET_BLOCK, "BLOCK_N": _INTERPRET_BLOCK}
    elif _AUTOTUNE and dtype != torch.float32 and LAUNCH_HOOK is None:
        fn = _autotuned(kind)
        fn[lambda meta: launch_grid(rows, meta[block_key], programs)](*args, **consts)
        return
    else:
        bm, bn, warps, stages = gpu_config(kind, bd, dtype)
        opts = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    _run(kind, fn, launch_grid(rows, opts[block_key], programs), args, {**consts, **opts})


def _row_opts(bd: int) -> dict[str, int]:
    if INTERPRET:
        return {"BLOCK_M": 2 * _INTERPRET_BLOCK}
    return {"BLOCK_M": row_block(bd), "num_warps": ROW_WARPS}


# ----------------------------------------------------------------------------------------------------------------------
# checks


def _offsets_fit(t: Tensor | None) -> bool:
    """Whether the offsets of ``t`` within one (batch, head) slice (its last two dims) fit in 32 bits."""
    return t is None or sum((t.shape[d] - 1) * t.stride(d) for d in (2, 3) if t.shape[d] > 0) < _INT32_MAX


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """``None`` if :func:`triton_attention` can run ``inp``, else a short human-readable reason."""
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    q, k, v = inp.q, inp.k, inp.v
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32 are)"
    if not q.is_cuda and not INTERPRET:
        return "tensors are not on CUDA and TRITON_INTERPRET is not set"
    if q.is_cuda and INTERPRET:
        return "TRITON_INTERPRET is set, so the kernels were built for the interpreter, not for CUDA"
    if INTERPRET and q.dtype == torch.bfloat16:
        return "bfloat16 is not supported under the Triton interpreter"
    D, Dv = q.shape[-1], v.shape[-1]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"head_dim {max(D, Dv)} > {MAX_HEAD_DIM}"
    if D < 1 or Dv < 1:
        return "head_dim 0"
    # in-kernel offsets within one (batch, head) slice are 32-bit (the output and the gradients are allocated
    # contiguous like q, k, v; a grad_out that does not fit is made contiguous in the backward)
    for name, t in (("q", q), ("k", k), ("v", v), ("attn_mask", inp.keep), ("attn_mask", inp.mask_add),
                    ("bias", inp.bias)):
        if not _offsets_fit(t):
            return f"`{name}` is too large for the kernel's 32-bit offsets within one (batch, head)"
    if max(inp.nq, inp.nk) * max(D, Dv) >= _INT32_MAX:
        return "the output or a gradient is too large for the kernel's 32-bit offsets within one (batch, head)"
    if inp.bias is not None and inp.bias.requires_grad and inp.nq * inp.nk >= _INT32_MAX:
        return "the bias gradient is too large for the kernel's 32-bit offsets"
    smallest = _INTERPRET_BLOCK if INTERPRET else 16
    if -(-max(inp.nq, inp.nk) // smallest) * inp.batch * inp.heads > CUDA_GRID_LIMITS[0]:
        return "too many (batch, head, block) programs for one CUDA grid"
    from . import selftest

    return selftest.reason(inp)  # (on CUDA: this kind of call checked once against the chunked backend)


# ----------------------------------------------------------------------------------------------------------------------
# kernel arguments


def _strides4(t: Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a 4-d broadcastable tensor with 0 on the broadcast (size-1) dims; zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in range(4))  # type: ignore[return-value]


def _extras(keep: Tensor | None, madd: Tensor | None, bias: Tensor | None, slopes: Tensor | None,
            dummy: Tensor) -> tuple[list[Tensor], list[int], dict[str, bool]]:
    """Pointers, strides and flags of the optional score terms, shared by the kernels."""
    args = [dummy if keep is None else keep.view(torch.uint8), dummy if madd is None else madd,
            dummy if bias is None else bias, dummy if slopes is None else slopes]
    strides = [*_strides4(keep), *_strides4(madd), *_strides4(bias),
               *((0, 0) if slopes is None else (0 if slopes.shape[0] == 1 else slopes.stride(0), slopes.stride(1)))]
    flags = {"HAS_KEEP": keep is not None, "HAS_MADD": madd is not None, "HAS_BIAS": bias is not None,
             "HAS_ALIBI": slopes is not None}
    return args, strides, flags


def _dropout_args(p: float) -> list[Any]:
    """Kernel arguments ``drop_thr, drop_scale``; the threshold goes in as ``value | 2**32`` so that Triton types it
    int64 (the kernels use the low 32 bits). It is the one of :func:`sasoftmax.attention.dropout.keep_mask` (keep if
    hash >= p 2^32)."""
    if p <= 0.0:
        return [1 << 32, 1.0]
    return [int(p * 2**32) | 1 << 32, 1.0 / (1.0 - p)]


def _window_args(win_left: int, win_right: int, softcap: float, nq: int, nk: int) -> tuple[list[Any], dict[str, bool]]:
    """Kernel arguments ``win_left, win_right, cap`` and the flags ``HAS_WINDOW``, ``HAS_SOFTCAP`` from the operator's
    ``(-1, -1)`` = no window, ``-1`` = unbounded side, ``softcap`` 0 = off. An unbounded side becomes a distance no
    query/key pair reaches, so the kernels test both sides without a branch."""
    far = nq + nk + 1
    has_window = win_left >= 0 or win_right >= 0
    args = [far if win_left < 0 else win_left, far if win_right < 0 else win_right, softcap if softcap > 0 else 1.0]
    return args, {"HAS_WINDOW": has_window, "HAS_SOFTCAP": softcap > 0}


def _dot_prec(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (no TF32, off the tensor cores), so that the accuracy rule holds
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _empty(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(0, dtype=t.dtype if dtype is None else dtype, device=t.device)


# ----------------------------------------------------------------------------------------------------------------------
# the operators

_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? keep, Tensor? mask_add, Tensor? bias, Tensor? slopes, Tensor? seed, "
    "bool is_causal, float scale, bool normalize, bool range_grad, float eps, float dropout_p, bool need_grad, "
    "bool deterministic, int win_left, int win_right, float softcap) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor rowm, Tensor rowl, "
    "Tensor ra, Tensor rb, Tensor rc, Tensor imin, Tensor imax, Tensor? keep, Tensor? mask_add, Tensor? bias, "
    "Tensor? slopes, Tensor? seed, bool is_causal, float scale, bool normalize, bool range_grad, float eps, "
    "float dropout_p, bool need_dq, bool need_dk, bool need_dv, bool need_dbias, bool deterministic, "
    "int win_left, int win_right, float softcap) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fwd_shapes(q, v, normalize, range_grad):
    B, H, Nq, _ = q.shape
    Dv = v.shape[3]
    return (
        (B, H, Nq, Dv),
        (B, H, Nq),
        (B, H, Nq) if normalize else (0,),
        (B, H, Nq) if range_grad else (0,),
    )


@torch.library.custom_op("sasoftmax::triton_sa_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd_op(q, k, v, keep, mask_add, bias, slopes, seed, is_causal, scale, normalize, range_grad, eps, dropout_p,
            need_grad, deterministic, win_left, win_right, softcap):
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    s_out, s_row, s_norm, s_idx = _fwd_shapes(q, v, normalize, range_grad)
    out = torch.empty(s_out, dtype=q.dtype, device=dev)
    rowm, rowl = (torch.empty(s_row, dtype=torch.float32, device=dev) for _ in range(2))
    ra, rb, rc = (torch.empty(s_norm, dtype=torch.float32, device=dev) for _ in range(3))
    imin, imax = (torch.empty(s_idx, dtype=torch.int32, device=dev) for _ in range(2))
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    ex_args, ex_strides, ex_flags = _extras(keep, mask_add, bias, slopes, dummy)
    win_args, win_flags = _window_args(win_left, win_right, softcap, Nq, Nk)
    bd = max(block_dim(D), block_dim(Dv))
    with _device_guard(q):
        _launch("fwd", _tk.sa_fwd, Nq, B * H, bd, q.dtype, [
            q, k, v, out, rowm, rowl, ra if normalize else dummy,
            rb if normalize else dummy, rc if normalize else dummy, imin if range_grad else dummy,
            imax if range_grad else dummy, *ex_args, dummy if seed is None else seed,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ex_strides,
            H, H // Hkv, Nq, Nk, D, Dv, scale, eps, _n_bucket(Nq, Nk), *_dropout_args(dropout_p), *win_args,
        ], dict(IS_CAUSAL=is_causal, NORMALIZE=normalize, RANGE_GRAD=range_grad, HAS_DROPOUT=seed is not None,
                DOT_PREC=_dot_prec(q.dtype), BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv),
                **ex_flags, **win_flags))
    return out, rowm, rowl, ra, rb, rc, imin, imax


@_fwd_op.register_fake
def _fwd_fake(q, k, v, keep, mask_add, bias, slopes, seed, is_causal, scale, normalize, range_grad, eps, dropout_p,
              need_grad, deterministic, win_left, win_right, softcap):
    s_out, s_row, s_norm, s_idx = _fwd_shapes(q, v, normalize, range_grad)
    f32, i32 = torch.float32, torch.int32
    return (q.new_empty(s_out), q.new_empty(s_row, dtype=f32), q.new_empty(s_row, dtype=f32),
            q.new_empty(s_norm, dtype=f32),
            q.new_empty(s_norm, dtype=f32), q.new_empty(s_norm, dtype=f32), q.new_empty(s_idx, dtype=i32),
            q.new_empty(s_idx, dtype=i32))


def _bias_grad_layout(bias: Tensor, B: int, H: int, Nq: int, Nk: int, n_blk: int, det: bool, dev: torch.device):
    """The float32 buffer the key/value kernel writes the bias gradient to, its strides and flags.

    Fast path: the bias' own shape (stride 0 on broadcast dims), atomics where programs share an element.
    Deterministic path: per-(batch, head) partials (and per key block for a bias broadcast over the keys), written
    without atomics and summed afterwards by :func:`_bias_grad_finish`."""
    bm = bias.shape[2] == 1 and Nq > 1  # broadcast over the query rows: summed over them
    bn = bias.shape[3] == 1 and Nk > 1  # broadcast over the keys
    if det:
        buf = torch.zeros(B, H, 1 if bias.shape[2] == 1 else Nq, n_blk if bn else (1 if bias.shape[3] == 1 else Nk),
                          dtype=torch.float32, device=dev)
        return buf, list(buf.stride()), bm, bn, False
    buf = torch.zeros(bias.shape, dtype=torch.float32, device=dev)
    atomic = (bias.shape[0] == 1 and B > 1) or (bias.shape[1] == 1 and H > 1) or bn
    return buf, list(_strides4(buf)), bm, bn, atomic


def _bias_grad_finish(buf: Tensor, bias: Tensor, det: bool) -> Tensor:
    if det:
        dims = [d for d in range(4) if bias.shape[d] == 1 and buf.shape[d] != 1]
        if dims:
            buf = buf.sum(dim=dims, keepdim=True)
    return buf.to(bias.dtype)


def _bwd_scratch(q: Tensor, rows: int, fast_dq: bool, range_grad: bool, det: bool, dummy: Tensor) -> tuple:
    """The backward's float32 scratch: ``Delta`` per row, the atomic dq accumulator (fast path), and the per-row
    range terms (``dL/da``, ``dL/db``: accumulated by the fast path, computed by the deterministic dq kernel)."""
    B, H, Nq, D = q.shape
    f32, dev = torch.float32, q.device
    delta = torch.empty(B, H, Nq, dtype=f32, device=dev)
    dq_acc = torch.empty(B, H, Nq, D, dtype=f32, device=dev) if fast_dq else dummy
    fast_rows = [torch.empty(rows, dtype=f32, device=dev) if range_grad and not det else dummy for _ in range(2)]
    det_rows = [torch.empty(rows, dtype=f32, device=dev) if range_grad and det else dummy for _ in range(2)]
    return delta, dq_acc, *fast_rows, *det_rows


@torch.library.custom_op("sasoftmax::triton_sa_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd_op(grad_out, q, k, v, out, rowm, rowl, ra, rb, rc, imin, imax, keep, mask_add, bias, slopes, seed,
            is_causal, scale, normalize, range_grad, eps, dropout_p, need_dq, need_dk, need_dv, need_dbias,
            deterministic, win_left, win_right, softcap):
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    dev = q.device
    f32 = torch.float32
    if not _offsets_fit(grad_out):
        grad_out = grad_out.contiguous()
    dummy = torch.empty(1, dtype=f32, device=dev)
    if not normalize:
        ra = rb = rc = dummy
    if not range_grad:
        imin = imax = torch.empty(1, dtype=torch.int32, device=dev)
    need_bias = need_dbias and bias is not None
    need_kv = need_dk or need_dv or need_bias
    det = deterministic
    ex_args, ex_strides, ex_flags = _extras(keep, mask_add, bias, slopes, dummy)
    win_args, win_flags = _window_args(win_left, win_right, softcap, Nq, Nk)
    seed_arg = dummy if seed is None else seed
    drop = [*_dropout_args(dropout_p), *win_args]
    bd = max(block_dim(D), block_dim(Dv))
    prec = _dot_prec(q.dtype)
    common = dict(IS_CAUSAL=is_causal, NORMALIZE=normalize, RANGE_GRAD=range_grad, HAS_DROPOUT=seed is not None,
                  DOT_PREC=prec, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv), **ex_flags, **win_flags)
    bucket = _n_bucket(Nq, Nk)
    rows = B * H * Nq

    fast_dq = need_dq and not det
    delta, dq_acc, row_a, row_b, da, db = _bwd_scratch(q, rows, fast_dq, range_grad, det, dummy)
    dq = torch.empty(B, H, Nq, D, dtype=q.dtype, device=dev) if need_dq else _empty(q)
    # the fast path adds the range correction to dk by atomics, which need a float32 dk
    dk_dtype = f32 if range_grad and not det and need_dk else k.dtype
    dk = torch.empty(B, Hkv, Nk, D, dtype=dk_dtype, device=dev) if need_kv else _empty(k)
    dv = torch.empty(B, Hkv, Nk, Dv, dtype=v.dtype, device=dev) if need_kv else _empty(v)
    kv_kind = "kv_det" if det else "kv"
    if need_bias:
        n_blk = -(-Nk // (_INTERPRET_BLOCK if INTERPRET else gpu_config(kv_kind, bd, q.dtype)[1]))
        dbuf, sdb, db_bm, db_bn, db_atomic = _bias_grad_layout(bias, B, H, Nq, Nk, n_blk, det, dev)
    else:
        dbuf, sdb, db_bm, db_bn, db_atomic = dummy, [0, 0, 0, 0], False, False, False

    with _device_guard(q):
        _run("pre", _tk.sa_bwd_pre, launch_grid(Nq, _row_opts(bd)["BLOCK_M"], B * H), [
            out, grad_out, delta, dq_acc, row_a, row_b,
            *out.stride(), *grad_out.stride(), H, Nq, D, Dv,
        ], dict(ZERO_DQ=fast_dq, ZERO_ROWS=range_grad and not det,
                BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv), **_row_opts(bd)))
        if det and (need_dq or (range_grad and need_kv)):
            _launch("dq", _tk.sa_bwd_dq, Nq, B * H, bd, q.dtype, [
                q, k, v, grad_out, rowm, rowl, delta, ra, rb, rc, imin, imax, da, db, dq if need_dq else dummy,
                *ex_args, seed_arg,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
                *(dq.stride() if need_dq else (0, 0, 0, 0)), *ex_strides,
                H, G, Nq, Nk, D, Dv, scale, eps, bucket, *drop,
            ], dict(common, NEED_DQ=need_dq))
        if need_kv or fast_dq:
            _launch(kv_kind, _tk.sa_bwd_kv, Nk, B * Hkv, bd, q.dtype, [
                q, k, v, grad_out, rowm, rowl, delta, ra, rb, rc, imin, imax, da, db, row_a, row_b, dq_acc,
                dk if need_kv else dummy, dv if need_kv else dummy, dbuf, *ex_args, seed_arg,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
                *(dk.stride() if need_kv else (0, 0, 0, 0)), *(dv.stride() if need_kv else (0, 0, 0, 0)), *sdb,
                *ex_strides, H, Hkv, G, Nq, Nk, D, Dv, scale, eps, bucket, *drop,
            ], dict(common, BIAS_GRAD=need_bias, DB_BCAST_M=db_bm, DB_BCAST_N=db_bn, DB_ATOMIC=db_atomic,
                    ATOMIC_DQ=not det, NEED_DQ=fast_dq, NEED_KV=need_kv))
        if not det and (fast_dq or (range_grad and (need_dk or need_bias))):
            _run("post", _tk.sa_bwd_post, launch_grid(Nq, _row_opts(bd)["BLOCK_M"], B * H), [
                q, k, dq_acc, dq if need_dq else dummy, dk if need_kv else dummy, dbuf, delta, ra, rb, rc, imin,
                imax, row_a, row_b,
                *q.stride(), *k.stride(), *(dq.stride() if need_dq else (0, 0, 0, 0)),
                *(dk.stride() if need_kv else (0, 0, 0, 0)), *sdb, H, G, Nq, D, scale, win_args[2],
            ], dict(RANGE_GRAD=range_grad, NEED_DQ=need_dq, NEED_DK=need_dk and range_grad, BIAS_GRAD=need_bias,
                    HAS_SOFTCAP=win_flags["HAS_SOFTCAP"], BLOCK_D=block_dim(D), **_row_opts(bd)))
    if need_kv and dk.dtype != k.dtype:
        dk = dk.to(k.dtype)
    dbias = _bias_grad_finish(dbuf, bias, det) if need_bias else _empty(q)
    return dq, dk if need_dk else _empty(k), dv if need_dv else _empty(v), dbias


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, rowm, rowl, ra, rb, rc, imin, imax, keep, mask_add, bias, slopes, seed,
              is_causal, scale, normalize, range_grad, eps, dropout_p, need_dq, need_dk, need_dv, need_dbias,
              deterministic, win_left, win_right, softcap):
    return (q.new_empty(q.shape if need_dq else (0,)), k.new_empty(k.shape if need_dk else (0,)),
            v.new_empty(v.shape if need_dv else (0,)),
            q.new_empty(bias.shape if need_dbias and bias is not None else (0,),
                        dtype=bias.dtype if bias is not None else q.dtype))


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, keep, mask_add, bias, slopes, seed, is_causal, scale, normalize, range_grad, eps, dropout_p,
     need_grad, det, win_left, win_right, softcap) = inputs
    out, rowm, rowl, ra, rb, rc, imin, imax = output
    ctx.save_for_backward(q, k, v, keep, mask_add, bias, slopes, seed, out, rowm, rowl, ra, rb, rc, imin,
                          imax)
    ctx.flags = (is_causal, scale, normalize, range_grad, eps, dropout_p, det, win_left, win_right, softcap)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, *_unused):
    q, k, v, keep, mask_add, bias, slopes, seed, out, rowm, rowl, ra, rb, rc, imin, imax = ctx.saved_tensors
    is_causal, scale, normalize, range_grad, eps, dropout_p, det, win_left, win_right, softcap = ctx.flags
    need = ctx.needs_input_grad
    need_db = bool(need[5]) and ctx.has_bias
    dq, dk, dv, dbias = torch.ops.sasoftmax.triton_sa_bwd(
        grad_out, q, k, v, out, rowm, rowl, ra, rb, rc, imin, imax, keep, mask_add, bias, slopes, seed,
        is_causal, scale, normalize, range_grad, eps, dropout_p, bool(need[0]), bool(need[1]), bool(need[2]),
        need_db, det, win_left, win_right, softcap,
    )
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None,
            dbias if need_db else None, *([None] * 13))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _double_backward(ctx, *grads):
    raise double_backward_error("triton")


_bwd_op.register_autograd(_double_backward, setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------------------------------------------------
# entry point


def _seed_tensor(inp: AttentionInputs) -> Tensor:
    """The dropout seed of :func:`sasoftmax.attention.dropout.seed_tensor` (the same draw as every backend) on the
    input's device, without ``.item()``: no host synchronization (the copy of a CPU-drawn seed is non-blocking: a
    pageable 8-byte source is staged by the host and the copy never waits for the device), and traceable."""
    seed = inp.seed if inp.seed is not None else seed_tensor(inp.generator)
    return seed.to(inp.q.device, non_blocking=True)


def triton_attention(inp: AttentionInputs) -> Tensor:
    """Fused SA attention: ``(B, Hq, Nq, Dv)`` in the input dtype; differentiable in q, k, v and bias.

    Raises ``ValueError`` with :func:`unsupported_reason` if the kernel cannot run this call."""
    reason = unsupported_reason(inp)
    if reason is not None:
        raise ValueError(f"the Triton SA kernel cannot run this call: {reason}")
    q, k, v = inp.q, inp.k, inp.v
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        shape = (inp.batch, inp.heads, inp.nq, v.shape[-1])
        zeros = q.new_zeros(shape)
        # keep the graph connected so that .backward() works and yields zero gradients
        return zeros + 0.0 * (q.sum() + k.sum() + v.sum())
    return torch.ops.sasoftmax.triton_sa_fwd(*fwd_op_args(inp))[0]


def fwd_op_args(inp: AttentionInputs) -> tuple:
    """The arguments of ``sasoftmax::triton_sa_fwd`` for a call (whether gradients are needed is read from the
    inputs and the grad mode; the dropout seed is drawn here)."""
    q, k, v, bias = inp.q, inp.k, inp.v, inp.bias
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    range_grad = inp.normalize and not inp.detach_range and need_grad
    seed = _seed_tensor(inp) if inp.dropout_p > 0 else None
    win_left, win_right = inp.window if inp.window is not None else (-1, -1)
    return (q, k, v, inp.keep, inp.mask_add, bias, inp.alibi_slopes, seed, inp.is_causal, inp.scale, inp.normalize,
            range_grad, inp.eps, inp.dropout_p, need_grad, deterministic(), win_left, win_right,
            inp.softcap if inp.softcap is not None else 0.0)


def load_error() -> str | None:
    """None if the triton package and the kernels imported, else why not."""
    return _TRITON_ERROR


def run(inp: AttentionInputs) -> Tensor:
    """The backend entry point (:func:`triton_attention`)."""
    return triton_attention(inp)
