"""The CPU backends as ``torch.library`` custom ops, so that ``torch.compile(fullgraph=True)`` traces them.

Two ops serve both memory-efficient backends (``backend`` is ``"cpp"``, the fused kernel, or ``"chunked"``):

* ``sasoftmax::attention_fwd(q, k, v, keep?, mask_add?, bias?, slopes?, seed?, ...) -> (out, stats, idx)``
* ``sasoftmax::attention_bwd(grad_out, q, k, v, out, stats, idx, keep?, ...) -> (dq, dk, dv, dbias)``

with a fake (meta) implementation each, and the backward registered as the forward's autograd formula. Only
tensors, floats, bools, ints and strings cross the op boundary: the masks and biases are the canonical views of
:class:`~.inputs.AttentionInputs`, and the dropout seed is an int64 tensor drawn in the caller (inside a compiled
region too) and read inside the op. Outputs that are not needed are empty tensors (shape ``(0,)``).

Saved for the backward: ``q, k, v, out`` and per-row statistics (``stats``, ``idx``; layout per backend, see
:func:`stats_shapes`), i.e. O(N * D) memory.
"""

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from . import chunked, cpp_backend
from .dropout import seed_tensor
from .inputs import AttentionInputs

__all__ = ["attention", "stats_shapes", "OP_BACKENDS", "FwdArgs", "BwdArgs", "double_backward_error"]

OP_BACKENDS = ("cpp", "chunked")


class FwdArgs(NamedTuple):
    """The arguments of ``sasoftmax::attention_fwd``, in schema order (the schema is built from these fields)."""

    q: Tensor
    k: Tensor
    v: Tensor
    keep: Tensor | None  # bool, True = attend, broadcastable to (B, Hq, Nq, Nk)
    mask_add: Tensor | None  # additive float-mask values (0 at masked entries)
    bias: Tensor | None  # additive bias (may require grad)
    slopes: Tensor | None  # ALiBi slopes (B or 1, Hq)
    seed: Tensor | None  # int64 (1,): dropout seed (None: no dropout)
    is_causal: bool
    scale: float
    normalize: bool
    detach_range: bool
    eps: float
    dropout_p: float
    backend: str  # "cpp" or "chunked"
    block_rows: int  # query rows per block (0: the backend's default)
    need_stats: bool  # keep the per-row statistics for a backward


class BwdArgs(NamedTuple):
    """The arguments of ``sasoftmax::attention_bwd``: the gradient of the output, what the forward saved, then the
    forward's arguments after ``q, k, v`` and flags saying which gradients to compute."""

    grad_out: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    stats: Tensor
    idx: Tensor
    keep: Tensor | None
    mask_add: Tensor | None
    bias: Tensor | None
    slopes: Tensor | None
    seed: Tensor | None
    is_causal: bool
    scale: float
    normalize: bool
    detach_range: bool
    eps: float
    dropout_p: float
    backend: str
    block_rows: int
    need_dq: bool
    need_dk: bool
    need_dv: bool
    need_dbias: bool


_SCHEMA_TYPES = {Tensor: "Tensor", Tensor | None: "Tensor?", bool: "bool", float: "float", int: "int", str: "str"}


def _schema(args: type, returns: int) -> str:
    params = ", ".join(f"{_SCHEMA_TYPES[t]} {name}" for name, t in args.__annotations__.items())
    return f"({params}) -> ({', '.join(['Tensor'] * returns)})"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_shapes(backend: str, q: Tensor, need_stats: bool, normalize: bool, detach_range: bool):
    """``((stats shape, dtype), (idx shape, dtype))`` of the forward's saved statistics.

    ``cpp``: stats ``(B, Hq, Nq, 4)`` = row max, 1/sum of exp(s - max), ``a``, row min; ``chunked``:
    ``(B, Hq, Nq, 2)`` = ``a``, ``b`` (normalized form only). ``idx`` ``(B, Hq, Nq, 2)`` int64 = arg-min, arg-max
    key (differentiated range only). Shape ``(0,)`` where not kept."""
    B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
    cdt = _compute_dtype(q.dtype)
    width = 4 if backend == "cpp" else 2
    keep_stats = need_stats and (backend == "cpp" or normalize)
    keep_idx = need_stats and normalize and not detach_range
    return (((B, Hq, Nq, width) if keep_stats else (0,), cdt), ((B, Hq, Nq, 2) if keep_idx else (0,), torch.int64))


