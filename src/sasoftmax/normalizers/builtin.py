"""The built-in normalizers: ``softmax`` (torch SDPA) and the SA-Softmax family (:func:`sasoftmax.sa_attention`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import sa_attention
from ..attention.inputs import prepare, repeat_kv
from ..functional import DEFAULT_EPS, compute_dtype, sa_rows, softmax_rows
from .registry import AttentionFn, WeightsFn, register_normalizer

__all__ = ["softmax_attention", "masked_softmax"]

"""Denominator bias of the normalized form when the calling module sets no ``sa_eps``."""


def masked_softmax(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
    """Softmax weights over the visible keys (the ``weights`` of the ``softmax`` entry); rows with no visible key
    are 0."""
    del module
    if visible is None:
        return torch.softmax(s, dim=-1)
    return softmax_rows(s, visible)


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

    Shapes and mask conventions as in :mod:`sasoftmax.normalizers`. With only ``is_causal`` and ``Nq == Nk`` the
    call goes straight to SDPA's causal fast path (flash attention where available). Otherwise causality, the mask,
    ``bias`` and ALiBi are folded into one additive float mask (``-inf`` = masked; O(Nq*Nk) memory), and query rows
    with no visible key are returned as 0 instead of NaN. ``bias`` receives its gradient through SDPA's mask input.
    """
    del module  # stateless
    inp = prepare(q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
                  dropout_p=dropout_p)
    k, v = repeat_kv(k, inp.heads), repeat_kv(v, inp.heads)
    if inp.keep is None and bias is None and alibi_slopes is None and (not is_causal or inp.nq == inp.nk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=inp.scale)
    # One additive float mask in float32 (float64 for float64 inputs), then cast to the input dtype (SDPA wants the
    # same dtype as q).
    mdt = compute_dtype(q.dtype)
    add = inp.additive(0, inp.nq, mdt)
    if inp.bias is not None:
        add = inp.bias.to(mdt) if add is None else add + inp.bias.to(mdt)
    if add is None:
        add = torch.zeros((1, 1, inp.nq, inp.nk), dtype=mdt, device=q.device)
    keep = inp.visible(0, inp.nq)
    empty_rows: Tensor | None = None
    if keep is not None:
        if inp.may_have_empty_rows():  # a causal mask alone leaves no row empty when Nq <= Nk (no sync)
            any_visible = keep.any(dim=-1, keepdim=True)
            if not bool(any_visible.all()):
                empty_rows = ~any_visible
                keep = keep | empty_rows  # give empty rows something finite; their output is zeroed below
        add = torch.where(keep, add, torch.full((), float("-inf"), dtype=mdt, device=q.device))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=add.to(q.dtype), dropout_p=dropout_p, scale=inp.scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def _module_option(module: nn.Module | None, name: str, default):
    return getattr(module, name, default) if module is not None else default


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
            normalize=normalize, detach_range=detach_range, dropout_p=dropout_p,
            eps=_module_option(module, "sa_eps", DEFAULT_EPS),
            backend=_module_option(module, "attn_backend", "auto"),
        )

    fn.__name__ = f"sa_attention_normalize_{normalize}_detach_{detach_range}"
    fn.__doc__ = (
        f"SA-Softmax attention (normalize={normalize}, detach_range={detach_range}) through "
        "`sasoftmax.sa_attention`; the backend is `module.attn_backend` (default 'auto') and the denominator bias "
        f"`module.sa_eps` (default {DEFAULT_EPS:g}). ALiBi slopes are passed through, so no N x N bias is built."
    )
    return fn


def _sa_weights(normalize: bool, detach_range: bool) -> WeightsFn:
    def weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
        return sa_rows(s, visible, normalize=normalize, detach_range=detach_range,
                       eps=_module_option(module, "sa_eps", DEFAULT_EPS))

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
