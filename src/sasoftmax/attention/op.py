"""The ``torch.library`` custom ops of the memory-efficient backends (chunked, cpp): one forward and one backward op
per backend, so that ``torch.compile(fullgraph=True)`` traces a call without a graph break.

:func:`define_attention_op` registers, for a backend ``name``:

* ``sasoftmax::{name}_fwd(`` the fields of :class:`FwdArgs` ``) -> (out, stats, idx)``, its fake beside it, and
* ``sasoftmax::{name}_bwd(`` the fields of :class:`BwdArgs` ``) -> (dq, dk, dv, dbias)``, registered as the
  forward's autograd formula; a backward through it (double backward) raises :func:`double_backward_error`.

Only tensors, floats, bools and ints cross the op boundary: the masks and biases are the canonical views of
:class:`~.inputs.AttentionInputs`, and the dropout seed is an int64 tensor drawn in the caller (inside a compiled
region too) and read inside the op. Saved for the backward: ``q, k, v, out`` and the backend's per-row statistics
(``stats``, ``idx``, shapes from the backend's ``stats_shapes``), i.e. O(N * D) memory. Outputs that are not needed
are empty tensors (shape ``(0,)``).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from ..functional import compute_dtype
from .dropout import seed_tensor
from .inputs import AttentionInputs

__all__ = ["FwdArgs", "BwdArgs", "AttentionOp", "define_attention_op", "double_backward_error", "inputs_of"]


class FwdArgs(NamedTuple):
    """The arguments of ``sasoftmax::{name}_fwd``, in schema order (the schema is built from these fields)."""

    q: Tensor  # (B, Hq, Nq, D)
    k: Tensor  # (B, Hkv, Nk, D)
    v: Tensor  # (B, Hkv, Nk, Dv)
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
    window_left: int  # sliding window (-1: unbounded on that side)
    window_right: int
    softcap: float  # 0.0: off
    block_rows: int  # query rows per block (0: the backend's default)
    panel_rows: int  # cpp: query rows per kv head from which S, dP use K/V panels (0: default; chunked ignores it)
    need_stats: bool  # keep the per-row statistics for a backward


class BwdArgs(NamedTuple):
    """The arguments of ``sasoftmax::{name}_bwd``: the gradient of the output, what the forward saved, the
    forward's other arguments and flags saying which gradients to compute."""

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
    window_left: int
    window_right: int
    softcap: float
    block_rows: int
    panel_rows: int
    need_dq: bool
    need_dk: bool
    need_dv: bool
    need_dbias: bool


_SAVED = ("q", "k", "v", "out", "stats", "idx", "keep", "mask_add", "bias", "slopes", "seed")
_SCALARS = ("is_causal", "scale", "normalize", "detach_range", "eps", "dropout_p", "window_left", "window_right",
            "softcap", "block_rows", "panel_rows")
# (this module does not defer annotations: the schema is read off the NamedTuples' annotation objects)
_SCHEMA_TYPES = {Tensor: "Tensor", Tensor | None: "Tensor?", bool: "bool", float: "float", int: "int"}

Shape = tuple[tuple[int, ...], torch.dtype]
StatsShapes = Callable[[FwdArgs], tuple[Shape, Shape]]


def _schema(args: type, returns: int) -> str:
    """The op schema of a NamedTuple of arguments, from its field annotations."""
    hints = args.__annotations__
    params = ", ".join(f"{_SCHEMA_TYPES[hints[name]]} {name}" for name in args._fields)  # type: ignore[attr-defined]
    return f"({params}) -> ({', '.join(['Tensor'] * returns)})"


def inputs_of(a: FwdArgs | BwdArgs) -> AttentionInputs:
    """The call as a backend's Python code takes it (contiguous q, k, v, so that its tiles are views)."""
    return AttentionInputs(
        q=a.q.contiguous(), k=a.k.contiguous(), v=a.v.contiguous(), keep=a.keep, mask_add=a.mask_add, bias=a.bias,
        alibi_slopes=a.slopes, is_causal=a.is_causal, scale=a.scale, normalize=a.normalize,
        detach_range=a.detach_range, eps=a.eps, dropout_p=a.dropout_p, generator=None,
        window=None if (a.window_left, a.window_right) == (-1, -1) else (a.window_left, a.window_right),
        softcap=a.softcap if a.softcap > 0 else None,
    )


