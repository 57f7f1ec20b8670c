"""Counter-based attention dropout: the keep/drop decision of score ``(b, h, i, j)`` is a hash of its index and a
seed, so every backend and every block size drops exactly the same entries, and a backward pass can regenerate the
forward's mask block by block without storing it."""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def seed_tensor(generator: torch.Generator | None) -> Tensor:
    """One 62-bit seed as an int64 tensor of shape ``(1,)``, drawn from ``generator`` (on its device) or from torch's
    default CPU generator (so ``torch.manual_seed`` reproduces). No host synchronization, and traceable by
    ``torch.compile`` (with the default generator): the custom ops of :mod:`.ops` read it inside the op."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (1,), generator=generator, device=device)


def draw_seed(generator: torch.Generator | None) -> int:
    """The seed of :func:`seed_tensor` as a Python int (the same draw)."""
    return int(seed_tensor(generator).item())


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def keep_mask(
    seed: int,
    p: float,
    batch: int,
    heads: int,
    nq: int,
    nk: int,
    i0: int,
    i1: int,
    device: torch.device,
    bs: slice = slice(None),
    hs: slice = slice(None),
    j1: int | None = None,
) -> Tensor:
    """Bool keep-mask ``(b, h, i1-i0, Nk)`` for query rows ``[i0, i1)`` (and batch/head ranges ``bs``/``hs``) of a
    ``(B, H, Nq, Nk)`` score tensor (keys ``[0, j1)``); each entry is kept with probability ``1 - p``."""
    b_idx = torch.arange(batch, device=device)[bs]
    h_idx = torch.arange(heads, device=device)[hs]
    bh = b_idx[:, None] * heads + h_idx[None, :]
    rows = torch.arange(i0, i1, device=device)
    cols = torch.arange(nk if j1 is None else j1, device=device)
    idx = (bh[:, :, None, None] * nq + rows[None, None, :, None]) * nk + cols[None, None, None, :]
    lo, hi = seed & _M32, (seed >> 32) & _M32
    h = _fmix32((idx & _M32) ^ lo)
    h = _fmix32(h ^ (idx >> 32) ^ hi)
    threshold = int(p * 2**32)
    return h >= threshold
