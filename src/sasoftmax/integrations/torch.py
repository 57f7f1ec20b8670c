"""SA-Softmax for any code that calls ``torch.nn.functional.scaled_dot_product_attention``.

:func:`sdpa_override` is a context manager (and decorator) under which every ``F.scaled_dot_product_attention`` call
computes SA-Softmax attention with the same arguments, layout and dtype::

    import sasoftmax

    with sasoftmax.sdpa_override():                     # every SDPA call in the block is SA attention
        loss = model(x).loss
        loss.backward()

    with sasoftmax.sdpa_override(only=[blk.attn for blk in model.blocks]):   # only the calls made inside these
        ...

:func:`patch` makes the switch permanent for one model (its ``forward`` runs under the override); :func:`unpatch`
undoes it.

It is a ``torch.overrides.TorchFunctionMode``: scoped to the thread that entered it (as torch's modes are), nestable
(the innermost override that claims a call computes it), removed on exit and on exceptions, traced through by
``torch.compile(fullgraph=True)``. Only calls that go through the Python function
``torch.nn.functional.scaled_dot_product_attention`` are seen; code that calls ``torch.ops.aten`` directly is not.

Argument mapping (SDPA -> :func:`sasoftmax.sa_attention`): ``attn_mask`` bool (True = attend) or float (added to the
scores; ``-inf`` / ``<= -65504`` entries mark masked keys, other values take part in SA's row min/max),
``dropout_p``, ``scale`` and ``enable_gqa`` as in SDPA. ``is_causal`` keeps SDPA's meaning: top-left aligned when
``L != S`` (SDPA's convention; ``sa_attention``'s own ``is_causal`` is bottom-right). Inputs may have any number of
batch dimensions before ``(L, E)``, as in SDPA. What SA cannot honour raises ``ValueError`` naming the argument;
no call is silently computed with softmax.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..attention import sa_attention
from ..attention.api import check_backend_name
from ..functional import DEFAULT_EPS

__all__ = ["sdpa_override", "patch", "unpatch", "sa_sdpa"]

_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward


def sa_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    normalize: bool = True,
    detach_range: bool = False,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> Tensor:
    """SA-Softmax attention with ``F.scaled_dot_product_attention``'s signature and conventions.

    Args:
        query: ``(..., L, E)``; key ``(..., S, E)``; value ``(..., S, Ev)``. The leading dimensions must be equal,
            except the head dimension ``-3`` with ``enable_gqa`` (``Hq % Hkv == 0``).
        attn_mask: bool (True = attend) or float, broadcastable to ``(..., L, S)``.
        dropout_p, scale: as in SDPA (dropout is applied whenever ``dropout_p > 0``, as SDPA does).
        is_causal: SDPA's causal mask, top-left aligned (query ``i`` sees keys ``j <= i``); not together with
            ``attn_mask`` (SDPA refuses the pair too).
        enable_gqa: allow fewer key/value heads than query heads.
        normalize, detach_range, eps, backend: as in :func:`sasoftmax.sa_attention`.

    Returns:
        ``(..., L, Ev)`` in the dtype of ``query`` (under autocast: the autocast dtype).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scaled_dot_product_attention under sdpa_override: `{name}` must be a Tensor, got "
                            f"{type(t).__name__}")
        if t.is_nested:
            raise ValueError(f"scaled_dot_product_attention under sdpa_override: `{name}` is a nested tensor; SA "
                             "attention takes dense tensors (use sasoftmax.sa_attention_varlen for packed sequences)")
        if t.dim() < 2:
            raise ValueError(f"scaled_dot_product_attention under sdpa_override: `{name}` must be (..., L, E), got "
                             f"shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError("scaled_dot_product_attention under sdpa_override: `query`, `key` and `value` must have "
                         f"the same number of dimensions, got {query.dim()}, {key.dim()}, {value.dim()}")
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention under sdpa_override: `attn_mask` and `is_causal=True` were "
                         "both given; SDPA refuses the pair as well (fold the causal mask into `attn_mask`)")
    batch_q, batch_k = tuple(query.shape[:-2]), tuple(key.shape[:-2])
    if tuple(value.shape[:-2]) != batch_k or value.shape[-2] != key.shape[-2]:
        raise ValueError("scaled_dot_product_attention under sdpa_override: `value` must be (..., S, Ev) with the "
                         f"leading dimensions and S of `key` {tuple(key.shape)}, got {tuple(value.shape)}")
    gqa = query.dim() >= 3 and batch_q[:-1] == batch_k[:-1] and batch_q[-1] != batch_k[-1]
    if batch_q != batch_k and not (gqa and enable_gqa):
        hint = " (different head counts need `enable_gqa=True`)" if gqa else ""
        raise ValueError("scaled_dot_product_attention under sdpa_override: the leading dimensions of `query` "
                         f"{batch_q} and `key` {batch_k} must be equal{hint}")
    if gqa and batch_q[-1] % batch_k[-1] != 0:
        raise ValueError(f"scaled_dot_product_attention under sdpa_override: `enable_gqa` needs the query heads "
                         f"({batch_q[-1]}) to be a multiple of the key/value heads ({batch_k[-1]})")

    L, S = query.shape[-2], key.shape[-2]
    lead = batch_q
    q4, k4, v4 = (_as_4d(t) for t in (query, key, value))
    mask4 = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError("scaled_dot_product_attention under sdpa_override: `attn_mask` must be a Tensor or "
                            f"None, got {type(attn_mask).__name__}")
        mask4 = _mask_as_4d(attn_mask, (*lead, L, S))
    causal = bool(is_causal)
    if causal and L != S:
        # SDPA's causal mask is top-left aligned; sa_attention's is_causal is bottom-right.
        mask4 = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        causal = False
    out = sa_attention(
        q4, k4, v4, mask4, is_causal=causal, scale=scale, dropout_p=float(dropout_p), normalize=normalize,
        detach_range=detach_range, eps=eps, backend=backend,
    )
    return out.reshape(*lead, L, value.shape[-1])


