"""The materialized engine: attention with explicit ``(B, Hq, Nq, Nk)`` scores and weights, plain autograd.

One engine serves every path that needs the weights themselves: the ``"reference"`` backend (the executable form of
the contract and the path of :func:`sasoftmax.sa_attention_with_weights`), the peer normalizers, which are defined
by their weights alone, and the gradient diagnostics, which watch the scores' gradient. Memory is O(Nq * Nk), or
blocks of query rows recomputed in the backward for large calls (see :func:`materialized`).

A weights function is ``weights(s, visible, module) -> w``: ``s`` the scores in the compute dtype (``scale * q.k +
bias + alibi + float mask``, masked entries set to 0), ``visible`` a bool tensor broadcastable to ``s`` (True = the
key takes part) or None; ``w`` has the shape of ``s``, is differentiable and exactly 0 at masked entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..functional import sa_rows
from .dropout import draw_seed, keep_mask
from .inputs import AttentionInputs, prepare, repeat_kv

__all__ = ["WeightsFn", "MATERIALIZED_TILE_SCORES", "scores", "materialized", "materialized_attention",
           "reference_attention", "sa_weights"]

WeightsFn = Callable[[Tensor, "Tensor | None", "nn.Module | None"], Tensor]
ScoresHook = Callable[[Tensor, "Tensor | None"], None]

MATERIALIZED_TILE_SCORES = 1 << 24
"""Above this many scores (``B * Hq * Nq * Nk``) :func:`materialized` works on blocks of query rows of at most this
many scores each (64 MiB of float32), recomputing each block in the backward, so its memory stays bounded at long
lengths; with ``return_weights`` or ``on_scores`` it always builds the full tensors."""


def scores(inp: AttentionInputs, i0: int = 0, i1: int | None = None, kx: Tensor | None = None) -> Tensor:
    """Scaled (and soft-capped) and biased scores of query rows ``[i0, i1)``, ``(B, Hq, i1-i0, Nk)`` in the compute
    dtype (masked entries not removed). ``kx``: the keys with their heads already repeated to ``Hq`` (computed when
    None)."""
    i1 = inp.nq if i1 is None else i1
    cdt = inp.compute_dtype
    kx = repeat_kv(inp.k, inp.heads) if kx is None else kx
    s = torch.matmul(inp.q[:, :, i0:i1], kx.transpose(-1, -2)).to(cdt) * inp.scale
    if inp.softcap is not None:
        s = inp.softcap * torch.tanh(s / inp.softcap)
    add = inp.additive(i0, i1, cdt)
    if add is not None:
        s = s + add
    b = inp.bias_rows(i0, i1)
    if b is not None:
        s = s + b.to(cdt)
    return s


def sa_weights(inp: AttentionInputs) -> WeightsFn:
    """The SA-Softmax weights function of the call's variant (``normalize``, ``detach_range``, ``eps``)."""

    def weights(s: Tensor, visible: Tensor | None, module: nn.Module | None = None) -> Tensor:
        return sa_rows(s, visible, normalize=inp.normalize, detach_range=inp.detach_range, eps=inp.eps)

    return weights


@dataclass
class _Engine:
    """One materialized call: the validated inputs, the weights function and what every row block shares."""

    inp: AttentionInputs
    weights: WeightsFn
    module: nn.Module | None
    seed: int | None  # dropout seed (None = no dropout)
    kx: Tensor  # keys with their heads repeated to Hq
    vx: Tensor  # values with their heads repeated to Hq

    def rows(self, i0: int, i1: int, on_scores: ScoresHook | None = None) -> tuple[Tensor, Tensor]:
        """Output and applied weights of query rows ``[i0, i1)``."""
        inp = self.inp
        s = scores(inp, i0, i1, self.kx)
        visible = inp.visible(i0, i1)
        if visible is not None:
            s = s.masked_fill(~visible, 0.0)  # finite everywhere, as the weights contract promises
        if on_scores is not None:
            on_scores(s, visible)
        w = self.weights(s, visible, self.module)
        if visible is not None:
            w = w.masked_fill(~visible, 0.0)
        if self.seed is not None:
            keep = keep_mask(self.seed, inp.dropout_p, inp.batch, inp.heads, inp.nq, inp.nk, i0, i1, s.device)
            w = w * keep / (1.0 - inp.dropout_p)
        return torch.matmul(w.to(self.vx.dtype), self.vx), w


def materialized(inp: AttentionInputs, weights: WeightsFn, module: nn.Module | None = None, *,
                 return_weights: bool = False, on_scores: ScoresHook | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of a validated call with ``w = weights(s, visible, module)``.

    Returns the output ``(B, Hq, Nq, Dv)`` in the dtype of ``v`` and, with ``return_weights``, also the weights
    applied to ``v`` (after masking and dropout) in the compute dtype. ``on_scores(s, visible)`` sees the full score
    tensor before the weights are computed. Dropout uses the counter-based mask of every backend.

    Memory: the full score and weight tensors when weights are returned or scores observed, or when the call has at
    most :data:`MATERIALIZED_TILE_SCORES` scores; otherwise blocks of query rows of that size, each recomputed in the
    backward (``torch.utils.checkpoint``), so the activation memory stays O(Nq * D) plus one block."""
    seed = None
    if inp.dropout_p > 0:
        seed = int(inp.seed.item()) if inp.seed is not None else draw_seed(inp.generator)
    engine = _Engine(inp, weights, module, seed, repeat_kv(inp.k, inp.heads), repeat_kv(inp.v, inp.heads))
    per_row = max(1, inp.batch * inp.heads * inp.nk)
    if return_weights or on_scores is not None or per_row * inp.nq <= MATERIALIZED_TILE_SCORES:
        out, w = engine.rows(0, inp.nq, on_scores)
        return (out, w) if return_weights else out
    rows = max(1, MATERIALIZED_TILE_SCORES // per_row)
    grad = torch.is_grad_enabled()
    outs = []
    for i0 in range(0, inp.nq, rows):
        i1 = min(inp.nq, i0 + rows)

        def block(i0: int = i0, i1: int = i1) -> Tensor:
            return engine.rows(i0, i1)[0]

        outs.append(torch.utils.checkpoint.checkpoint(block, use_reentrant=False) if grad else block())
    return torch.cat(outs, dim=2)


def reference_attention(inp: AttentionInputs) -> tuple[Tensor, Tensor]:
    """SA attention of ``inp``, materialized: ``(output (B, Hq, Nq, Dv) in the input dtype, weights (B, Hq, Nq, Nk)
    in the compute dtype)``, the weights being those applied to ``v`` (after masking and dropout)."""
    out, w = materialized(inp, sa_weights(inp), return_weights=True)
    return out, w


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
    on_scores: ScoresHook | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention with explicit scores and weights ``w = weights(s, visible, module)``: the call of
    :func:`sasoftmax.sa_attention` (shapes, GQA, the mask conventions of :mod:`sasoftmax.attention.inputs`), then
    :func:`materialized` (its return values, dropout and memory rules)."""
    inp = prepare(q, k, v, attn_mask, is_causal=is_causal, scale=scale, bias=bias, alibi_slopes=alibi_slopes,
                  dropout_p=dropout_p, generator=generator)
    return materialized(inp, weights, module, return_weights=return_weights, on_scores=on_scores)
