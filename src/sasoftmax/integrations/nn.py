"""``torch.nn`` building blocks: a drop-in for ``nn.MultiheadAttention`` and in-place conversion of models.

:class:`SAMultiheadAttention` subclasses ``torch.nn.MultiheadAttention``: same constructor, parameters, state_dict
keys, forward signature, mask conventions and return values, with SA-Softmax in place of softmax. Weights load both
ways between the two classes.

:func:`convert` turns every ``nn.MultiheadAttention`` inside a model into an :class:`SAMultiheadAttention` in place
(same parameter objects, so an existing optimizer keeps working), and switches off the fused fast paths of
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` that would otherwise bypass the attention module's
``forward`` in evaluation mode.

Mask conventions (those of ``nn.MultiheadAttention``, the opposite of SDPA's bool convention):

* bool ``attn_mask`` / ``key_padding_mask``: True = this key is BLOCKED;
* float masks are added to the scores; entries ``<= -65504`` (``-inf``, any ``finfo.min``) count as blocked.
  Unlike softmax, SA-Softmax's normalized form takes the row min/max over the visible scores, so a "soft" large
  negative value such as ``-1e4`` is NOT a mask here: it takes part in the min and changes every weight of the row.
  Use ``-inf`` or a bool mask.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import available_backends
from ..functional import DEFAULT_EPS
from ..normalizers import get_normalizer, materialized_attention

__all__ = ["SAMultiheadAttention", "convert"]

def _block_fused_fast_path(module: nn.Module, args: Any) -> None:
    """No-op forward pre-hook. ``nn.TransformerEncoderLayer`` skips its fused kernel (which never calls
    ``self_attn.forward``) whenever any submodule carries a hook, so an :class:`SAMultiheadAttention` placed in an
    encoder layer by hand is still used in evaluation mode."""
    return None


class SAMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention with SA-Softmax, a drop-in for :class:`torch.nn.MultiheadAttention`.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype:
            exactly as ``nn.MultiheadAttention``. ``dropout`` applies to the SA weights in training mode.
        normalizer: an entry of :mod:`sasoftmax.normalizers` (``"softmax"``, a peer, ...); None (default) = the
            SA-Softmax entry chosen by ``normalize`` and ``detach_range``. Entries with learnable parameters create
            them on this module.
        normalize: True = the paper's normalized SA-Softmax, False = ``x * softmax(x)`` (when ``normalizer`` is
            None).
        detach_range: stop the gradient through the row min/max of the normalized form (when ``normalizer`` is
            None).
        eps: denominator bias of the normalized form.
        backend: ``sa_attention`` backend for the ``need_weights=False`` path (``"auto"``, ``"chunked"``, ...).

    Forward: ``(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)``, shapes as in torch:
    query ``(L, B, E)`` (``(B, L, E)`` if ``batch_first``, ``(L, E)`` unbatched), key/value ``(S, B, kdim/vdim)``;
    ``key_padding_mask`` ``(B, S)``; ``attn_mask`` ``(L, S)`` or ``(B * num_heads, L, S)``. Weights are the SA
    weights ``(B, L, S)`` averaged over heads, or ``(B, num_heads, L, S)``. ``need_weights=True`` (torch's default)
    takes the materialized O(L*S) path; pass ``need_weights=False`` for the memory-efficient one.
    ``is_causal`` is a hint as in torch: it requires ``attn_mask`` (the causal mask), which is then applied (or
    replaced by the equivalent built-in causal mask when no other mask or extra key is involved).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        normalizer: str | None = None,
        normalize: bool = True,
        detach_range: bool = False,
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
            kdim=kdim, vdim=vdim, batch_first=batch_first, device=device, dtype=dtype,
        )
        self._setup_sa(normalize=normalize, detach_range=detach_range, eps=eps, backend=backend, normalizer=normalizer)

    def _setup_sa(self, *, normalize: bool, detach_range: bool, eps: float, backend: str,
                  normalizer: str | None = None) -> None:
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"`eps` must be a number >= 0, got {eps!r}")
        if backend not in available_backends():
            raise ValueError(f"unknown `backend`={backend!r}; expected one of {available_backends()}")
        self.normalize = bool(normalize)
        self.detach_range = bool(detach_range)
        self.eps = float(eps)
        self.backend = backend
        self._normalizer: str | None = None
        self.normalizer = normalizer
        if _block_fused_fast_path not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_block_fused_fast_path)

    @property
    def normalizer(self) -> str:
        """The registry name of the normalizer in use: the one given, or the SA-Softmax entry of ``normalize`` and
        ``detach_range``."""
        if self._normalizer is not None:
            return self._normalizer
        if not self.normalize:
            return "sa_softmax_plain"
        return "sa_softmax_detached" if self.detach_range else "sa_softmax"

    @normalizer.setter
    def normalizer(self, name: str | None) -> None:
        if name is not None:
            entry = get_normalizer(name)  # ValueError listing the known names
            if entry.init_params is not None:
                entry.init_params(self, self.num_heads)
        self._normalizer = name

    @property
    def attn_backend(self) -> str:
        """The ``sa_attention`` backend SA normalizers use (the registry's ``module.attn_backend``)."""
        return self.backend

    @property
    def sa_eps(self) -> float:
        """The denominator bias SA normalizers use (the registry's ``module.sa_eps``)."""
        return self.eps

    @classmethod
    def from_torch(
        cls, mha: nn.MultiheadAttention, *, normalize: bool = True, detach_range: bool = False,
        eps: float = DEFAULT_EPS, backend: str = "auto", normalizer: str | None = None,
    ) -> SAMultiheadAttention:
        """A new :class:`SAMultiheadAttention` with the configuration and (shared) parameters of ``mha``."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"`mha` must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        new = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype,
            normalize=normalize, detach_range=detach_range, eps=eps, backend=backend, normalizer=normalizer,
        )
        for pname, param in mha.named_parameters(recurse=False):
            setattr(new, pname, param)
        new.out_proj = mha.out_proj
        new.train(mha.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, normalizer={self.normalizer!r}, "
            f"batch_first={self.batch_first}"
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """See the class docstring. Returns ``(attn_output, attn_weights or None)``."""
        batched, (query, key, value), key_padding_mask = self._batch_first(query, key, value, key_padding_mask)
        B, L, E = query.shape
        if is_causal and attn_mask is None:
            raise ValueError(
                "`is_causal=True` is a hint that `attn_mask` is the causal mask (as in nn.MultiheadAttention); "
                "pass `attn_mask` too, e.g. nn.Transformer.generate_square_subsequent_mask(L)"
            )
        q, k, v = self._project(query, key, value)
        keep, add = self._masks(key_padding_mask, attn_mask, B, L, key.shape[1], query.dtype)
        q, k, v, keep, add = self._heads(q, k, v, keep, add)
        # The causal hint may replace the mask by the built-in causal flag when nothing else shapes the row,
        # as torch does (torch's flag is top-left aligned, equal to ours when L == Sk).
        causal = bool(is_causal) and key_padding_mask is None and not need_weights and k.shape[2] == L
        if causal:
            keep = add = None
        mask: Tensor | None = keep
        if add is not None:
            mask = add if keep is None else add.masked_fill(~keep, float("-inf"))
        out, weights = self._attend(q, k, v, mask, causal, need_weights)
        out = F.linear(out.transpose(1, 2).reshape(B, L, E), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _batch_first(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None):
        """Checks, then ``(batched, (query (B, L, E), key (B, S, kdim), value (B, S, vdim)), key_padding_mask)``."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(
                    f"`{name}` is a nested tensor; SAMultiheadAttention needs padded tensors. If it sits in an "
                    "nn.TransformerEncoder, call sasoftmax.nn.convert(model) (it turns off use_nested_tensor)."
                )
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "`query`, `key`, `value` must all be 3-d (batched) or all 2-d (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError(
                        f"`key_padding_mask` for unbatched input must be 1-d (S,), got {tuple(key_padding_mask.shape)}"
                    )
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, _, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim:
            raise ValueError(f"`query` embedding size {E} does not match embed_dim={self.embed_dim}")
        if key.shape[0] != B or value.shape[0] != B or value.shape[1] != S:
            raise ValueError(
                f"batch/sequence sizes of `query` {tuple(query.shape)}, `key` {tuple(key.shape)} and `value` "
                f"{tuple(value.shape)} (as (batch, seq, feature)) do not fit together"
            )
        return batched, (query, key, value), key_padding_mask

    def _heads(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, add: Tensor | None):
        """Projected ``(B, L|S, E)`` -> ``(B, H, L|S, head_dim)``, with the extra ``bias_k``/``bias_v`` and
        zero-attention keys appended (and visible in both masks)."""
        B, E, H, hd = q.shape[0], self.embed_dim, self.num_heads, self.head_dim
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, E).expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, E).expand(B, 1, E)], dim=1)
            keep, add = _extend_key(keep), _extend_key(add)
        elif self.bias_k is not None or self.bias_v is not None:
            raise ValueError("`bias_k` and `bias_v` must be both set or both None")
        q = q.reshape(B, q.shape[1], H, hd).transpose(1, 2)
        k = k.reshape(B, k.shape[1], H, hd).transpose(1, 2)
        v = v.reshape(B, v.shape[1], H, hd).transpose(1, 2)
        if self.add_zero_attn:
            zeros = q.new_zeros(B, H, 1, hd)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            keep, add = _extend_key(keep), _extend_key(add)
        return q, k, v, keep, add

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """The normalizer's attention ``(B, H, L, head_dim)`` and, with ``need_weights``, its weights (materialized)."""
        entry = get_normalizer(self.normalizer)
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            return entry.fn(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p, module=self), None
        if entry.weights is None:
            raise ValueError(f"normalizer {entry.name!r} has no materialized weights; call with need_weights=False")
        out, weights = materialized_attention(entry.weights, q, k, v, attn_mask=mask, is_causal=causal,
                                              dropout_p=dropout_p, module=self, return_weights=True)
        return out, weights.to(q.dtype)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one product, as torch does
                q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
                return q, k, v
            wq, wk, wv = w[:E], w[E : 2 * E], w[2 * E :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        for name, x, w_ in (("key", key, wk), ("value", value, wv)):
            if x.shape[-1] != w_.shape[1]:
                raise ValueError(f"`{name}` feature size {x.shape[-1]} does not match the module's ({w_.shape[1]})")
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _masks(
        self, key_padding_mask: Tensor | None, attn_mask: Tensor | None, B: int, L: int, S: int, dtype: torch.dtype
    ) -> tuple[Tensor | None, Tensor | None]:
        """Both masks as ``keep`` (bool, True = attend) and ``add`` (float), each ``(B or 1, H or 1, L or 1, S)``."""
        keep: Tensor | None = None
        add: Tensor | None = None
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"`attn_mask` must be a tensor or None, got {type(attn_mask).__name__}")
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S):
                    raise ValueError(f"2-d `attn_mask` must have shape (L, S)={(L, S)}, got {tuple(attn_mask.shape)}")
                m = attn_mask[None, None]
            elif attn_mask.dim() == 3:
                want = (B * self.num_heads, L, S)
                if tuple(attn_mask.shape) != want:
                    raise ValueError(
                        f"3-d `attn_mask` must have shape (B * num_heads, L, S)={want}, got {tuple(attn_mask.shape)}"
                    )
                m = attn_mask.reshape(B, self.num_heads, L, S)
            else:
                raise ValueError(
                    f"`attn_mask` must be 2-d (L, S) or 3-d (B * num_heads, L, S), got {attn_mask.dim()}-d"
                )
            keep, add = _split_mask(m, "attn_mask", dtype)
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor):
                raise TypeError(f"`key_padding_mask` must be a tensor or None, got {type(key_padding_mask).__name__}")
            if tuple(key_padding_mask.shape) != (B, S):
                raise ValueError(
                    f"`key_padding_mask` must have shape (B, S)={(B, S)}, got {tuple(key_padding_mask.shape)}"
                )
            k2, a2 = _split_mask(key_padding_mask[:, None, None, :], "key_padding_mask", dtype)
            keep = k2 if keep is None else (keep if k2 is None else keep & k2)
            add = a2 if add is None else (add if a2 is None else add + a2)
        return keep, add


