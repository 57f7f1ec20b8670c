"""Attention normalizers: a registry of interchangeable "what replaces softmax" implementations.

A normalizer is a full attention function (scores -> weights -> weighted sum of values), so that each one can use
its own fast path (SDPA for softmax, :func:`sasoftmax.sa_attention` for SA-Softmax) and its own memory strategy.
The GPT model (:mod:`sasoftmax.lm.model`) only ever calls a registry entry, so a new method (softmax+1, sigmoid
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
  ``init_params(module, n_heads)`` when the model is built); SA normalizers read ``module.attn_backend`` (default
  ``"auto"``) and ``module.sa_eps`` (default :data:`sasoftmax.functional.DEFAULT_EPS`) when the module has them.

Returns ``(B, Hq, Nq, Dv)`` in the dtype of ``q``. A query row with no visible key returns 0 (never NaN).

Materialized weights (``Normalizer.weights``, optional but provided by every built-in entry)::

    weights(s, visible, module) -> w

* ``s``: float32 (float64 for float64 inputs) scores ``(B, Hq, Nq, Nk)`` = ``scale * q.k + bias + alibi + float
  mask``, finite everywhere (masked entries hold arbitrary finite values; a weights function must not read them).
* ``visible``: bool, broadcastable to ``s``, True = the key takes part; or None (every key visible).
* Returns ``w`` with the shape of ``s``, differentiable by autograd, exactly 0 at masked entries and on rows with no
  visible key.

This is what :func:`materialized_attention` (and so ``output_attentions``-style weight inspection and the gradient
diagnostics of :mod:`sasoftmax.lm.diagnostics`) runs. A peer method only needs its weights function:
``register_normalizer("softmax_plus_one", weights=fn, description=...)`` builds the attention function from it
(O(N^2) memory; register a fused ``fn`` as well when one exists).

Layout: :mod:`.registry` (the entries), :mod:`.builtin` (softmax and SA-Softmax), :mod:`.peers` (softmax+1, sigmoid,
SSMax, softpick, stablemax). Importing this package registers all of them.
"""

from ..attention.inputs import alibi_bias, causal_visibility, repeat_kv
from ..attention.materialized import MATERIALIZED_TILE_SCORES, materialized_attention
from . import peers
from .builtin import masked_softmax, softmax_attention
from .registry import (
    AttentionFn,
    InitParamsFn,
    Normalizer,
    WeightsFn,
    get_normalizer,
    list_normalizers,
    register_normalizer,
    unregister_normalizer,
)

__all__ = [
    "Normalizer",
    "AttentionFn",
    "InitParamsFn",
    "WeightsFn",
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
    "peers",
]
