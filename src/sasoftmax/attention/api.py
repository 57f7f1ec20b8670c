"""``sa_attention``: one entry point, several interchangeable backends behind it."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import DEFAULT_EPS
from .backends import Backend, backend_names, choose, get_backend
from .inputs import AttentionInputs, autocast_inputs, prepare, run_without_autocast
from .materialized import reference_attention

__all__ = ["sa_attention", "sa_attention_with_weights", "available_backends"]


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` (``"auto"`` included), in ``auto``'s order of preference."""
    return ["auto", *backend_names()]


def sa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    normalize: bool = True,
    detach_range: bool = False,
    dropout_p: float = 0.0,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """SA-Softmax attention, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: ``(B, Hq, Nq, D)``. k: ``(B, Hkv, Nk, D)``. v: ``(B, Hkv, Nk, Dv)``; ``Hq % Hkv == 0`` (grouped-query
            attention: query head ``h`` uses key/value head ``h // (Hq // Hkv)``). One dtype and device for all three.
        attn_mask: bool (True = attend) or float (added to the scores; entries ``<= -65504``, i.e. ``-inf`` or a
            ``finfo.min``, mark the key as masked), broadcastable to ``(B, Hq, Nq, Nk)``.
        is_causal: causal mask, aligned bottom-right when ``Nq != Nk`` (query ``i`` sits at position ``Nk-Nq+i``).
            Combined with ``attn_mask`` when both are given.
        scale: score scale, default ``1/sqrt(D)``. Scores are ``scale * q.k + bias + float mask``; SA-Softmax sees
            the scaled, biased scores.
        bias: additive positional bias broadcastable to ``(B, Hq, Nq, Nk)``; receives a gradient if it requires one.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)``: adds ``-slope * |Nk - Nq + i - j|`` without an N x N tensor.
        normalize: True = the paper's normalized SA-Softmax, False = ``x * softmax(x)``.
        detach_range: stop the gradient through the row min/max of the normalized form.
        dropout_p: dropout on the SA weights (pass 0.0 in evaluation, as with SDPA).
        eps: denominator bias of the normalized form.
        generator: random generator for dropout (default: torch's global generator).
        window: ``(left, right)`` sliding window: query ``i`` (at position ``Nk - Nq + i``) sees keys ``j`` with
            ``pos - left <= j <= pos + right``; ``-1`` = unbounded on that side. Combines with every mask.
        softcap: logit soft-capping ``c``: the scaled products become ``c * tanh(scale * q.k / c)`` (before the
            float mask, ALiBi and ``bias`` are added), as in Gemma 2; the gradient flows through it.
        backend: ``"auto"``, ``"triton"`` (the fused GPU kernel), ``"cpp"`` (the fused CPU kernel), ``"chunked"``
            (memory-efficient) or ``"reference"`` (materialized; the one whose gradient can be differentiated again,
            for double backward). ``"auto"`` takes the first of these, in this order, that serves the device and can
            run the call (:mod:`sasoftmax.attention.backends`).

    Returns:
        ``(B, Hq, Nq, Dv)`` in the input dtype (under autocast: the autocast dtype). Rows with no visible key are 0.
    """
    q, k, v, ac_dev = autocast_inputs(q, k, v)
    inp = prepare(
        q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
        normalize=normalize, detach_range=detach_range, dropout_p=dropout_p, eps=eps, generator=generator,
        window=window, softcap=softcap,
    )
    check_backend_name(backend)
    return run_without_autocast(select(inp, backend).run, ac_dev, inp)


def check_backend_name(backend: object) -> None:
    """``ValueError`` unless ``backend`` is ``"auto"`` or a registered backend's name."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in backend_names()):
        raise ValueError(f"unknown `backend`={backend!r}; expected one of {available_backends()}")


def select(inp: AttentionInputs, backend: str) -> Backend:
    """The backend that runs ``inp``: ``auto``'s choice, or the named one (``RuntimeError`` if it is unavailable,
    ``ValueError`` if it cannot run this call)."""
    if backend == "auto":
        chosen = choose(inp)
    else:
        chosen = get_backend(backend)
        err = chosen.load_error()
        if err is not None:
            raise RuntimeError(f"backend={backend!r} is unavailable: {err}")
        reason = chosen.unsupported_reason(inp)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
    return chosen


def sa_attention_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    normalize: bool = True,
    detach_range: bool = False,
    dropout_p: float = 0.0,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Like :func:`sa_attention` with the materialized backend, also returning the weights.

    Returns ``(output (B, Hq, Nq, Dv), weights (B, Hq, Nq, Nk))``; the weights are those applied to ``v`` (after
    masking and dropout), in the input dtype. Memory is O(N^2): use it for analysis, not for long sequences."""
    q, k, v, ac_dev = autocast_inputs(q, k, v)
    inp = prepare(
        q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
        normalize=normalize, detach_range=detach_range, dropout_p=dropout_p, eps=eps, generator=generator,
        window=window, softcap=softcap,
    )
    out, w = run_without_autocast(reference_attention, ac_dev, inp)
    return out, w.to(q.dtype)
