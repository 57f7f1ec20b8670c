"""Positional encodings for the GPT model, behind a registry.

A positional encoding is an ``nn.Module`` (:class:`PositionalEncoding`) that gives the attention layer up to three
things, each optional:

* :meth:`~PositionalEncoding.rotate` transforms ``q`` and ``k`` (RoPE);
* :meth:`~PositionalEncoding.alibi_slopes` returns per-head slopes ``(H,)`` that the model passes to the normalizer as
  ``alibi_slopes`` (ALiBi: ``sa_attention`` then adds the bias on the fly, O(N*D) memory, no N x N tensor);
* :meth:`~PositionalEncoding.bias` returns an additive score bias ``(1, H, Nq, Nk)`` that carries a gradient to the
  encoding's parameters (Kerple, FIRE).

Positions follow the bottom-right alignment of ``is_causal``: with ``Nq`` queries and ``Nk`` keys, key ``j`` sits at
position ``j`` and query ``i`` at position ``Nk - Nq + i``. Nothing here has a maximum length: every encoding works
for sequences longer than the training length (length extrapolation).

Keeping learnable parameters positive: Kerple's ``r1``, ``r2`` and FIRE's ``c`` and ``L`` are *clamped* in the forward
(at ``eps = 1e-2`` for Kerple as in its reference implementation, ``c >= 1e-4``, ``L >= 1`` for FIRE; Kerple-power's
exponent also ``<= 2``). The stored parameter is not changed; a clamped value passes no gradient to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "PositionalEncoding",
    "NoPE",
    "RoPE",
    "ALiBi",
    "KerpleLog",
    "KerplePower",
    "FIRE",
    "alibi_slopes",
    "Positional",
    "register_positional",
    "unregister_positional",
    "get_positional",
    "list_positionals",
    "build_positional",
]


def _positions(nq: int, nk: int, device: torch.device | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Query positions ``Nk - Nq + i`` ``(Nq,)`` and key positions ``j`` ``(Nk,)``."""
    qpos = torch.arange(nq, device=device, dtype=dtype) + (nk - nq)
    kpos = torch.arange(nk, device=device, dtype=dtype)
    return qpos, kpos