def _seed_value(seed: Tensor | None) -> int | None:
    return None if seed is None else int(seed.item())


def _inputs(a: FwdArgs | BwdArgs) -> AttentionInputs:
    """The call as the chunked backend takes it (contiguous q, k, v, so that its tiles are views)."""
    return AttentionInputs(
        q=a.q.contiguous(), k=a.k.contiguous(), v=a.v.contiguous(), keep=a.keep, mask_add=a.mask_add, bias=a.bias,
        alibi_slopes=a.slopes, is_causal=a.is_causal, scale=a.scale, normalize=a.normalize,
        detach_range=a.detach_range, eps=a.eps, dropout_p=a.dropout_p, generator=None,
    )


def _cpp_common(a: FwdArgs | BwdArgs) -> tuple:
    """The kernel arguments after q, k, v (and stats) that forward and backward share."""
    madd, bias, slopes = cpp_backend.compute_operands(a.q, a.mask_add, a.bias, a.slopes)
    seed = _seed_value(a.seed)
    return (a.keep, madd, bias, slopes, a.is_causal, a.scale, a.normalize, a.detach_range, a.eps, a.dropout_p,
            0 if seed is None else seed, cpp_backend.block_rows(a.k.shape[2], a.block_rows or None))


def _attention_fwd(*args):
    """``(out (B, Hq, Nq, Dv), stats, idx)`` of :class:`FwdArgs` (:func:`stats_shapes`)."""
    a = FwdArgs(*args)
    if a.backend == "cpp":
        out, stats, idx = cpp_backend.extension().forward(a.q, a.k, a.v, *_cpp_common(a), a.need_stats)
        return out, stats, idx
    return chunked.forward_op(_inputs(a), _seed_value(a.seed), a.block_rows or None, a.need_stats)


_fwd_op = torch.library.custom_op("sasoftmax::attention_fwd", _attention_fwd, mutates_args=(),
                                  schema=_schema(FwdArgs, 3))


@_fwd_op.register_fake
def _attention_fwd_fake(*args):
    a = FwdArgs(*args)
    (s_shape, s_dt), (i_shape, i_dt) = stats_shapes(a.backend, a.q, a.need_stats, a.normalize, a.detach_range)
    out = a.q.new_empty(a.q.shape[0], a.q.shape[1], a.q.shape[2], a.v.shape[3])
    return out, a.q.new_empty(s_shape, dtype=s_dt), a.q.new_empty(i_shape, dtype=i_dt)


@torch.library.custom_op("sasoftmax::attention_bwd", mutates_args=(), schema=_schema(BwdArgs, 4))
def _attention_bwd(*args):
    """``(dq, dk, dv, dbias)`` of :class:`BwdArgs`, each in its input's shape and dtype, or empty where not asked."""
    a = BwdArgs(*args)
    if a.backend == "cpp":
        dq, dk, dv, db = cpp_backend.extension().backward(
            a.grad_out, a.q, a.k, a.v, a.out, a.stats, a.idx, *_cpp_common(a), a.need_dq, a.need_dk, a.need_dv,
            a.need_dbias)
        return dq, dk, dv, (db.to(a.bias.dtype) if a.need_dbias else db)
    grads = chunked.backward_op(_inputs(a), _seed_value(a.seed), a.block_rows or None, a.grad_out, a.out, a.stats,
                                a.idx, (a.need_dq, a.need_dk, a.need_dv, a.need_dbias))
    return tuple(a.q.new_empty(0) if t is None else t.contiguous() for t in grads)  # (the fake's layout)


