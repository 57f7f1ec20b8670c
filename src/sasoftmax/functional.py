"""SA-Softmax as a plain tensor function (the row math every attention backend must agree with).

Semantics (``docs/contract.md`` section 1), for the scores ``s`` of one row over its *visible* entries:

* ``p = softmax(s)`` over visible entries only;
* plain form (``normalize=False``): ``w = s * p``;
* normalized form (``normalize=True``, the paper's default): ``a = min(min s, 0)``, ``b = max(max s, 0)``,
  ``w = (s - a) / (b - a + eps) * p``.

Masked entries take no part in the softmax or in min/max and get weight exactly 0. A row with no visible entry
gives all zeros (never NaN). The row math runs in float32 for float16/bfloat16 inputs (float64 stays float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sa_softmax", "sa_rows", "softmax_rows", "compute_dtype", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-10
"""The denominator bias of the normalized form, ``c = 1 / (b - a + eps)``: the authors' code's value and the default
of every entry point."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the row math runs in for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_rows(s: Tensor, visible: Tensor | None) -> Tensor:
    """Softmax along the last dim of ``s`` over the ``visible`` entries (bool, broadcastable, True = take part; None =
    all): masked entries and rows with no visible entry are exactly 0, never NaN. Shifted by the detached row max. A
    NaN (or +inf) among a row's visible scores makes the whole row NaN, as the math says (never a silent number)."""
    s_inf = s if visible is None else s.masked_fill(~visible, float("-inf"))
    row_max = s_inf.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0).detach()  # rows with no visible entry
    e = torch.exp(s_inf - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    return e / denom.masked_fill(denom == 0, 1.0)


def sa_rows(
    s: Tensor,
    visible: Tensor | None,
    *,
    normalize: bool,
    detach_range: bool,
    eps: float,
) -> Tensor:
    """SA-Softmax weights along the last dim of ``s`` (already in the compute dtype), differentiable by autograd.

    ``visible`` is a bool tensor broadcastable to ``s`` (True = take part) or None (all visible).
    Returns ``w`` with the shape of ``s``; masked entries and fully masked rows are exactly 0.
    """
    if s.shape[-1] == 0:
        return s.clone()
    s_zero = s if visible is None else s.masked_fill(~visible, 0.0)  # never multiply -inf by 0
    p = softmax_rows(s, visible)
    if not normalize:
        return s_zero * p
    # min/max over visible entries, clipped at 0; masked entries read as 0 in s_zero, which the clip makes harmless.
    mn = s_zero.amin(dim=-1, keepdim=True)
    mx = s_zero.amax(dim=-1, keepdim=True)
    zero = torch.zeros_like(mn)
    a = torch.where(mn < 0, mn, zero)  # exact zero gradient unless min < 0
    b = torch.where(mx > 0, mx, zero)
    if detach_range:
        a, b = a.detach(), b.detach()
    return (s_zero - a) / (b - a + eps) * p


def _check_mask(mask: Tensor, x: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"sa_softmax: `mask` must be a bool tensor (True = keep), got {got}")
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError as err:
        raise ValueError(
            f"sa_softmax: `mask` of shape {tuple(mask.shape)} does not broadcast to `x` of shape {tuple(x.shape)}"
        ) from err
    if torch.broadcast_shapes(mask.shape, x.shape) != x.shape:
        raise ValueError(
            f"sa_softmax: `mask` of shape {tuple(mask.shape)} would enlarge `x` of shape {tuple(x.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"sa_softmax: `mask` is on {mask.device} but `x` is on {x.device}")


def sa_softmax(
    x: Tensor,
    dim: int = -1,
    *,
    mask: Tensor | None = None,
    normalize: bool = True,
    detach_range: bool = False,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Self-Adjust Softmax of ``x`` along ``dim``.

    Args:
        x: floating-point tensor of any shape.
        dim: the dimension that is normalized.
        mask: optional bool tensor broadcastable to ``x``; True = keep, False = excluded (weight 0, and excluded
            from the softmax and from the min/max of the normalized form). Entries of ``x`` equal to ``-inf`` are
            excluded the same way.
        normalize: True for the paper's normalized form ``(x - a) / (b - a + eps) * softmax(x)`` with
            ``a = min(min x, 0)``, ``b = max(max x, 0)``; False for ``x * softmax(x)``.
        detach_range: stop the gradient through ``a`` and ``b`` (normalized form only).
        eps: denominator bias of the normalized form (:data:`DEFAULT_EPS`, as in the authors' code).

    Returns:
        A tensor of the shape and dtype of ``x``. The math runs in float32 for half-precision inputs.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"sa_softmax: `x` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"sa_softmax: `x` must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("sa_softmax: `x` must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"sa_softmax: `dim`={dim} is out of range for a tensor with {x.dim()} dims")
    if not eps > 0:
        raise ValueError(f"sa_softmax: `eps` must be > 0, got {eps}")
    if mask is not None:
        _check_mask(mask, x)
        mask = mask.expand(x.shape).movedim(dim, -1)
    s = x.movedim(dim, -1).to(compute_dtype(x.dtype))
    if bool(torch.isneginf(s).any()):  # -inf entries are excluded like masked ones, as softmax gives them 0
        finite = ~torch.isneginf(s)
        mask = finite if mask is None else mask & finite
    w = sa_rows(s, mask, normalize=normalize, detach_range=detach_range, eps=eps)
    return w.to(x.dtype).movedim(-1, dim)
