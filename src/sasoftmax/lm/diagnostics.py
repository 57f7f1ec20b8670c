"""Gradient diagnostics of attention: does the gradient still reach the scores where the weights saturate?

The paper's argument (arXiv 2502.18277) is that softmax's Jacobian vanishes as a row saturates, so the gradient
``dL/ds`` of the attention scores dies there, while SA-Softmax keeps it alive. This module measures that in a real
model, for any normalizer of the registry that provides materialized ``weights`` (every built-in and peer does):

* :func:`probe_attention` — a context manager that makes every :class:`sasoftmax.lm.model.CausalSelfAttention` of a
  model compute its attention with explicit ``(B, H, T, T)`` scores and weights
  (:func:`sasoftmax.attention.materialized.materialized_attention`), keeping the score tensor's gradient. The forward
  values are those of the model's own normalizer (the fused paths agree with the materialized one to rounding).
* :func:`attention_diagnostics` — one forward+backward of a batch under the probe; returns per-layer statistics and
  their means over layers as a flat dict ``{"diag/<metric>": x, "diag/<metric>/layer<i>": x}`` (the names the trainer
  writes to ``metrics.jsonl`` every ``diag_interval`` steps and the report plots).

Metrics (per layer; "rows" are the query rows of every batch element and head that see at least one key):

* ``score_grad_norm``: mean over rows of ``||dL/ds_row||_2`` with ``L`` the model's mean token cross-entropy.
* ``score_grad_norm_saturated``: the same mean over *saturated* rows only (omitted when a layer has none).
* ``saturated_frac``: fraction of the rows with at least two visible keys whose softmax over the scores has a maximum
  above ``saturation`` (0.99 by default): the regime where softmax's gradient vanishes. Measured on ``softmax(s)`` for
  every normalizer, so that it describes the scores, not the method's weights. Rows with a single visible key (the
  first row of a causal mask) are trivially "saturated" and are left out of this metric and the next.
* ``score_entropy``: mean entropy (nats) of ``softmax(s)`` per row.
* ``score_range``: mean of ``max s - min s`` over the visible keys of each row.
* ``max_logit``: the largest visible score of the layer over the whole batch (Wortsman et al. 2023's "max attention
  logit": its growth at high learning rates is the instability qk-layernorm prevents). The global
  ``diag/max_logit`` is the mean over layers of these maxima, as for every metric.
* ``max_weight``: mean over rows of ``max_j |w_j|`` (the method's weights, before dropout; no dropout is used here).
* ``weight_sum``: mean over rows of ``sum_j w_j`` (1 for softmax; at most 1 for normalized SA).
* ``qkv_grad_norm``: Frobenius norm of the gradient of the layer's q/k/v projection weight.

The diagnostics leave the model as they found it: parameter gradients are restored, the train/eval mode is restored,
no random numbers are drawn (dropout is off).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..attention.materialized import materialized_attention

if TYPE_CHECKING:
    from .model import CausalSelfAttention

__all__ = ["probe_attention", "attention_diagnostics", "METRICS", "DEFAULT_SATURATION"]

DEFAULT_SATURATION = 0.99
METRICS = (
    "score_grad_norm",
    "score_grad_norm_saturated",
    "saturated_frac",
    "score_entropy",
    "score_range",
    "max_logit",
    "max_weight",
    "weight_sum",
    "qkv_grad_norm",
)


class _Probe:
    """Callable installed on an attention module; keeps the scores (with their gradient) and weights of the last
    forward."""

    def __init__(self) -> None:
        self.scores: Tensor | None = None
        self.visible: Tensor | None = None
        self.weights: Tensor | None = None

    def _on_scores(self, s: Tensor, visible: Tensor | None) -> None:
        if s.requires_grad:
            s.retain_grad()
        self.scores, self.visible = s, visible

    def __call__(self, module: CausalSelfAttention, q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any]) -> Tensor:
        weights_fn = module.normalizer.weights
        if weights_fn is None:
            raise ValueError(
                f"normalizer {module.normalizer.name!r} has no materialized `weights` function; gradient diagnostics "
                "need one (see sasoftmax.normalizers.register_normalizer(weights=...))"
            )
        out, w = materialized_attention(weights_fn, q, k, v, on_scores=self._on_scores, return_weights=True,
                                        **kwargs)
        self.weights = w
        return out


def _attention_modules(model: nn.Module) -> list[CausalSelfAttention]:
    from .model import CausalSelfAttention

    mods = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    if not mods:
        raise ValueError("`model` has no sasoftmax CausalSelfAttention layer to probe")
    return mods


@contextlib.contextmanager
def probe_attention(model: nn.Module) -> Iterator[list[_Probe]]:
    """Within the block, every attention layer of ``model`` runs through explicit scores and weights; yields the
    per-layer probes (in layer order) whose ``scores`` (with ``.grad`` after a backward), ``visible`` and ``weights``
    hold the last forward's tensors. Memory is O(T^2) per layer while the block is active."""
    mods = _attention_modules(model)
    probes = [_Probe() for _ in mods]
    previous = [m.probe for m in mods]
    for m, p in zip(mods, probes, strict=True):
        m.probe = p
    try:
        yield probes
    finally:
        for m, prev in zip(mods, previous, strict=True):
            m.probe = prev