def _split_mask(m: Tensor, name: str, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """nn.MultiheadAttention convention -> (keep: True = attend, additive float part)."""
    if m.dtype == torch.bool:
        return ~m, None
    if not m.is_floating_point():
        raise TypeError(f"`{name}` must be bool (True = blocked) or floating point (additive), got {m.dtype}")
    return None, m.to(dtype)


def _extend_key(m: Tensor | None) -> Tensor | None:
    """Append one always-visible key column (for bias_k/bias_v and add_zero_attn)."""
    if m is None:
        return None
    if m.dtype == torch.bool:
        return F.pad(m, (0, 1), value=True)
    return F.pad(m, (0, 1), value=0.0)


def convert(model: nn.Module, *, normalize: bool = True, detach_range: bool = False,
            normalizer: str | None = None) -> nn.Module:
    """Make every ``nn.MultiheadAttention`` in ``model`` (the model itself included) use SA-Softmax, in place.

    Each module's class becomes :class:`SAMultiheadAttention`; its parameters stay the same objects (same values,
    same state_dict keys, optimizers keep working). Existing :class:`SAMultiheadAttention` modules get the new
    ``normalize``/``detach_range``/``normalizer`` (a registry name, as in :class:`SAMultiheadAttention`).
    Subclasses of ``nn.MultiheadAttention`` with their own ``forward`` are not touched (their forward would be lost):
    a ``TypeError`` names them.

    Fast paths that bypass ``self_attn.forward`` are switched off: ``activation_relu_or_gelu`` is set to 0 on each
    ``nn.TransformerEncoderLayer`` holding a converted module (its fused kernel runs only when that flag is set; its
    slow path still calls ``self.activation``), and ``use_nested_tensor`` is set to False on each
    ``nn.TransformerEncoder``. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    for name, mod in model.named_modules():
        if isinstance(mod, SAMultiheadAttention):
            mod._setup_sa(normalize=normalize, detach_range=detach_range, eps=mod.eps, backend=mod.backend,
                          normalizer=normalizer)
        elif type(mod) is nn.MultiheadAttention:
            mod.__class__ = SAMultiheadAttention
            cast(SAMultiheadAttention, mod)._setup_sa(normalize=normalize, detach_range=detach_range, eps=DEFAULT_EPS,
                                                      backend="auto",
                          normalizer=normalizer)
        elif isinstance(mod, nn.MultiheadAttention):
            raise TypeError(
                f"module {name or '<root>'} is a subclass of nn.MultiheadAttention ({type(mod).__name__}) with its "
                "own behaviour; convert it by hand (SAMultiheadAttention.from_torch)"
            )
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and isinstance(mod.self_attn, SAMultiheadAttention):
            mod.activation_relu_or_gelu = 0
        if isinstance(mod, nn.TransformerEncoder):
            if any(isinstance(m, SAMultiheadAttention) for m in mod.modules()):
                mod.use_nested_tensor = False
    return model
