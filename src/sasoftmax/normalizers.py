"""Attention normalizers: a registry of interchangeable "what replaces softmax" implementations.

A normalizer is a full attention function (scores -> weights -> weighted sum of values), so that each one can use
its own fast path (SDPA for softmax, :func:`sasoftmax.sa_attention` for SA-Softmax) and its own memory strategy.
The GPT model (:mod:`sasoftmax.model`) only ever calls a registry entry, so a new method (softmax+1, sigmoid
attention, SSMax, softpick, stablemax, ...) plugs in with :func:`register_normalizer` and no change to the model.

Calling convention of ``Normalizer.fn``::

    fn(q, k, v, *, attn_mask, is_causal, scale, bias, alibi_slopes, dropout_p, module) -> Tensor

* ``q``: ``(B, Hq, Nq, D)``; ``k``: ``(B, Hkv, Nk, D)``; ``v``: ``(B, Hkv, Nk, Dv)`` with ``Hq % Hkv == 0``
  (grouped-query attention: query head ``h`` uses key/value head ``h // (Hq // Hkv)``).
* ``attn_mask``: None, bool (True = attend) or float (added to the scores; entries ``<= -65504`` mark the key as
  masked), broadcastable to ``(B, Hq, Nq, Nk)``.
* ``is_causal``: causal mask aligned bottom-right when ``Nq != Nk`` (query ``i`` sits at key position ``Nk-Nq+i``).
* ``scale``: score scale (None = ``1/sqrt(D)``). Scores are ``scale * q.k + bias + alibi + float mask``.
* ``bias``: additive bias broadcastable to ``(B, Hq, Nq, Nk)``, may require grad (Kerple, FIRE).
* ``alibi_slopes``: ``(Hq,)`` or ``(B, Hq)``, adds ``-slope * |Nk - Nq + i - j|`` (no gradient).
* ``dropout_p``: dropout on the attention weights (the caller passes 0.0 in evaluation).
* ``module``: the calling attention module or None. Normalizers with learnable parameters keep them on it (created by
  ``init_params(module, n_heads)`` when the model is built); SA normalizers read ``module.attn_backend``.

Returns ``(B, Hq, Nq, Dv)`` in the dtype of ``q``. A query row with no visible key returns 0 (never NaN).

Materialized weights (``Normalizer.weights``, optional but provided by every built-in entry)::

    weights(s, visible, module) -> w

* ``s``: float32 (float64 for float64 inputs) scores ``(B, Hq, Nq, Nk)`` = ``scale * q.k + bias + alibi + float
  mask``, finite everywhere (masked entries hold arbitrary finite values; a weights function must not read them).
* ``visible``: bool, broadcastable to ``s``, True = the key takes part; or None (every key visible).
* Returns ``w`` with the shape of ``s``, differentiable by autograd, exactly 0 at masked entries and on rows with no
  visible key.

This is what :func:`materialized_attention` (and so ``output_attentions``-style weight inspection and the gradient
diagnostics of :mod:`sasoftmax.diagnostics`) runs. A peer method only needs its weights function:
``register_normalizer("softmax_plus_one", weights=fn, description=...)`` builds the attention function from it
(O(N^2) memory; register a fused ``fn`` as well when one exists).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .attention import sa_attention
from .attention.dropout import draw_seed, keep_mask
from .attention.inputs import MASKED_FLOAT_THRESHOLD, prepare
from .attention.reference import expand_kv
from .functional import sa_rows, softmax_rows

__all__ = [
    "Normalizer",
    "register_normalizer",
    "unregister_normalizer",
    "get_normalizer",
    "list_normalizers",
    "softmax_attention",
    "materialized_attention",
    "MATERIALIZED_TILE_SCORES",
    "masked_softmax",
    "alibi_bias",
    "causal_visibility",
    "repeat_kv",
]

AttentionFn = Callable[..., Tensor]
InitParamsFn = Callable[[nn.Module, int], None]
WeightsFn = Callable[[Tensor, "Tensor | None", "nn.Module | None"], Tensor]


@dataclass(frozen=True)
class Normalizer:
    """One registry entry.

    Attributes:
        name: registry key (also what ``GPTConfig.normalizer`` holds).
        fn: the attention function, see the module docstring for its signature.
        description: one line for listings and docs.
        needs_params: True when the normalizer keeps learnable parameters on the attention module.
        init_params: ``init_params(module, n_heads)`` creates those parameters (e.g. an ``nn.Parameter`` of shape
            ``(n_heads,)``) on the attention module; called once when the model is built. None = nothing to create.
        weights: materialized weights from scores (see the module docstring), or None when the method has none.
    """

    name: str
    fn: AttentionFn
    description: str
    needs_params: bool = False
    init_params: InitParamsFn | None = None
    weights: WeightsFn | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        return self.fn(q, k, v, **kwargs)


_REGISTRY: dict[str, Normalizer] = {}


def register_normalizer(
    name: str,
    fn: AttentionFn | None = None,
    description: str = "",
    *,
    needs_params: bool = False,
    init_params: InitParamsFn | None = None,
    weights: WeightsFn | None = None,
    overwrite: bool = False,
) -> Normalizer | Callable[[AttentionFn], AttentionFn]:
    """Add a normalizer to the registry.

    Use directly, ``register_normalizer("softmax_plus_one", fn, "e^x / (1 + sum e^x)")``, which returns the
    :class:`Normalizer`, or as a decorator, ``@register_normalizer("softmax_plus_one", description=...)``, which
    returns the function unchanged. With only ``weights`` (``register_normalizer(name, weights=w, ...)``) the
    attention function is :func:`materialized_attention` over ``w``. Raises ``ValueError`` if ``name`` is taken
    (unless ``overwrite=True``) or empty, ``TypeError`` if ``fn``/``init_params``/``weights`` are not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if needs_params and init_params is None:
        raise ValueError(f"normalizer {name!r}: `needs_params=True` requires an `init_params(module, n_heads)` hook")
    if init_params is not None and not callable(init_params):
        raise TypeError(f"`init_params` must be callable, got {type(init_params).__name__}")
    if weights is not None and not callable(weights):
        raise TypeError(f"`weights` must be callable, got {type(weights).__name__}")

    def _add(f: AttentionFn) -> Normalizer:
        if not callable(f):
            raise TypeError(f"`fn` must be callable, got {type(f).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"normalizer {name!r} is already registered (pass overwrite=True to replace it)")
        entry = Normalizer(
            name=name, fn=f, description=description, needs_params=bool(needs_params or init_params is not None),
            init_params=init_params, weights=weights,
        )
        _REGISTRY[name] = entry
        return entry

    if fn is None and weights is not None:
        return _add(_materialized_fn(name, weights))
    if fn is None:

        def decorator(f: AttentionFn) -> AttentionFn:
            _add(f)
            return f

        return decorator
    return _add(fn)


def unregister_normalizer(name: str) -> None:
    """Remove ``name`` from the registry (``ValueError`` if it is not registered)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; known: {list_normalizers()}")
    del _REGISTRY[name]


def get_normalizer(name: str) -> Normalizer:
    """The registry entry for ``name``; ``ValueError`` listing the known names if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown normalizer {name!r}; known normalizers: {list_normalizers()}") from None


def list_normalizers() -> list[str]:
    """Registered normalizer names, sorted."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------------------------------
# Helpers shared by normalizers (also useful to peers written elsewhere).


def repeat_kv(t: Tensor, heads: int) -> Tensor:
    """``(B, Hkv, N, X) -> (B, heads, N, X)`` repeating each key/value head ``heads // Hkv`` times (grouped-query
    attention: query head ``h`` uses key/value head ``h // (heads // Hkv)``)."""
    b, hkv, n, x = t.shape
    if hkv == heads:
        return t
    if heads % hkv != 0:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({hkv})")
    return t[:, :, None].expand(b, hkv, heads // hkv, n, x).reshape(b, heads, n, x)


def causal_visibility(nq: int, nk: int, device: torch.device) -> Tensor:
    """Bool ``(Nq, Nk)``, True = attend, bottom-right aligned (query ``i`` at key position ``Nk - Nq + i``)."""
    qpos = torch.arange(nq, device=device) + (nk - nq)
    kpos = torch.arange(nk, device=device)
    return kpos[None, :] <= qpos[:, None]


def alibi_bias(slopes: Tensor, nq: int, nk: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """ALiBi as a dense bias: ``-slope * |Nk - Nq + i - j|``, shape ``(B or 1, H, Nq, Nk)``.

    ``slopes``: ``(H,)`` or ``(B, H)``. The same convention as ``sa_attention(alibi_slopes=...)``."""
    if slopes.dim() == 1:
        slopes = slopes[None]
    qpos = torch.arange(nq, device=slopes.device, dtype=dtype) + (nk - nq)
    kpos = torch.arange(nk, device=slopes.device, dtype=dtype)
    dist = (qpos[:, None] - kpos[None, :]).abs()
    return -slopes.to(dtype)[:, :, None, None] * dist


def masked_softmax(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
    """Softmax weights over the visible keys (the ``weights`` of the ``softmax`` entry); rows with no visible key
    are 0."""
    del module
    if visible is None:
        return torch.softmax(s, dim=-1)
    return softmax_rows(s, visible)


MATERIALIZED_TILE_SCORES = 1 << 24
"""Above this many scores (``B * Hq * Nq * Nk``) :func:`materialized_attention` works on blocks of query rows of at
most this many scores each (64 MiB of float32), recomputing each block in the backward, so its memory stays bounded
at long lengths; with ``return_weights`` or ``on_scores`` it always builds the full tensors."""


def _rows(weights: WeightsFn, inp, module: nn.Module | None, seed: int | None, kx: Tensor, vx: Tensor, i0: int,
          i1: int, on_scores: Callable[[Tensor, Tensor | None], None] | None) -> tuple[Tensor, Tensor]:
    """Output and applied weights of query rows ``[i0, i1)`` (``kx``, ``vx``: key/value heads already expanded)."""
    cdt = inp.compute_dtype
    s = torch.matmul(inp.q[:, :, i0:i1], kx.transpose(-1, -2)).to(cdt) * inp.scale
    add = inp.additive(i0, i1, cdt)
    if add is not None:
        s = s + add
    b = inp.bias_rows(i0, i1)
    if b is not None:
        s = s + b.to(cdt)
    visible = inp.visible(i0, i1)
    if visible is not None:
        s = s.masked_fill(~visible, 0.0)  # finite everywhere, as the weights contract promises
    if on_scores is not None:
        on_scores(s, visible)
    w = weights(s, visible, module)
    if visible is not None:
        w = w.masked_fill(~visible, 0.0)
    if seed is not None:
        keep = keep_mask(seed, inp.dropout_p, inp.batch, inp.heads, inp.nq, inp.nk, i0, i1, s.device)
        w = w * keep / (1.0 - inp.dropout_p)
    return torch.matmul(w.to(vx.dtype), vx), w


def materialized_attention(
    weights: WeightsFn,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    module: nn.Module | None = None,
    generator: torch.Generator | None = None,
    return_weights: bool = False,
    on_scores: Callable[[Tensor, Tensor | None], None] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention with explicit scores and weights ``w = weights(s, visible, module)``.

    Inputs are validated like :func:`sasoftmax.sa_attention` (shapes, GQA, mask conventions of the module
    docstring). Dropout uses the same counter-based mask as the SA backends (so for one seed every path drops the
    same entries). ``on_scores(s, visible)``, if given, sees the ``(B, Hq, Nq, Nk)`` score tensor before the weights
    are computed (the gradient diagnostics use it to retain ``dL/ds``). Returns the output ``(B, Hq, Nq, Dv)`` in the
    dtype of ``v``, and with ``return_weights`` also the weights applied to ``v`` (after masking and dropout) in the
    compute dtype.

    Memory: the full score and weight tensors, O(Nq * Nk), when weights are returned or scores observed, or when
    the call has at most :data:`MATERIALIZED_TILE_SCORES` scores; otherwise blocks of query rows of that size, each
    recomputed in the backward (``torch.utils.checkpoint``), so the activation memory stays O(Nq * D) plus one block.
    """
    inp = prepare(q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
                  dropout_p=dropout_p, generator=generator)
    seed = draw_seed(inp.generator) if inp.dropout_p > 0 else None
    kx, vx = expand_kv(inp.k, inp.groups), expand_kv(inp.v, inp.groups)
    per_row = max(1, inp.batch * inp.heads * inp.nk)
    if return_weights or on_scores is not None or per_row * inp.nq <= MATERIALIZED_TILE_SCORES:
        out, w = _rows(weights, inp, module, seed, kx, vx, 0, inp.nq, on_scores)
        return (out, w) if return_weights else out
    rows = max(1, MATERIALIZED_TILE_SCORES // per_row)
    grad = torch.is_grad_enabled()
    outs = []
    for i0 in range(0, inp.nq, rows):
        i1 = min(inp.nq, i0 + rows)

        def block(i0: int = i0, i1: int = i1) -> Tensor:
            return _rows(weights, inp, module, seed, kx, vx, i0, i1, None)[0]

        outs.append(torch.utils.checkpoint.checkpoint(block, use_reentrant=False) if grad else block())
    return torch.cat(outs, dim=2)


def _materialized_fn(name: str, weights: WeightsFn) -> AttentionFn:
    def fn(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        return materialized_attention(weights, q, k, v, **kwargs)

    fn.__name__ = f"{name}_materialized_attention"
    fn.__doc__ = f"Materialized attention over the weights of the {name!r} normalizer (O(N^2) memory)."
    return fn


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    dropout_p: float = 0.0,
    module: nn.Module | None = None,
) -> Tensor:
    """Standard softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes and mask conventions as in the module docstring. With only ``is_causal`` and ``Nq == Nk`` the call goes
    straight to SDPA's causal fast path (flash attention where available). Otherwise causality, the mask, ``bias``
    and ALiBi are folded into one additive float mask (``-inf`` = masked; O(Nq*Nk) memory), and query rows with no
    visible key are returned as 0 instead of NaN. ``bias`` receives its gradient through SDPA's mask input.
    """
    del module  # stateless
    hq = q.shape[1]
    if k.shape[1] != hq:
        if k.shape[1] == 0 or hq % k.shape[1] != 0:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
        k, v = repeat_kv(k, hq), repeat_kv(v, hq)
    nq, nk = q.shape[2], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if attn_mask is None and bias is None and alibi_slopes is None and (not is_causal or nq == nk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    # One additive float mask in float32 (float64 for float64 inputs), then cast to the input dtype (SDPA wants the
    # same dtype as q).
    mdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    keep: Tensor | None = None
    add: Tensor | None = None
    if is_causal:
        keep = causal_visibility(nq, nk, q.device)[None, None]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m_keep = attn_mask
        elif attn_mask.is_floating_point():
            m_keep = attn_mask > MASKED_FLOAT_THRESHOLD
            add = torch.where(m_keep, attn_mask.to(mdt), torch.zeros((), dtype=mdt, device=q.device))
        else:
            raise TypeError(f"`attn_mask` must be bool (True = attend) or floating point, got {attn_mask.dtype}")
        keep = m_keep if keep is None else keep & m_keep
    if alibi_slopes is not None:
        al = alibi_bias(alibi_slopes.detach(), nq, nk, mdt)
        add = al if add is None else add + al
    if bias is not None:
        b = bias.to(mdt)
        add = b if add is None else add + b
    if add is None:
        add = torch.zeros((1, 1, nq, nk), dtype=mdt, device=q.device)
    empty_rows: Tensor | None = None
    if keep is not None:
        while keep.dim() < 4:
            keep = keep.unsqueeze(0)
        if attn_mask is not None or nq > nk:  # a causal mask alone leaves no row empty when Nq <= Nk (no sync)
            any_visible = keep.any(dim=-1, keepdim=True)
            if not bool(any_visible.all()):
                empty_rows = ~any_visible
                keep = keep | empty_rows  # give empty rows something finite; their output is zeroed below
        add = torch.where(keep, add, torch.full((), float("-inf"), dtype=mdt, device=q.device))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=add.to(q.dtype), dropout_p=dropout_p, scale=scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def _backend(module: nn.Module | None) -> str:
    return getattr(module, "attn_backend", "auto") if module is not None else "auto"


def _sa(normalize: bool, detach_range: bool) -> AttentionFn:
    def fn(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        bias: Tensor | None = None,
        alibi_slopes: Tensor | None = None,
        dropout_p: float = 0.0,
        module: nn.Module | None = None,
    ) -> Tensor:
        return sa_attention(
            q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
            normalize=normalize, detach_range=detach_range, dropout_p=dropout_p, backend=_backend(module),
        )

    fn.__name__ = f"sa_attention_normalize_{normalize}_detach_{detach_range}"
    fn.__doc__ = (
        f"SA-Softmax attention (normalize={normalize}, detach_range={detach_range}) through "
        "`sasoftmax.sa_attention`; the backend is `module.attn_backend` (default 'auto'). ALiBi slopes are passed "
        "through, so no N x N bias is built."
    )
    return fn


def _sa_weights(normalize: bool, detach_range: bool) -> WeightsFn:
    def weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
        return sa_rows(s, visible, normalize=normalize, detach_range=detach_range, eps=1e-10)

    weights.__name__ = f"sa_weights_normalize_{normalize}_detach_{detach_range}"
    return weights


register_normalizer("softmax", softmax_attention, "standard softmax attention (torch SDPA)", weights=masked_softmax)
register_normalizer(
    "sa_softmax", _sa(True, False), "normalized SA-Softmax (x - min)/(max - min) * softmax(x), the paper's default",
    weights=_sa_weights(True, False),
)
register_normalizer("sa_softmax_plain", _sa(False, False), "plain SA-Softmax x * softmax(x)",
                    weights=_sa_weights(False, False))
register_normalizer(
    "sa_softmax_detached", _sa(True, True), "normalized SA-Softmax with no gradient through the row min/max",
    weights=_sa_weights(True, True),
)

# The peer methods (softmax+1, sigmoid, SSMax, softpick, stablemax) register themselves on import; importing them here
# puts them in the registry whenever the registry is used.
from . import peers as _peers  # noqa: E402, F401
