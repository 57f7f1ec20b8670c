"""The materialized backend: plain PyTorch autograd over the full ``(B, Hq, Nq, Nk)`` score tensor.

It is the executable form of the contract (``docs/contract.md``), the only path that can return the attention
weights, and the oracle the tests run in float64 against every other backend. Memory is O(N^2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import sa_rows
from .dropout import draw_seed, keep_mask
from .inputs import AttentionInputs


def expand_kv(t: Tensor, groups: int) -> Tensor:
    """``(B, Hkv, N, D) -> (B, Hkv * groups, N, D)``: query head ``h`` reads key/value head ``h // groups``."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def scores(inp: AttentionInputs) -> Tensor:
    """Scaled and biased scores ``(B, Hq, Nq, Nk)`` in the compute dtype (masked entries not yet removed)."""
    cdt = inp.compute_dtype
    k = expand_kv(inp.k, inp.groups)
    s = torch.matmul(inp.q, k.transpose(-1, -2)).to(cdt) * inp.scale
    add = inp.additive(0, inp.nq, cdt)
    if add is not None:
        s = s + add
    if inp.bias is not None:
        s = s + inp.bias.to(cdt)
    return s


def reference_attention(inp: AttentionInputs) -> tuple[Tensor, Tensor]:
    """Returns ``(output (B, Hq, Nq, Dv) in the input dtype, weights (B, Hq, Nq, Nk) in the compute dtype)``.

    The weights are those actually applied to ``v``: after masking and (in training) dropout."""
    s = scores(inp)
    w = sa_rows(s, inp.visible(0, inp.nq), normalize=inp.normalize, detach_range=inp.detach_range, eps=inp.eps)
    if inp.dropout_p > 0:
        seed = draw_seed(inp.generator)
        keep = keep_mask(seed, inp.dropout_p, inp.batch, inp.heads, inp.nq, inp.nk, 0, inp.nq, s.device)
        w = w * keep / (1.0 - inp.dropout_p)
    v = expand_kv(inp.v, inp.groups)
    out = torch.matmul(w.to(v.dtype), v)
    return out, w