@_attention_bwd.register_fake
def _attention_bwd_fake(*args):
    a = BwdArgs(*args)

    def like(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need else a.q.new_empty(0)

    return like(a.q, a.need_dq), like(a.k, a.need_dk), like(a.v, a.need_dv), like(a.bias, a.need_dbias)


def _setup_context(ctx, inputs, output) -> None:
    a = FwdArgs(*inputs)
    out, stats, idx = output
    ctx.save_for_backward(a.q, a.k, a.v, out, stats, idx, a.keep, a.mask_add, a.bias, a.slopes, a.seed)
    ctx.static = inputs[8:-1]  # is_causal ... block_rows: the scalar arguments the backward op repeats
    ctx.mark_non_differentiable(stats, idx)


def _backward(ctx, grad_out, _grad_stats, _grad_idx):
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    bias = saved[8]
    need_dbias = bool(need[5]) and bias is not None
    dq, dk, dv, db = torch.ops.sasoftmax.attention_bwd(
        grad_out, *saved, *ctx.static, bool(need[0]), bool(need[1]), bool(need[2]), need_dbias)
    grads = [dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None,
             db if need_dbias else None]
    return (*grads, *([None] * (len(need) - len(grads))))


torch.library.register_autograd("sasoftmax::attention_fwd", _backward, setup_context=_setup_context)


def double_backward_error(backend: str) -> RuntimeError:
    """The error of a backward through a fused backend's gradient (the gradient is not differentiable)."""
    return RuntimeError(
        f"sasoftmax: double backward is not supported by backend={backend!r}: its gradient is computed by a kernel "
        "that autograd cannot differentiate again (torch.autograd.grad(..., create_graph=True) followed by a "
        "backward through that gradient, as gradient penalties and Hessian-vector products do). Use "
        "backend='reference' for such a call: its gradient is built from differentiable operations.")


def _bwd_setup_context(ctx, inputs, output) -> None:
    ctx.backend = BwdArgs(*inputs).backend


def _double_backward(ctx, *grads):
    raise double_backward_error(ctx.backend)


torch.library.register_autograd("sasoftmax::attention_bwd", _double_backward, setup_context=_bwd_setup_context)


def _empty_result(inp: AttentionInputs) -> Tensor:
    """Output of a call with no query, key, batch entry, head or value dim: zeros, still attached to the graph
    (so that ``.backward()`` works and yields zero gradients)."""
    out = inp.q.new_zeros(inp.batch, inp.heads, inp.nq, inp.v.shape[-1])
    parts = [t.sum() for t in (inp.q, inp.k, inp.v, inp.bias) if t is not None and t.requires_grad]
    return out + 0.0 * sum(parts) if parts else out


def attention(inp: AttentionInputs, backend: str, block_size: int | None = None) -> Tensor:
    """SA attention of a validated call through the custom op with ``backend`` (``"cpp"`` or ``"chunked"``);
    ``block_size`` fixes the query rows per block (default: sized by the backend). Returns ``(B, Hq, Nq, Dv)``."""
    if backend not in OP_BACKENDS:
        raise ValueError(f"unknown op backend {backend!r}; expected one of {OP_BACKENDS}")
    if min(inp.nq, inp.nk, inp.batch, inp.heads, inp.v.shape[-1]) == 0:
        return _empty_result(inp)
    if block_size is not None and int(block_size) < 1:
        raise ValueError(f"`block_size` must be a positive number of query rows, got {block_size}")
    seed = seed_tensor(inp.generator) if inp.dropout_p > 0 else None
    need_stats = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (inp.q, inp.k, inp.v, inp.bias))
    args = (inp.q, inp.k, inp.v, inp.keep, inp.mask_add, inp.bias, inp.alibi_slopes, seed, inp.is_causal,
            float(inp.scale), inp.normalize, inp.detach_range, float(inp.eps), float(inp.dropout_p), backend,
            0 if block_size is None else int(block_size), need_stats)
    if not need_stats and _plain_eager(inp.q):
        # eager inference (e.g. a decoding step): the op's implementation itself, without the ~50 us round trip
        # through the dispatcher; traced, autograd and tensor-subclass calls always go through the op
        return _attention_fwd(*args)[0]
    return torch.ops.sasoftmax.attention_fwd(*args)[0]


def _plain_eager(q: Tensor) -> bool:
    """Eager mode on a plain tensor: not compiling, no tensor subclass, no dispatch or function mode active."""
    return (not torch.compiler.is_compiling() and type(q) is Tensor and _current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled())