def _row_stats(s: Tensor, g: Tensor | None, visible: Tensor | None, w: Tensor, saturation: float) -> dict[str, float]:
    """Statistics of one layer from scores ``s`` (B, H, T, T), their gradient ``g``, visibility and weights."""
    s = s.detach().double()
    w = w.detach().double()
    if visible is None:
        vis = torch.ones_like(s, dtype=torch.bool)
    else:
        vis = visible.expand_as(s)
    n_vis = vis.sum(dim=-1)
    rows = n_vis > 0  # (B, H, T) rows with at least one visible key
    multi = n_vis > 1  # rows where saturation means something
    n_rows = int(rows.sum())
    if n_rows == 0:
        return {}
    s_inf = s.masked_fill(~vis, float("-inf"))
    logp = torch.log_softmax(s_inf, dim=-1)
    p = logp.exp()
    pmax = p.amax(dim=-1)
    saturated = (pmax > saturation) & multi
    entropy = -(p * logp.masked_fill(~vis, 0.0)).sum(dim=-1)
    smax = s_inf.amax(dim=-1)
    smin = s.masked_fill(~vis, float("inf")).amin(dim=-1)

    def mean(x: Tensor, where: Tensor) -> float:
        return float(x[where].mean())

    out = {
        "saturated_frac": float(saturated.sum()) / max(1, int(multi.sum())),
        "score_entropy": mean(entropy, rows),
        "score_range": mean(smax - smin, rows),
        "max_logit": float(smax[rows].max()),
        "max_weight": mean(w.abs().amax(dim=-1), rows),
        "weight_sum": mean(w.sum(dim=-1), rows),
    }
    if g is not None:
        gnorm = g.detach().double().masked_fill(~vis, 0.0).norm(dim=-1)
        out["score_grad_norm"] = mean(gnorm, rows)
        if bool(saturated.any()):
            out["score_grad_norm_saturated"] = mean(gnorm, saturated)
    return out


def attention_diagnostics(
    model: nn.Module,
    idx: Tensor,
    targets: Tensor,
    *,
    saturation: float = DEFAULT_SATURATION,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Per-layer gradient diagnostics of one batch (see the module docstring for the metrics).

    Args:
        model: a :class:`sasoftmax.lm.model.GPT` (or any module whose attention layers are ``CausalSelfAttention`` and
            whose ``forward(idx, targets)`` returns ``(logits, loss)``); not a DDP/compiled wrapper — pass the raw
            module.
        idx, targets: ``(B, T)`` token ids and next-token targets.
        saturation: softmax maximum above which a row counts as saturated, in (0, 1).
        autocast: optional autocast context for the forward (the trainer passes its own).

    Returns ``{"diag/<metric>": mean over layers, "diag/<metric>/layer<i>": value}``; a metric a layer cannot report
    (``score_grad_norm_saturated`` with no saturated row) is left out for that layer and averaged over the others.
    The parameter gradients and the train/eval mode of ``model`` are restored afterwards."""
    if not (0.0 < saturation < 1.0):
        raise ValueError(f"`saturation` must be in (0, 1), got {saturation}")
    mods = _attention_modules(model)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    was_training = model.training
    try:
        for p in params:
            p.grad = None
        model.eval()  # no dropout: the diagnostics draw no random numbers
        with torch.enable_grad(), probe_attention(model) as probes:
            with autocast if autocast is not None else contextlib.nullcontext():
                _, loss = model(idx, targets)
            if loss is None:
                raise ValueError("`targets` are needed: the diagnostics differentiate the loss")
            loss.float().backward()
            per_layer = []
            for mod, probe in zip(mods, probes, strict=True):
                if probe.scores is None or probe.weights is None:
                    raise RuntimeError("an attention layer was not called during the forward")
                stats = _row_stats(probe.scores, probe.scores.grad, probe.visible, probe.weights, saturation)
                wgrad = mod.c_attn.weight.grad
                if wgrad is not None:
                    stats["qkv_grad_norm"] = float(wgrad.detach().double().norm())
                per_layer.append(stats)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        model.train(was_training)
    result: dict[str, float] = {}
    for name in METRICS:
        values = [st[name] for st in per_layer if name in st]
        for i, st in enumerate(per_layer):
            if name in st:
                result[f"diag/{name}/layer{i}"] = st[name]
        if values:
            result[f"diag/{name}"] = math.fsum(values) / len(values)
    return result