def _as_4d(t: Tensor) -> Tensor:
    """``(..., N, E)`` -> ``(B, H, N, E)``: heads are dimension -3, everything before it is flattened into B."""
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def _mask_as_4d(mask: Tensor, full: tuple[int, ...]) -> Tensor:
    """A mask broadcastable to ``full = (..., L, S)`` as one broadcastable to the 4-D view of :func:`_as_4d`."""
    if mask.dim() > len(full):
        raise ValueError(f"scaled_dot_product_attention under sdpa_override: `attn_mask` of shape "
                         f"{tuple(mask.shape)} has more dimensions than the scores {full}")
    if len(full) <= 4 or mask.dim() <= 3:
        return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    # Batch dimensions are flattened together, so the mask must be spelled out along them.
    return mask.expand(full).reshape(-1, *full[-3:])


class _MHAState(threading.local):
    def __init__(self) -> None:
        self.options: list[dict[str, Any]] = []


_MHA_STATE = _MHAState()
_MHA_LOCK = threading.Lock()
_MHA_USERS = 0


def _sdpa_for_mha(*args: Any, **kwargs: Any) -> Tensor:
    """What ``F.multi_head_attention_forward`` calls as SDPA while an override handles it: SA attention in the
    thread that entered it, the real SDPA (with its own torch-function dispatch) everywhere else."""
    if _MHA_STATE.options:
        return sa_sdpa(*args, **{**kwargs, **_MHA_STATE.options[-1]})
    return _SDPA(*args, **kwargs)


@contextlib.contextmanager
def _sdpa_inside_mha(options: dict[str, Any]) -> Iterator[None]:
    """Torch takes a mode off its stack while the mode handles a call, so the SDPA call that
    ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) makes inside
    itself never reaches the mode. For the duration of that one call, the module-level name it looks SDPA up by
    points at :func:`_sdpa_for_mha` (shared by all threads, hence the count; other threads keep the real SDPA)."""
    global _MHA_USERS
    with _MHA_LOCK:
        if _MHA_USERS == 0:
            F.scaled_dot_product_attention = _sdpa_for_mha
        _MHA_USERS += 1
    _MHA_STATE.options.append(options)
    try:
        yield
    finally:
        _MHA_STATE.options.pop()
        with _MHA_LOCK:
            _MHA_USERS -= 1
            if _MHA_USERS == 0:
                F.scaled_dot_product_attention = _SDPA


class _Scope:
    """How deep the current thread is inside the modules an ``only=`` override watches."""

    def __init__(self) -> None:
        self.depth = 0