def double_backward_error(backend: str) -> RuntimeError:
    """The error of a backward through a fused backend's gradient (the gradient is not differentiable)."""
    return RuntimeError(
        f"sasoftmax: double backward is not supported by backend={backend!r}: its gradient is computed by a kernel "
        "that autograd cannot differentiate again (torch.autograd.grad(..., create_graph=True) followed by a "
        "backward through that gradient, as gradient penalties and Hessian-vector products do). Use "
        "backend='reference' for such a call: its gradient is built from differentiable operations.")


class AttentionOp:
    """The registered ops of one backend; ``op(inp, block_size)`` runs a validated call through them."""

    def __init__(self, name: str, forward: Callable[[FwdArgs], tuple[Tensor, Tensor, Tensor]],
                 backward: Callable[[BwdArgs], tuple[Tensor, Tensor, Tensor, Tensor]], stats_shapes: StatsShapes):
        self.name, self._forward = name, forward
        fwd = torch.library.custom_op(f"sasoftmax::{name}_fwd", lambda *a: forward(FwdArgs(*a)), mutates_args=(),
                                      schema=_schema(FwdArgs, 3))
        fwd.register_fake(lambda *a: _fwd_fake(FwdArgs(*a), stats_shapes))
        bwd = torch.library.custom_op(f"sasoftmax::{name}_bwd", lambda *a: _bwd_result(backward, BwdArgs(*a)),
                                      mutates_args=(), schema=_schema(BwdArgs, 4))
        bwd.register_fake(lambda *a: _bwd_fake(BwdArgs(*a)))
        fwd.register_autograd(self._backward, setup_context=_setup_context)
        bwd.register_autograd(self._double_backward, setup_context=lambda ctx, inputs, output: None)
        self._fwd_op = getattr(torch.ops.sasoftmax, f"{name}_fwd")
        self._bwd_op = getattr(torch.ops.sasoftmax, f"{name}_bwd")

    def _backward(self, ctx, grad_out: Tensor, _grad_stats: Tensor, _grad_idx: Tensor) -> tuple:
        saved = dict(zip(_SAVED, ctx.saved_tensors, strict=True))
        need = dict(zip(FwdArgs._fields, ctx.needs_input_grad, strict=True))
        need_dbias = bool(need["bias"]) and saved["bias"] is not None
        grads = self._bwd_op(*BwdArgs(grad_out=grad_out, **saved, **ctx.scalars, need_dq=bool(need["q"]),
                                      need_dk=bool(need["k"]), need_dv=bool(need["v"]), need_dbias=need_dbias))
        by_name = {"q": grads[0] if need["q"] else None, "k": grads[1] if need["k"] else None,
                   "v": grads[2] if need["v"] else None, "bias": grads[3] if need_dbias else None}
        return tuple(by_name.get(f) for f in FwdArgs._fields)

    def _double_backward(self, ctx, *grads):
        raise double_backward_error(self.name)

    def __call__(self, inp: AttentionInputs, block_size: int | None = None, panel_rows: int | None = None) -> Tensor:
        """SA attention of a validated call, ``(B, Hq, Nq, Dv)``; ``block_size`` fixes the query rows per block
        and ``panel_rows`` the cpp kernel's panel threshold (default: the backend's)."""
        if min(inp.nq, inp.nk, inp.batch, inp.heads, inp.v.shape[-1]) == 0:
            return empty_result(inp)
        if block_size is not None and int(block_size) < 1:
            raise ValueError(f"`block_size` must be a positive number of query rows, got {block_size}")
        need_stats = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (inp.q, inp.k, inp.v, inp.bias))
        seed = None
        if inp.dropout_p > 0:
            seed = inp.seed if inp.seed is not None else seed_tensor(inp.generator)
        left, right = (-1, -1) if inp.window is None else inp.window
        args = FwdArgs(
            q=inp.q, k=inp.k, v=inp.v, keep=inp.keep, mask_add=inp.mask_add, bias=inp.bias, slopes=inp.alibi_slopes,
            seed=seed, is_causal=inp.is_causal, scale=float(inp.scale), normalize=inp.normalize,
            detach_range=inp.detach_range, eps=float(inp.eps), dropout_p=float(inp.dropout_p), window_left=left,
            window_right=right, softcap=0.0 if inp.softcap is None else float(inp.softcap),
            block_rows=0 if block_size is None else int(block_size),
            panel_rows=0 if panel_rows is None else max(1, int(panel_rows)), need_stats=need_stats)
        if not need_stats and _plain_eager(inp.q):
            # eager inference (e.g. a decoding step): the implementation itself, without the ~50 us round trip
            # through the dispatcher; traced, autograd and tensor-subclass calls always go through the op
            return self._forward(args)[0]
        return self._fwd_op(*args)[0]


