"""Validation and one canonical form of everything an SA attention call takes.

Every backend receives an :class:`AttentionInputs`, so the meaning of masks, causality, biases and head layout is
decided here once (``docs/contract.md`` section 4):

* layout ``(B, H, N, D)`` as in ``torch.nn.functional.scaled_dot_product_attention``;
* bool ``attn_mask``: True = attend; float ``attn_mask``: added to the scores, where entries ``<= -65504``
  (``-inf`` and every dtype's ``finfo.min``, as Hugging Face builds them) mark the key as masked;
* ``is_causal`` with ``Nq != Nk`` is aligned bottom-right: query ``i`` sits at key position ``Nk - Nq + i``;
* grouped-query attention: ``k``/``v`` may have ``Hkv`` heads with ``Hq % Hkv == 0``; query head ``h`` uses key/value
  head ``h // (Hq // Hkv)`` (the ``repeat_interleave`` convention of transformers);
* ``bias``: additive, broadcastable to ``(B, Hq, Nq, Nk)``, may require grad;
* ``alibi_slopes``: ``(Hq,)`` or ``(B, Hq)``; adds ``-slope * |Nk - Nq + i - j|`` (FlashAttention's convention)
  without an N x N tensor. Slopes get no gradient;
* ``window=(left, right)``: query ``i`` (at key position ``Nk - Nq + i``, bottom-right aligned as causality) sees keys
  ``j`` with ``pos - left <= j <= pos + right``; ``-1`` leaves that side unbounded (FlashAttention's ``window_size``);
* ``softcap=c``: the scaled products become ``c * tanh(scale * q.k / c)`` before the float mask, ALiBi and the bias
  are added (Gemma 2, FlashAttention's ``softcap``); the gradient flows through the ``tanh``.

Values (NaN/+inf in float masks, non-finite biases or slopes) are checked for CPU tensors. On other devices the
check would wait for the device (a host synchronization on every call), so it runs only when the environment
variable ``SASOFTMAX_CHECK_VALUES=1`` is set; ``SASOFTMAX_CHECK_VALUES=0`` turns it off on the CPU too. Inside
``torch.compile`` graphs it is skipped (a data-dependent check would break the graph).

This module is also the one home of the helpers that build masks, biases and head layouts from these conventions
(:func:`causal_block`, :func:`window_block`, :func:`alibi_block`, :func:`repeat_kv`, :func:`tile`), used by every
backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..env import optional_flag
from ..functional import DEFAULT_EPS, compute_dtype

# Float-mask entries at or below this value mean "masked" rather than "add this": it catches -inf and the
# finfo.min of float16 (-65504), bfloat16 and float32, which is how transformers writes masked positions.
MASKED_FLOAT_THRESHOLD = -65504.0

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ALL = slice(None)


@dataclass
class AttentionInputs:
    """A validated attention call. All masks/biases are 4-d views broadcastable to ``(B, Hq, Nq, Nk)``."""

    q: Tensor
    k: Tensor
    v: Tensor
    keep: Tensor | None  # bool, True = attend (from a bool mask or the finite part of a float mask)
    mask_add: Tensor | None  # additive part of a float mask (no gradient), masked entries set to 0
    bias: Tensor | None  # additive bias, may require grad
    alibi_slopes: Tensor | None  # (B or 1, Hq) float32
    is_causal: bool
    scale: float
    normalize: bool
    detach_range: bool
    eps: float
    dropout_p: float
    generator: torch.Generator | None
    window: tuple[int, int] | None = None  # (left, right), -1 = unbounded on that side; None = no window
    softcap: float | None = None  # c > 0: scores c * tanh(s / c); None = off
    seed: Tensor | None = None  # int64 (1,): this call's dropout seed when the caller drew it (else from `generator`)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def nq(self) -> int:
        return self.q.shape[2]

    @property
    def nk(self) -> int:
        return self.k.shape[2]

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.q.dtype)

    @property
    def has_mask(self) -> bool:
        return self.keep is not None or self.is_causal or self.window is not None

    def visible(
        self, i0: int, i1: int, bs: slice = _ALL, hs: slice = _ALL, j1: int | None = None
    ) -> Tensor | None:
        """Bool visibility of query rows ``[i0, i1)`` against keys ``[0, j1)`` (default all), batch range ``bs`` and
        query-head range ``hs``: a tensor broadcastable to ``(b, h, i1-i0, j1)``, or None when all are visible."""
        vis = None if self.keep is None else tile(self.keep, i0, i1, bs, hs, j1)
        if self.is_causal:
            causal = causal_block(i0, i1, self.nq, self.nk, self.q.device, j1)
            vis = causal if vis is None else vis & causal
        if self.window is not None:
            win = window_block(i0, i1, self.nq, self.nk, self.window, self.q.device, j1)
            vis = win if vis is None else vis & win
        return vis

    def may_have_empty_rows(self) -> bool:
        """False when every query row is guaranteed at least one visible key (with ``Nq <= Nk`` a causal or
        windowed row always sees the key at its own position)."""
        return self.keep is not None or ((self.is_causal or self.window is not None) and self.nq > self.nk)

    def additive(
        self, i0: int, i1: int, dtype: torch.dtype, bs: slice = _ALL, hs: slice = _ALL, j1: int | None = None
    ) -> Tensor | None:
        """The no-gradient additive terms (float-mask values, ALiBi) of a tile, or None."""
        add = None if self.mask_add is None else tile(self.mask_add, i0, i1, bs, hs, j1).to(dtype)
        if self.alibi_slopes is not None:
            slopes = tile2(self.alibi_slopes, bs, hs)
            al = alibi_block(slopes, i0, i1, self.nq, self.nk, dtype, j1)
            add = al if add is None else add + al
        return add

    def bias_rows(
        self, i0: int, i1: int, bs: slice = _ALL, hs: slice = _ALL, j1: int | None = None
    ) -> Tensor | None:
        return None if self.bias is None else tile(self.bias, i0, i1, bs, hs, j1)

    def causal_key_end(self, i1: int) -> int:
        """Rows ``< i1`` see no key at or after this index (causality and the window's right side; at least 1 key
        is kept)."""
        end = self.nk
        shift = self.nk - self.nq  # row i sits at key position i + shift
        if self.is_causal:
            end = min(end, i1 + shift)
        if self.window is not None and self.window[1] >= 0:
            end = min(end, i1 - 1 + shift + self.window[1] + 1)
        return max(1, end)


def tile(t: Tensor, i0: int, i1: int, bs: slice = _ALL, hs: slice = _ALL, j1: int | None = None) -> Tensor:
    """Slice a 4-d tensor broadcastable to ``(B, H, Nq, Nk)`` to a tile (keys ``[0, j1)``), leaving its size-1
    (broadcast) dims alone."""
    return t[
        bs if t.shape[0] != 1 else _ALL,
        hs if t.shape[1] != 1 else _ALL,
        slice(i0, i1) if t.shape[2] != 1 else _ALL,
        slice(0, j1) if t.shape[3] != 1 else _ALL,
    ]


def tile2(t: Tensor, bs: slice, hs: slice) -> Tensor:
    return t[bs if t.shape[0] != 1 else _ALL, hs if t.shape[1] != 1 else _ALL]


def causal_block(i0: int, i1: int, nq: int, nk: int, device: torch.device, j1: int | None = None) -> Tensor:
    """Bottom-right aligned causal visibility of query rows ``[i0, i1)`` and keys ``[0, j1)``: bool ``(i1-i0, j1)``."""
    qpos = torch.arange(i0, i1, device=device) + (nk - nq)
    kpos = torch.arange(nk if j1 is None else j1, device=device)
    return kpos[None, :] <= qpos[:, None]


def window_block(i0: int, i1: int, nq: int, nk: int, window: tuple[int, int], device: torch.device,
                 j1: int | None = None) -> Tensor:
    """Sliding-window visibility of query rows ``[i0, i1)`` and keys ``[0, j1)``: bool ``(i1-i0, j1)``, True where
    ``pos - left <= j <= pos + right`` (``pos = Nk - Nq + i``; a side of ``-1`` is unbounded)."""
    left, right = window
    qpos = torch.arange(i0, i1, device=device) + (nk - nq)
    kpos = torch.arange(nk if j1 is None else j1, device=device)
    diff = qpos[:, None] - kpos[None, :]  # how far key j lies behind the query
    vis = torch.ones(diff.shape, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= diff <= left
    if right >= 0:
        vis &= diff >= -right
    return vis


def causal_visibility(nq: int, nk: int, device: torch.device) -> Tensor:
    """Bool ``(Nq, Nk)``, True = attend, bottom-right aligned (query ``i`` at key position ``Nk - Nq + i``)."""
    return causal_block(0, nq, nq, nk, device)


def alibi_block(
    slopes: Tensor, i0: int, i1: int, nq: int, nk: int, dtype: torch.dtype, j1: int | None = None
) -> Tensor:
    """ALiBi bias ``-slope * |Nk - Nq + i - j|`` for rows ``[i0, i1)`` and keys ``[0, j1)``; ``slopes`` is
    ``(B or 1, Hq)``; returns ``(B or 1, Hq, i1-i0, j1)``."""
    qpos = torch.arange(i0, i1, device=slopes.device, dtype=dtype) + (nk - nq)
    kpos = torch.arange(nk if j1 is None else j1, device=slopes.device, dtype=dtype)
    dist = (qpos[:, None] - kpos[None, :]).abs()
    return -slopes.to(dtype)[:, :, None, None] * dist


def alibi_bias(slopes: Tensor, nq: int, nk: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """ALiBi as a dense bias ``-slope * |Nk - Nq + i - j|`` of shape ``(B or 1, H, Nq, Nk)``; ``slopes`` is ``(H,)``
    or ``(B, H)`` (the convention of ``sa_attention(alibi_slopes=...)``)."""
    return alibi_block(slopes[None] if slopes.dim() == 1 else slopes, 0, nq, nq, nk, dtype)


def repeat_kv(t: Tensor, heads: int) -> Tensor:
    """``(B, Hkv, N, X) -> (B, heads, N, X)`` repeating each key/value head ``heads // Hkv`` times (grouped-query
    attention: query head ``h`` uses key/value head ``h // (heads // Hkv)``)."""
    b, hkv, n, x = t.shape
    if hkv == heads:
        return t
    if hkv == 0 or heads % hkv != 0:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({hkv})")
    return t[:, :, None].expand(b, hkv, heads // hkv, n, x).reshape(b, heads, n, x)


def _as_4d(t: Tensor, name: str, target: tuple[int, int, int, int]) -> Tensor:
    if t.dim() > 4:
        raise ValueError(
            f"`{name}` must have at most 4 dims (broadcastable to (B, Hq, Nq, Nk)={target}), got {t.dim()}"
        )
    while t.dim() < 4:
        t = t.unsqueeze(0)
    for size, want in zip(t.shape, target, strict=True):
        if size not in (1, want):
            raise ValueError(
                f"`{name}` of shape {tuple(t.shape)} does not broadcast to (B, Hq, Nq, Nk)={target}"
            )
    return t


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be 4-d (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"`{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"`q`, `k`, `v` must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, _, D = q.shape
    if D == 0:
        raise ValueError("`q` and `k` must have head_dim > 0")
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"`k` and `v` must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"`k` and `v` must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"`q` and `k` must have the same head_dim, got {D} and {k.shape[3]}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]}) for grouped-query attention"
        )


def check_window(window: object) -> tuple[int, int] | None:
    """``window`` as ``(left, right)`` ints ``>= -1``, or None for no window (None or ``(-1, -1)``)."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"`window` must be None or a pair of ints (left, right), got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"`window` sides must be >= 0, or -1 for unbounded, got {(left, right)}")
    return None if (left, right) == (-1, -1) else (left, right)


def check_softcap(softcap: object) -> float | None:
    """``softcap`` as a float ``> 0``, or None (off)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"`softcap` must be None or a number > 0, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"`softcap` must be a finite number > 0 (None turns soft-capping off), got {softcap}")
    return float(softcap)


def _check_scalars(scale: float | None, head_dim: int, dropout_p: float, eps: float, is_causal: bool,
                   generator: torch.Generator | None) -> float:
    """Validate the scalar arguments; returns the score scale (default ``1/sqrt(head_dim)``)."""
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"`scale` must be a finite number, got {scale}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"`dropout_p` must be in [0, 1), got {dropout_p}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"`eps` must be a finite number > 0 (it keeps (b - a + eps) nonzero), got {eps}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"`is_causal` must be a bool, got {type(is_causal).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
    return scale


# (name, what is wrong, tensor whose values must all be finite)
_FiniteCheck = tuple[str, str, Tensor]


def _canonical_mask(attn_mask: Tensor | None, q: Tensor, target: tuple[int, int, int, int],
                    checks: list[_FiniteCheck]) -> tuple[Tensor | None, Tensor | None]:
    """``attn_mask`` as ``(keep, mask_add)``: the bool visibility and the additive part of a float mask."""
    if attn_mask is None:
        return None, None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"`attn_mask` must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device != q.device:
        raise ValueError(f"`attn_mask` is on {attn_mask.device} but `q` is on {q.device}")
    m4 = _as_4d(attn_mask, "attn_mask", target)
    if m4.dtype == torch.bool:
        return m4, None
    if not m4.is_floating_point():
        raise TypeError(
            f"`attn_mask` must be bool (True = attend) or floating point (additive), got {attn_mask.dtype}"
        )
    if m4.requires_grad:
        raise ValueError("`attn_mask` must not require grad; pass learnable terms as `bias`")
    keep = m4 > MASKED_FLOAT_THRESHOLD
    mask_add = torch.where(keep, m4, torch.zeros((), dtype=m4.dtype, device=m4.device))
    unmasked = m4.masked_fill(m4 <= MASKED_FLOAT_THRESHOLD, 0.0)  # NaN and +inf survive this
    checks.append(("attn_mask", "NaN or +inf (use -inf or finfo.min to mask)", unmasked))
    return keep, mask_add


def _canonical_bias(bias: Tensor | None, q: Tensor, target: tuple[int, int, int, int],
                    checks: list[_FiniteCheck]) -> Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        raise TypeError("`bias` must be a floating-point tensor broadcastable to (B, Hq, Nq, Nk)")
    if bias.device != q.device:
        raise ValueError(f"`bias` is on {bias.device} but `q` is on {q.device}")
    bias = _as_4d(bias, "bias", target)
    checks.append(("bias", "non-finite values (mask keys with `attn_mask` instead of -inf)", bias))
    return bias


def _canonical_slopes(slopes: Tensor | None, q: Tensor, checks: list[_FiniteCheck]) -> Tensor | None:
    """``alibi_slopes`` as ``(B or 1, Hq)`` float32."""
    if slopes is None:
        return None
    B, Hq = q.shape[0], q.shape[1]
    if not isinstance(slopes, Tensor) or not slopes.is_floating_point():
        raise TypeError("`alibi_slopes` must be a floating-point tensor of shape (Hq,) or (B, Hq)")
    if slopes.requires_grad:
        raise ValueError("`alibi_slopes` receive no gradient; pass learnable biases as `bias` instead")
    if slopes.device != q.device:
        raise ValueError(f"`alibi_slopes` is on {slopes.device} but `q` is on {q.device}")
    if slopes.dim() == 1:
        slopes = slopes[None]
    if slopes.dim() != 2 or slopes.shape[1] != Hq or slopes.shape[0] not in (1, B):
        raise ValueError(f"`alibi_slopes` must have shape ({Hq},) or ({B}, {Hq}), got {tuple(slopes.shape)}")
    slopes = slopes.float()
    checks.append(("alibi_slopes", "non-finite values", slopes))
    return slopes


def checks_values(device: torch.device) -> bool:
    """Whether :func:`prepare` checks mask/bias values on ``device`` (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    forced = optional_flag("SASOFTMAX_CHECK_VALUES")
    return device.type == "cpu" if forced is None else forced


def _check_finite(checks: list[_FiniteCheck]) -> None:
    """All value checks of a call with one host synchronization at most."""
    if not checks or not checks_values(checks[0][2].device):
        return
    flags = torch.stack([~torch.isfinite(t.detach()).all() for _, _, t in checks])
    if bool(flags.any()):
        name, what = next((n, w) for (n, w, _), bad in zip(checks, flags.tolist(), strict=True) if bad)
        raise ValueError(f"`{name}` contains {what}")


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, str | None]:
    """Under autocast, run in the autocast dtype like SDPA does (q/k/v cast to it); returns the device type whose
    autocast must be switched off inside, so the backends' explicit float32 row math is kept."""
    if not isinstance(q, Tensor):
        return q, k, v, None
    dev = q.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except (TypeError, RuntimeError):  # device types without autocast support
        return q, k, v, None
    if not enabled:
        return q, k, v, None
    dt = torch.get_autocast_dtype(dev)
    cast = [t.to(dt) if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
            for t in (q, k, v)]
    return cast[0], cast[1], cast[2], dev


def run_without_autocast(fn, dev: str | None, *args):
    """``fn(*args)``, with autocast of device type ``dev`` switched off (``dev=None``: as is)."""
    if dev is None:
        return fn(*args)
    with torch.autocast(dev, enabled=False):
        return fn(*args)


def prepare(
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
) -> AttentionInputs:
    """Check an attention call and return its canonical form. Raises ``TypeError``/``ValueError`` naming the
    offending argument for anything that does not fit the contract."""
    _check_qkv(q, k, v)
    B, Hq, Nq, D = q.shape
    target = (B, Hq, Nq, k.shape[2])
    scale = _check_scalars(scale, D, dropout_p, eps, is_causal, generator)
    window = check_window(window)
    softcap = check_softcap(softcap)
    checks: list[_FiniteCheck] = []
    keep, mask_add = _canonical_mask(attn_mask, q, target, checks)
    bias = _canonical_bias(bias, q, target, checks)
    alibi_slopes = _canonical_slopes(alibi_slopes, q, checks)
    _check_finite(checks)
    return AttentionInputs(
        q=q, k=k, v=v, keep=keep, mask_add=mask_add, bias=bias, alibi_slopes=alibi_slopes,
        is_causal=is_causal, scale=scale, normalize=bool(normalize), detach_range=bool(detach_range),
        eps=float(eps), dropout_p=float(dropout_p), generator=generator, window=window, softcap=softcap,
    )