class PositionalEncoding(nn.Module):
    """Base class: the identity (no rotation, no slopes, no bias). Subclasses override what they provide.

    Args:
        n_head: number of query heads ``H`` (slopes and biases are per query head).
        head_dim: per-head dimension ``D`` of ``q``/``k``.
        block_size: training context length (FIRE initializes its threshold ``L`` with it).
    """

    def __init__(self, n_head: int, head_dim: int, block_size: int):
        super().__init__()
        for name, val in (("n_head", n_head), ("head_dim", head_dim), ("block_size", block_size)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {val!r}")
        self.n_head = n_head
        self.head_dim = head_dim
        self.block_size = block_size

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Position-dependent transform of ``q (B, Hq, Nq, D)`` and ``k (B, Hkv, Nk, D)``; identity by default.

        ``offset`` shifts all positions (keys at ``offset + j``, queries at ``offset + Nk - Nq + i``)."""
        return q, k

    def alibi_slopes(self) -> Tensor | None:
        """Per-head ALiBi slopes ``(H,)`` (float32, no gradient) or None."""
        return None

    def bias(self, nq: int, nk: int, *, device: torch.device | None = None) -> Tensor | None:
        """Additive score bias ``(1, H, Nq, Nk)`` in float32 (may require grad) or None."""
        return None

    def reset_parameters(self) -> None:
        """(Re-)initialize learnable parameters; the model calls this after its own weight init."""

    def reset_buffers(self) -> None:
        """Recompute the buffers that are not saved in state dicts (loaders that build a model on the meta device,
        such as transformers' ``from_pretrained``, call this)."""


class NoPE(PositionalEncoding):
    """No positional encoding: the causal mask alone carries order."""


class RoPE(PositionalEncoding):
    """Rotary position embedding (Su et al.), base 10000, rotating all ``D`` dimensions.

    Pairs are ``(x[t], x[t + D/2])`` for ``t < D/2`` (the "rotate half" layout of GPT-NeoX / Llama), rotated by the
    angle ``pos * base^(-2t/D)``. The rotation is computed in float32 and cast back to the input dtype.
    """

    def __init__(self, n_head: int, head_dim: int, block_size: int, base: float = 10000.0):
        super().__init__(n_head, head_dim, block_size)
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even `head_dim`, got {head_dim}")
        self.base = float(base)
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> Tensor:
        return (self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)).float()

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``cos``/``sin`` of the angles for ``positions (N,)``: each ``(N, D/2)`` float32."""
        ang = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return ang.cos(), ang.sin()

    def rotate_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x (..., N, D)`` at integer ``positions (N,)``. (Not named ``apply``: ``nn.Module.apply(fn)``
        recurses into every child by that name.)"""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE built for head_dim {self.head_dim}, got input with last dim {x.shape[-1]}")
        cos, sin = self.cos_sin(positions)
        half = self.head_dim // 2
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.to(x.dtype)

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        qpos, kpos = _positions(q.shape[-2], k.shape[-2], q.device, torch.float32)
        return self.rotate_at(q, qpos + offset), self.rotate_at(k, kpos + offset)


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi slopes ``(n_head,)`` float32: ``2^(-8h/H)`` for ``h = 1..H`` when ``H`` is a power of two; otherwise the
    slopes of the closest lower power of two ``n`` followed by every other slope of ``2n`` (``h = 1, 3, 5, ...``)
    until there are ``H`` of them (the ALiBi paper's rule)."""
    if not isinstance(n_head, int) or n_head <= 0:
        raise ValueError(f"`n_head` must be a positive int, got {n_head!r}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    n = 2 ** int(math.floor(math.log2(n_head)))
    slopes = geometric(n)
    if n < n_head:
        slopes += geometric(2 * n)[0::2][: n_head - n]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(PositionalEncoding):
    """ALiBi (Press et al.): score bias ``-m_h * (i - j)`` with fixed slopes :func:`alibi_slopes`; handed to the
    normalizer as ``alibi_slopes`` so the SA path never materializes an N x N bias."""

    def __init__(self, n_head: int, head_dim: int, block_size: int):
        super().__init__(n_head, head_dim, block_size)
        self.slopes: Tensor
        self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)

    def reset_buffers(self) -> None:
        self.slopes = alibi_slopes(self.n_head).to(self.slopes.device)

    def alibi_slopes(self) -> Tensor:
        return self.slopes.float()

    def bias(self, nq: int, nk: int, *, device: torch.device | None = None) -> Tensor | None:
        return None  # given as slopes instead

    def dense_bias(self, nq: int, nk: int) -> Tensor:
        """The bias the slopes stand for, ``-m_h * |Nk - Nq + i - j|``, as ``(1, H, Nq, Nk)`` (for analysis)."""
        qpos, kpos = _positions(nq, nk, self.slopes.device, torch.float32)
        return -self.slopes.float()[None, :, None, None] * (qpos[:, None] - kpos[None, :]).abs()


class _Kerple(PositionalEncoding):
    eps = 1e-2

    def __init__(self, n_head: int, head_dim: int, block_size: int):
        super().__init__(n_head, head_dim, block_size)
        self.r1 = nn.Parameter(torch.empty(n_head))
        self.r2 = nn.Parameter(torch.empty(n_head))
        self.reset_parameters()

    def _distance(self, nq: int, nk: int, device: torch.device | None) -> Tensor:
        qpos, kpos = _positions(nq, nk, device if device is not None else self.r1.device, torch.float32)
        return (qpos[:, None] - kpos[None, :]).abs()


class KerpleLog(_Kerple):
    """Kerple, logarithmic variant (Chi et al.): bias ``-r1_h * log(1 + r2_h * |i - j|)``, ``r1, r2 > 0`` learnable
    per head (clamped at ``1e-2`` in the forward). Init: ``r1 ~ U(eps, 2)``, ``r2 ~ U(eps, 1)``."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.r1.uniform_(self.eps, 2.0)
            self.r2.uniform_(self.eps, 1.0)

    def bias(self, nq: int, nk: int, *, device: torch.device | None = None) -> Tensor:
        dist = self._distance(nq, nk, device)
        r1 = self.r1.float().clamp(min=self.eps)[:, None, None]
        r2 = self.r2.float().clamp(min=self.eps)[:, None, None]
        return (-r1 * torch.log1p(r2 * dist)).unsqueeze(0)


class KerplePower(_Kerple):
    """Kerple, power variant: bias ``-r1_h * |i - j|^r2_h`` with ``r1 > 0`` and ``0 < r2 <= 2`` learnable per head
    (clamped to ``[1e-2, inf)`` and ``[1e-2, 2]`` in the forward). Init: ``r1 ~ U(eps, 1)``, ``r2 ~ U(eps, 2)``."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.r1.uniform_(self.eps, 1.0)
            self.r2.uniform_(self.eps, 2.0)

    def bias(self, nq: int, nk: int, *, device: torch.device | None = None) -> Tensor:
        dist = self._distance(nq, nk, device)
        r1 = self.r1.float().clamp(min=self.eps)[:, None, None]
        r2 = self.r2.float().clamp(min=self.eps, max=2.0)[:, None, None]
        return (-r1 * dist.pow(r2)).unsqueeze(0)


class FIRE(PositionalEncoding):
    """FIRE (Li et al.): bias ``f_theta(psi(i - j) / psi(max(L, i)))`` with ``psi(x) = log(c*x + 1)`` and ``f_theta``
    an MLP ``1 -> 32 -> H`` (ReLU). ``c`` (init 0.1) and ``L`` (init ``block_size``) are learnable; ``L`` is stored
    as ``L_scale * block_size`` with ``L_scale`` (init 1) the parameter, so that its gradient steps are relative.
    Causal: ``i - j`` is clamped at 0 (keys after the query are masked anyway). ``c >= 1e-4`` and ``L >= 1`` by
    clamping in the forward.

    The MLP is evaluated in blocks of query rows so that its hidden layer never holds more than ~16M values at once
    when no gradient is needed (long-context evaluation)."""

    hidden = 32
    _block_values = 1 << 24

    def __init__(self, n_head: int, head_dim: int, block_size: int, c_init: float = 0.1):
        super().__init__(n_head, head_dim, block_size)
        self.c_init = float(c_init)
        self.mlp = nn.Sequential(nn.Linear(1, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_head))
        self.c = nn.Parameter(torch.tensor(self.c_init))
        self.L_scale = nn.Parameter(torch.tensor(1.0))
        self.L_init: Tensor
        self.register_buffer("L_init", torch.tensor(float(block_size)))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
            self.c.fill_(self.c_init)
            self.L_scale.fill_(1.0)

    @property
    def threshold(self) -> Tensor:
        """The effective ``L`` (scalar tensor, with grad)."""
        return (self.L_scale.float() * self.L_init.float()).clamp(min=1.0)

    def normalized_distance(self, nq: int, nk: int, *, device: torch.device | None = None) -> Tensor:
        """``psi(max(i - j, 0)) / psi(max(L, i))`` as ``(Nq, Nk)`` float32."""
        device = device if device is not None else self.c.device
        qpos, kpos = _positions(nq, nk, device, torch.float32)
        c = self.c.float().clamp(min=1e-4)
        rel = (qpos[:, None] - kpos[None, :]).clamp(min=0.0)
        num = torch.log1p(c * rel)
        den = torch.log1p(c * torch.maximum(qpos, self.threshold))
        return num / den[:, None]

    def bias(self, nq: int, nk: int, *, device: torch.device | None = None) -> Tensor:
        x = self.normalized_distance(nq, nk, device=device)
        w_dtype = next(self.mlp.parameters()).dtype
        if torch.is_grad_enabled():
            rows = nq
        else:
            rows = max(1, self._block_values // max(1, nk * self.hidden))
        parts = [self.mlp(x[i : i + rows, :, None].to(w_dtype)) for i in range(0, nq, rows)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (Nq, Nk, H)
        return out.float().permute(2, 0, 1).unsqueeze(0)


# --------------------------------------------------------------------------------------------------------------------
# Registry

PositionalFactory = Callable[[int, int, int], PositionalEncoding]


@dataclass(frozen=True)
class Positional:
    """One registry entry: ``factory(n_head, head_dim, block_size) -> PositionalEncoding``."""

    name: str
    factory: PositionalFactory
    description: str

    def build(self, n_head: int, head_dim: int, block_size: int) -> PositionalEncoding:
        module = self.factory(n_head, head_dim, block_size)
        if not isinstance(module, PositionalEncoding):
            raise TypeError(
                f"positional {self.name!r}: factory returned {type(module).__name__}, expected a PositionalEncoding"
            )
        return module


_REGISTRY: dict[str, Positional] = {}


def register_positional(
    name: str, factory: PositionalFactory, description: str = "", *, overwrite: bool = False
) -> Positional:
    """Register ``factory(n_head, head_dim, block_size) -> PositionalEncoding`` under ``name`` (``ValueError`` if the
    name is taken and ``overwrite`` is False)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"`factory` must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"positional encoding {name!r} is already registered (pass overwrite=True to replace it)")
    entry = Positional(name=name, factory=factory, description=description)
    _REGISTRY[name] = entry
    return entry


def unregister_positional(name: str) -> None:
    """Remove ``name`` from the registry (``ValueError`` if it is not registered)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown positional encoding {name!r}; known: {list_positionals()}")
    del _REGISTRY[name]


def get_positional(name: str) -> Positional:
    """The registry entry for ``name``; ``ValueError`` listing the known names if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = list_positionals()
        raise ValueError(f"unknown positional encoding {name!r}; known positional encodings: {known}") from None


def list_positionals() -> list[str]:
    """Registered positional encoding names, sorted."""
    return sorted(_REGISTRY)


def build_positional(name: str, n_head: int, head_dim: int, block_size: int) -> PositionalEncoding:
    """Shortcut for ``get_positional(name).build(n_head, head_dim, block_size)``."""
    return get_positional(name).build(n_head, head_dim, block_size)


register_positional("nope", NoPE, "no positional encoding (causal mask only)")
register_positional("rope", RoPE, "rotary embedding, base 10000")
register_positional("alibi", ALiBi, "ALiBi linear bias, slopes 2^(-8h/H) (passed as alibi_slopes)")
register_positional("kerple_log", KerpleLog, "Kerple log bias -r1*log(1 + r2*|i-j|), learnable per head")
register_positional("kerple_power", KerplePower, "Kerple power bias -r1*|i-j|^r2, learnable per head")
register_positional("fire", FIRE, "FIRE: MLP of log-normalized relative distance, learnable c and L")