def define_attention_op(name: str, forward: Callable[[FwdArgs], tuple[Tensor, Tensor, Tensor]],
                        backward: Callable[[BwdArgs], tuple[Tensor, Tensor, Tensor, Tensor]],
                        stats_shapes: StatsShapes) -> AttentionOp:
    """Register ``sasoftmax::{name}_fwd`` / ``_bwd`` (see the module docstring). ``forward(args) -> (out, stats,
    idx)``; ``backward(args) -> (dq, dk, dv, dbias)``, each in its input's shape and dtype, or None / empty where not
    asked; ``stats_shapes(args) -> ((stats shape, dtype), (idx shape, dtype))`` for the fake."""
    return AttentionOp(name, forward, backward, stats_shapes)


def _fwd_fake(a: FwdArgs, stats_shapes: StatsShapes) -> tuple[Tensor, Tensor, Tensor]:
    (s_shape, s_dt), (i_shape, i_dt) = stats_shapes(a)
    out = a.q.new_empty(a.q.shape[0], a.q.shape[1], a.q.shape[2], a.v.shape[3])
    return out, a.q.new_empty(s_shape, dtype=s_dt), a.q.new_empty(i_shape, dtype=i_dt)


def _bwd_result(backward: Callable[[BwdArgs], tuple], a: BwdArgs) -> tuple[Tensor, ...]:
    """A backend's gradients in the op's layout (the fake's): contiguous, an empty tensor where not asked."""
    return tuple(a.q.new_empty(0) if t is None else t.contiguous() for t in backward(a))


def _bwd_fake(a: BwdArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    def like(t: Tensor | None, need: bool) -> Tensor:
        if need and t is not None:
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        return a.q.new_empty(0)

    return like(a.q, a.need_dq), like(a.k, a.need_dk), like(a.v, a.need_dv), like(a.bias, a.need_dbias)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    a = FwdArgs(*inputs)
    out, stats, idx = output
    fields = {**a._asdict(), "out": out, "stats": stats, "idx": idx}
    ctx.save_for_backward(*(fields[name] for name in _SAVED))
    ctx.scalars = {name: fields[name] for name in _SCALARS}
    ctx.mark_non_differentiable(stats, idx)


def stats_dtype(a: FwdArgs) -> torch.dtype:
    """The dtype of the per-row statistics: the compute dtype of the inputs."""
    return compute_dtype(a.q.dtype)


def empty_result(inp: AttentionInputs) -> Tensor:
    """Output of a call with no query, key, batch entry, head or value dim: zeros, still attached to the graph
    (so that ``.backward()`` works and yields zero gradients)."""
    out = inp.q.new_zeros(inp.batch, inp.heads, inp.nq, inp.v.shape[-1])
    parts = [t.sum() for t in (inp.q, inp.k, inp.v, inp.bias) if t is not None and t.requires_grad]
    return out + 0.0 * sum(parts) if parts else out


def _plain_eager(q: Tensor) -> bool:
    """Eager mode on a plain tensor: not compiling, no tensor subclass, no dispatch or function mode active."""
    return (not torch.compiler.is_compiling() and type(q) is Tensor and _current_dispatch_mode() is None
            and not torch._C._is_torch_function_mode_enabled())
