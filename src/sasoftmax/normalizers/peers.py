"""Peer normalizers: softmax replacements that SA-Softmax is compared against.

Importing this module (which :mod:`sasoftmax.normalizers` does) registers five entries, each from its materialized
weights function only (so each runs through :func:`sasoftmax.attention.materialized.materialized_attention`,
O(Nq * Nk) memory):

==================== ==============================================================================================
name                 weights over the visible keys ``j`` of one query row (``n`` = number of visible keys)
==================== ==============================================================================================
``softmax_plus_one`` ``e^{s_i} / (1 + sum_j e^{s_j})``                              (E. Miller, 2023, "off by one")
``sigmoid``          ``sigmoid(s_i + b)``, ``b = -log(n)`` or ``module.sigmoid_bias`` (Ramapuram et al., 2024)
``ssmax``            ``softmax_j(c_h * log(n) * s_j)``, ``c_h`` learnable per head   (Nakanishi, 2025)
``softpick``         ``relu(e^{s_i} - 1) / (sum_j |e^{s_j} - 1| + eps)``              (Zuhri et al., 2025)
``stablemax``        ``g(s_i) / sum_j g(s_j)``, ``g(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0)``  (Prieto et al., 2025)
==================== ==============================================================================================

Every weights function follows the contract of :mod:`sasoftmax.normalizers`: ``weights(s, visible, module) -> w``
with ``s`` of shape ``(B, Hq, Nq, Nk)``, ``visible`` a bool tensor broadcastable to it (True = the key takes part)
or None (every key visible). The result has the shape of ``s``, in float32 (float64 for float64 scores; half and
bfloat16 scores are promoted to float32), is exactly 0 at masked entries and on rows with no visible key, and is
finite, with finite gradients, for finite scores (tested up to ``|s| = 1e4``). Masked score entries are never read
in a way that can reach the result or the gradient. See ``docs/peers.md`` for the choices made.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import compute_dtype
from .builtin import masked_softmax
from .registry import register_normalizer

__all__ = [
    "softmax_plus_one_weights",
    "sigmoid_weights",
    "ssmax_weights",
    "ssmax_init_params",
    "softpick_weights",
    "stablemax_weights",
    "SOFTPICK_EPS",
    "SSMAX_DEFAULT_BLOCK_SIZE",
    "ssmax_default_scale",
]

SOFTPICK_EPS = 1e-8
"""Softpick's denominator constant (the authors' reference implementation uses 1e-8); override per module with a
``softpick_eps`` attribute."""

SSMAX_DEFAULT_BLOCK_SIZE = 512
"""Training length assumed for SSMax's scale when there is no module to read ``config.block_size`` from (the
default ``GPTConfig.block_size``)."""


def _prepare(s: Tensor) -> Tensor:
    """``s`` in the compute dtype (float64 stays float64, anything else becomes float32)."""
    if not s.is_floating_point():
        raise TypeError(f"scores must be floating point, got {s.dtype}")
    return s.to(compute_dtype(s.dtype))


def _visible_count(s: Tensor, visible: Tensor | None) -> Tensor:
    """Number of visible keys per row, shape broadcastable to ``s`` with a trailing 1, in the dtype of ``s``."""
    if visible is None:
        return torch.full((1,) * (s.dim() - 1) + (1,), float(s.shape[-1]), dtype=s.dtype, device=s.device)
    return visible.sum(dim=-1, keepdim=True).to(s.dtype)


def _row_max_at_least_zero(s: Tensor, visible: Tensor | None) -> Tensor:
    """``m = max(0, max over visible keys of s)`` per row (keepdim), detached; 0 on rows with no visible key.

    Filling masked entries with 0 before the max gives exactly ``max(0, max visible)``, since the result is clamped at
    0 anyway. The methods using it are invariant to ``m`` (it cancels between numerator and denominator), so no
    gradient needs to flow through it."""
    src = s if visible is None else s.masked_fill(~visible, 0.0)
    return src.amax(dim=-1, keepdim=True).clamp(min=0.0).detach()


def _exp_shifted(s: Tensor, visible: Tensor | None, m: Tensor) -> Tensor:
    """``e^{s - m}`` at visible entries, exactly 0 (with zero gradient) at masked ones; masked scores never reach
    ``exp`` (an arbitrary large masked score cannot overflow)."""
    if visible is None:
        return torch.exp(s - m)
    return torch.exp(s.masked_fill(~visible, float("-inf")) - m)


# --------------------------------------------------------------------------------------------------- softmax + 1


def softmax_plus_one_weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
    """Softmax with an extra implicit zero logit ("off by one"): ``w_i = e^{s_i} / (1 + sum_j e^{s_j})``.

    Sums over the visible keys ``j`` of the row. Computed as ``e^{s_i - m} / (e^{-m} + sum_j e^{s_j - m})`` with
    ``m = max(0, max_j s_j)``: no exponential overflows and the denominator is >= 1 (the ``e^{-m}`` term is 1 when
    ``m = 0``, the largest row term is 1 otherwise). Row sums lie in ``[0, 1)`` (they round to 1 in floating point
    when the largest score is very large); a row with no visible key is 0.

    Args:
        s: scores ``(B, Hq, Nq, Nk)``.
        visible: bool, broadcastable to ``s`` (True = key takes part), or None (all visible).
        module: unused.

    Returns:
        Weights of the shape of ``s`` in float32 (float64 for float64 ``s``).
    """
    del module
    s = _prepare(s)
    m = _row_max_at_least_zero(s, visible)
    e = _exp_shifted(s, visible, m)
    return e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))


# --------------------------------------------------------------------------------------------------- sigmoid


def sigmoid_weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
    """Sigmoid attention: ``w_i = sigmoid(s_i + b)``, element-wise, no normalization across the row.

    ``b = -log(n)`` with ``n`` the number of visible keys of the row (so a causal row ``i`` without padding has
    ``n = i + 1``, padding keys are not counted, and with ``visible=None`` ``n = Nk``); rows with no visible key are 0.
    When ``module`` has an attribute ``sigmoid_bias`` that is not None, it replaces ``-log(n)``: a float, or a tensor
    broadcastable to ``s``; a 1-D tensor of length ``Hq`` is always taken per head.

    Args:
        s: scores ``(B, Hq, Nq, Nk)``.
        visible: bool, broadcastable to ``s`` (True = key takes part), or None (all visible).
        module: optional holder of ``sigmoid_bias``.

    Returns:
        Weights in ``[0, 1)`` of the shape of ``s`` in float32 (float64 for float64 ``s``), 0 at masked entries.
    """
    s = _prepare(s)
    override = getattr(module, "sigmoid_bias", None) if module is not None else None
    if override is None:
        b = -torch.log(_visible_count(s, visible).clamp(min=1.0))
    elif isinstance(override, Tensor):
        b = override.to(device=s.device, dtype=s.dtype)
        if b.dim() == 1 and s.dim() == 4 and b.shape[0] == s.shape[1]:
            b = b.view(1, -1, 1, 1)
    else:
        b = torch.tensor(float(override), dtype=s.dtype, device=s.device)
    w = torch.sigmoid(s + b)
    if visible is None:
        return w
    return torch.where(visible, w, torch.zeros((), dtype=s.dtype, device=s.device))


# --------------------------------------------------------------------------------------------------- SSMax


def ssmax_default_scale(block_size: int = SSMAX_DEFAULT_BLOCK_SIZE) -> float:
    """The initial SSMax scale ``1 / log(block_size)``: at the training length ``n = block_size`` SSMax then equals
    softmax (``block_size < 2`` is treated as 2 to keep the value finite)."""
    return 1.0 / math.log(max(int(block_size), 2))


def ssmax_init_params(module: nn.Module, n_heads: int) -> None:
    """Create ``module.ssmax_scale``, an ``nn.Parameter`` of shape ``(n_heads,)`` filled with
    ``1 / log(module.config.block_size)`` (:data:`SSMAX_DEFAULT_BLOCK_SIZE` when the module has no config)."""
    config = getattr(module, "config", None)
    block_size = getattr(config, "block_size", SSMAX_DEFAULT_BLOCK_SIZE)
    module.ssmax_scale = nn.Parameter(torch.full((int(n_heads),), ssmax_default_scale(block_size)))


def ssmax_weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
    """Scalable-Softmax: ``w = softmax_j(c_h * log(n) * s_j)`` over the visible keys ``j`` of the row.

    ``n`` is the number of visible keys of the row (``n = 1`` gives weight 1 on the only key, ``n = 0`` a zero row)
    and ``c_h`` the scale of query head ``h``: ``module.ssmax_scale`` (shape ``(Hq,)``, or a scalar, created by
    :func:`ssmax_init_params`; gradients flow into it). Without a module, or a module without ``ssmax_scale``, every
    head uses :func:`ssmax_default_scale` ``= 1 / log(512)``.

    Args:
        s: scores ``(B, Hq, Nq, Nk)``.
        visible: bool, broadcastable to ``s`` (True = key takes part), or None (all visible).
        module: optional holder of ``ssmax_scale``.

    Returns:
        Weights of the shape of ``s`` in float32 (float64 for float64 ``s``), rows summing to 1 (0 if no key visible).
    """
    s = _prepare(s)
    scale = getattr(module, "ssmax_scale", None) if module is not None else None
    if scale is None:
        c: Tensor | float = ssmax_default_scale()
    elif isinstance(scale, Tensor):
        c = scale.to(device=s.device, dtype=s.dtype)
        if c.dim() == 1:
            if s.dim() != 4 or c.shape[0] != s.shape[1]:
                raise ValueError(
                    f"ssmax_scale of shape {tuple(c.shape)} does not match scores {tuple(s.shape)}: expected (Hq,) "
                    "with scores (B, Hq, Nq, Nk)"
                )
            c = c.view(1, -1, 1, 1)
        elif c.dim() != 0:
            raise ValueError(f"ssmax_scale must be a scalar or have shape (Hq,), got {tuple(c.shape)}")
    else:
        c = float(scale)
    log_n = torch.log(_visible_count(s, visible).clamp(min=1.0))
    return masked_softmax(s * (c * log_n), visible)


# --------------------------------------------------------------------------------------------------- softpick


def softpick_weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
    """Softpick (rectified softmax): ``w_i = relu(e^{s_i} - 1) / (sum_j |e^{s_j} - 1| + eps)``.

    Sums over the visible keys ``j`` of the row; ``eps`` is :data:`SOFTPICK_EPS` (1e-8) unless ``module`` has a
    ``softpick_eps`` attribute. Computed with ``m = max(0, max_j s_j)`` as
    ``relu(e^{s_i - m} - e^{-m}) / (sum_j |e^{s_j - m} - e^{-m}| + eps * e^{-m})`` (the same value; nothing overflows).
    Weights are >= 0, exactly 0 where ``s_i <= 0``, and sum to at most 1; a row whose scores are all <= 0 (or with no
    visible key) is all 0 by design, with finite gradients.

    Args:
        s: scores ``(B, Hq, Nq, Nk)``.
        visible: bool, broadcastable to ``s`` (True = key takes part), or None (all visible).
        module: optional holder of ``softpick_eps``.

    Returns:
        Weights of the shape of ``s`` in float32 (float64 for float64 ``s``).
    """
    eps = getattr(module, "softpick_eps", None) if module is not None else None
    eps = SOFTPICK_EPS if eps is None else float(eps)
    s = _prepare(s)
    m = _row_max_at_least_zero(s, visible)
    e_m = torch.exp(-m)
    d = _exp_shifted(s, visible, m) - e_m  # e^{-m} (e^{s} - 1); at masked entries -e^{-m}, removed below
    if visible is not None:
        d = torch.where(visible, d, torch.zeros((), dtype=s.dtype, device=s.device))
    return torch.relu(d) / (d.abs().sum(dim=-1, keepdim=True) + eps * e_m)


# --------------------------------------------------------------------------------------------------- stablemax


def _stablemax_g(x: Tensor) -> Tensor:
    """``g(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` for ``x < 0``; each branch only sees inputs on which it is
    finite (the other branch gets 0), so neither value nor gradient of the untaken branch can be inf/NaN."""
    nonneg = x >= 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    pos = torch.where(nonneg, x, zero) + 1.0
    neg = 1.0 / (1.0 - torch.where(nonneg, zero, x))
    return torch.where(nonneg, pos, neg)


def stablemax_weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
    """StableMax: ``w_i = g(s_i) / sum_j g(s_j)`` over the visible keys ``j``, ``g(x) = x + 1`` (``x >= 0``),
    ``1 / (1 - x)`` (``x < 0``).

    ``g`` is positive and grows linearly instead of exponentially, so no shift is needed. Rows sum to 1 with every
    visible weight > 0; a row with no visible key is 0.

    Args:
        s: scores ``(B, Hq, Nq, Nk)``.
        visible: bool, broadcastable to ``s`` (True = key takes part), or None (all visible).
        module: unused.

    Returns:
        Weights of the shape of ``s`` in float32 (float64 for float64 ``s``).
    """
    del module
    s = _prepare(s)
    g = _stablemax_g(s)
    if visible is not None:
        g = torch.where(visible, g, torch.zeros((), dtype=s.dtype, device=s.device))
    denom = g.sum(dim=-1, keepdim=True)
    return g / torch.where(denom > 0, denom, torch.ones_like(denom))


# --------------------------------------------------------------------------------------------------- registration

register_normalizer(
    "softmax_plus_one", weights=softmax_plus_one_weights,
    description="softmax plus one (Miller 2023): e^x / (1 + sum e^x), lets a head attend to nothing",
)
register_normalizer(
    "sigmoid", weights=sigmoid_weights,
    description="sigmoid attention (Ramapuram et al. 2024): sigmoid(x - log n), n = visible keys of the row",
)
register_normalizer(
    "ssmax", weights=ssmax_weights, init_params=ssmax_init_params,
    description="Scalable-Softmax (Nakanishi 2025): softmax(s_h log(n) x), s_h learnable per head",
)
register_normalizer(
    "softpick", weights=softpick_weights,
    description="softpick (Zuhri et al. 2025): relu(e^x - 1) / (sum |e^x - 1| + eps), rectified, not sum-to-one",
)
register_normalizer(
    "stablemax", weights=stablemax_weights,
    description="StableMax (Prieto et al. 2025): g(x) / sum g(x), g = x + 1 (x >= 0), 1 / (1 - x) (x < 0)",
)
