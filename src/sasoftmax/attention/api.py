"""``sa_attention``: one entry point, several interchangeable backends behind it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from . import cpp_backend, ops  # noqa: F401  (ops: registers the sasoftmax:: custom ops)
from .chunked import chunked_attention
from .cpp_backend import cpp_attention
from .inputs import AttentionInputs, autocast_inputs, prepare, run_without_autocast
from .materialized import materialized, reference_attention, sa_weights

__all__ = ["sa_attention", "sa_attention_with_weights", "available_backends", "BACKENDS"]

log = logging.getLogger("sasoftmax.attention")


def _reference(inp: AttentionInputs) -> Tensor:
    return materialized(inp, sa_weights(inp))


def _triton(inp: AttentionInputs) -> Tensor:
    try:
        from .triton_backend import triton_attention, unsupported_reason
    except ImportError as err:  # triton missing or the kernel module failed to import
        raise RuntimeError(
            f"backend='triton' needs the `triton` package (pip install 'sasoftmax[triton]'): {err}"
        ) from err
    reason = unsupported_reason(inp)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run this call: {reason}")
    return triton_attention(inp)


BACKENDS: dict[str, Callable[[AttentionInputs], Tensor]] = {
    "reference": _reference,
    "chunked": chunked_attention,
    "cpp": cpp_attention,
    "triton": _triton,
}


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` (``"auto"`` included)."""
    return ["auto", *BACKENDS]


_WARNED: set[str] = set()


def _debug(msg: str, *args) -> None:
    if not torch.compiler.is_compiling():  # (a logging call would break a compiled graph)
        log.debug(msg, *args)


def _auto_cpu(inp: AttentionInputs) -> str:
    """The fused C++ kernel when it can run the call, else the chunked backend (the reason in the debug log; a
    kernel that cannot be built at all also gets one warning per process)."""
    reason = cpp_backend.unsupported_reason(inp)
    if reason is None:
        return "cpp"
    if reason == cpp_backend.load_error() and reason not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(reason)
        log.warning("sasoftmax: the fused CPU attention kernel is unavailable (%s); using the chunked backend", reason)
    _debug("auto: cpp cannot run this call (%s); using chunked", reason)
    return "chunked"


def _auto(inp: AttentionInputs) -> str:
    """Pick the fastest backend that supports the call: Triton on CUDA when it can, the fused C++ kernel on the CPU
    when it can, else the chunked path."""
    if inp.q.device.type == "cpu":
        return _auto_cpu(inp)
    if inp.q.is_cuda:
        try:
            from .triton_backend import unsupported_reason
        except ImportError as err:
            _debug("auto: triton unavailable (%s); using chunked", err)
            return "chunked"
        reason = unsupported_reason(inp)
        if reason is None:
            return "triton"
        _debug("auto: triton cannot run this call (%s); using chunked", reason)
    return "chunked"


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
    eps: float = 1e-10,
    generator: torch.Generator | None = None,
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
        backend: ``"auto"``, ``"reference"`` (materialized), ``"chunked"`` (memory-efficient), ``"cpp"`` (the fused
            CPU kernel) or ``"triton"`` (the fused GPU kernel). ``"auto"`` picks Triton on CUDA and the fused kernel
            on the CPU when they can run the call, else ``"chunked"``.

    Returns:
        ``(B, Hq, Nq, Dv)`` in the input dtype (under autocast: the autocast dtype). Rows with no visible key are 0.
    """
    q, k, v, ac_dev = autocast_inputs(q, k, v)
    inp = prepare(
        q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
        normalize=normalize, detach_range=detach_range, dropout_p=dropout_p, eps=eps, generator=generator,
    )
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"unknown `backend`={backend!r}; expected one of {available_backends()}")
    name = _auto(inp) if backend == "auto" else backend
    return run_without_autocast(BACKENDS[name], ac_dev, inp)


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
    eps: float = 1e-10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Like :func:`sa_attention` with the materialized backend, also returning the weights.

    Returns ``(output (B, Hq, Nq, Dv), weights (B, Hq, Nq, Nk))``; the weights are those applied to ``v`` (after
    masking and dropout), in the input dtype. Memory is O(N^2): use it for analysis, not for long sequences."""
    q, k, v, ac_dev = autocast_inputs(q, k, v)
    inp = prepare(
        q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
        normalize=normalize, detach_range=detach_range, dropout_p=dropout_p, eps=eps, generator=generator,
    )
    out, w = run_without_autocast(reference_attention, ac_dev, inp)
    return out, w.to(q.dtype)