class _SDPAMode(TorchFunctionMode):
    def __init__(self, options: dict[str, Any], scope: _Scope | None) -> None:
        super().__init__()
        self.options = options
        self.scope = scope

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA and (self.scope is None or self.scope.depth > 0):
            return sa_sdpa(*args, **{**kwargs, **self.options})
        if func is _MHA and (self.scope is None or self.scope.depth > 0):
            with _sdpa_inside_mha(self.options):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class sdpa_override(contextlib.ContextDecorator):  # noqa: N801 - used like a function, as torch's modes are
    """Compute every ``F.scaled_dot_product_attention`` call in the block as SA-Softmax attention.

    Args:
        normalize: True = the paper's normalized SA-Softmax, False = ``x * softmax(x)``.
        detach_range: stop the gradient through the row min/max of the normalized form.
        eps: denominator bias of the normalized form.
        backend: :func:`sasoftmax.sa_attention` backend (``"auto"``, ``"cpp"``, ``"chunked"``, ...).
        only: a module or modules; when given, only SDPA calls made while one of them (or a submodule) runs its
            ``forward`` are switched, every other call keeps softmax. Forward hooks on these modules track it;
            they are removed on exit.

    Use as ``with sdpa_override(): ...`` or as a decorator ``@sdpa_override()``. Entering the same object again
    while it is active (recursion through a decorated function) nests correctly.
    """

    def __init__(self, normalize: bool = True, detach_range: bool = False, eps: float = DEFAULT_EPS,
                 backend: str = "auto", *, only: nn.Module | Iterable[nn.Module] | None = None) -> None:
        check_backend_name(backend)
        if not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"`eps` must be a non-negative number, got {eps!r}")
        self.options: dict[str, Any] = {"normalize": bool(normalize), "detach_range": bool(detach_range),
                                        "eps": float(eps), "backend": backend}
        self.only: list[nn.Module] | None = None
        if only is not None:
            mods = [only] if isinstance(only, nn.Module) else list(only)
            bad = [type(m).__name__ for m in mods if not isinstance(m, nn.Module)]
            if bad or not mods:
                raise TypeError(f"`only` must be an nn.Module or a non-empty iterable of them, got "
                                f"{bad or 'an empty iterable'}")
            self.only = mods
        self._active: list[tuple[_SDPAMode, list[Any]]] = []

    def __enter__(self) -> sdpa_override:
        scope = None
        handles: list[Any] = []
        if self.only is not None:
            scope = _Scope()

            def enter(module: nn.Module, args: Any) -> None:
                scope.depth += 1

            def leave(module: nn.Module, args: Any, output: Any) -> None:
                scope.depth -= 1

            for m in self.only:
                handles.append(m.register_forward_pre_hook(enter))
                handles.append(m.register_forward_hook(leave, always_call=True))
        mode = _SDPAMode(self.options, scope)
        try:
            mode.__enter__()
        except BaseException:
            for h in handles:
                h.remove()
            raise
        self._active.append((mode, handles))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        mode, handles = self._active.pop()
        try:
            mode.__exit__(exc_type, exc, tb)
        finally:
            for h in handles:
                h.remove()


_PATCH_ATTR = "_sasoftmax_sdpa_patch"


def patch(model: nn.Module, normalize: bool = True, detach_range: bool = False, eps: float = DEFAULT_EPS,
          backend: str = "auto") -> nn.Module:
    """Run ``model``'s forward under :func:`sdpa_override` from now on (in place; returns ``model``).

    Every SDPA call made during ``model(...)`` (and the backward of what it built, which needs no mode) is SA
    attention. ``ValueError`` if the model is already patched; :func:`unpatch` restores the original forward."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if hasattr(model, _PATCH_ATTR):
        raise ValueError("`model` is already patched by sasoftmax.integrations.torch.patch; call unpatch() first")
    override = sdpa_override(normalize=normalize, detach_range=detach_range, eps=eps, backend=backend)
    had_own = "forward" in model.__dict__
    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with override:
            return original(*args, **kwargs)

    setattr(model, _PATCH_ATTR, (original if had_own else None, override))
    model.forward = forward
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (in place; returns ``model``). ``ValueError`` if the model is not patched."""
    state = getattr(model, _PATCH_ATTR, None)
    if state is None:
        raise ValueError("`model` is not patched by sasoftmax.integrations.torch.patch")
    own_forward, _ = state
    delattr(model, _PATCH_ATTR)
    if own_forward is None:
        del model.forward
    else:
        model.forward = own_forward
    return model
