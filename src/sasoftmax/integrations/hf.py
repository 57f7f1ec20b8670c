"""SA-Softmax as a Hugging Face ``transformers`` attention implementation.

After :func:`register` (idempotent), any model whose attention dispatches through ``transformers.AttentionInterface``
(Llama, Qwen2, Mistral, GPT-2 and most decoder models of transformers 5.x) can run SA-Softmax attention::

    import sasoftmax.integrations.hf as sa_hf

    sa_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sa_softmax")      # or from_pretrained
    model.set_attn_implementation("sa_softmax_plain")                                      # switch later
    sa_hf.convert_model(model)                                                              # register + switch

Names:

* ``"sa_softmax"``: the paper's normalized form (``normalize=True``);
* ``"sa_softmax_plain"``: ``x * softmax(x)`` (``normalize=False``);
* :func:`register_variant` adds more (e.g. ``detach_range=True`` or a fixed backend);
* :func:`register_from_registry` exposes any entry of :mod:`sasoftmax.normalizers` without learnable parameters
  (the peers ``softmax_plus_one``, ``sigmoid``, ``softpick``, ``stablemax``, ...) under its registry name.

Each name is registered together with transformers' SDPA mask builder, so the attention function receives a bool
mask ``(B, 1, Tq, Tk)`` (True = attend) carrying padding, causality and sliding windows, or ``None`` when the mask is
purely causal (then causality is applied here). Without that builder a custom name would receive no mask at all.

Swapping the normalizer of a softmax-pretrained checkpoint changes what the model computes; see
``docs/integrations.md`` for the fine-tuning path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..attention import sa_attention, sa_attention_varlen, sa_attention_with_weights
from ..attention.inputs import MASKED_FLOAT_THRESHOLD
from ..functional import DEFAULT_EPS

__all__ = [
    "NORMALIZED",
    "PLAIN",
    "register",
    "register_variant",
    "register_from_registry",
    "registered_names",
    "convert_model",
    "sa_attention_forward",
    "sa_softmax_attention_forward",
    "sa_softmax_plain_attention_forward",
    "normalizer_attention_forward",
    "prepare_call",
    "HFCall",
]

NORMALIZED = "sa_softmax"
PLAIN = "sa_softmax_plain"

_INSTALL_HINT = "pip install 'sasoftmax[hf]'"
# Names transformers already uses; a variant must not shadow them.
_RESERVED = {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"}
AttentionForward = Callable[..., tuple[Tensor, "Tensor | None"]]
_registered: dict[str, AttentionForward] = {}


def _import_transformers() -> tuple[Any, Any, Callable[..., Any]]:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as err:
        raise ImportError(
            f"sasoftmax.integrations.hf needs `transformers` (>= 4.53) with AttentionInterface and "
            f"AttentionMaskInterface: {_INSTALL_HINT} ({err})"
        ) from err
    # The exact builder `sdpa` itself uses (older releases picked one of two by torch version).
    return AttentionInterface, AttentionMaskInterface, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


def _weights_requested(kwargs: dict[str, Any]) -> bool:
    """Whether the caller wants attention weights back.

    transformers 5.x collects ``output_attentions`` with forward hooks on the attention modules: Llama-style modules
    forward ``output_attentions`` in ``kwargs``, GPT-2 consumes it, but in every case the active output collector
    holds an ``"attentions"`` entry while weights are being collected."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers: output_attentions always travels in kwargs
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def derive_scaling(module: torch.nn.Module, query: Tensor) -> float:
    """Score scale for a caller that passed ``scaling=None``.

    ``module.scaling`` when the module defines one; otherwise GPT-2's options (on the module or its config):
    ``1/sqrt(head_dim)`` if ``scale_attn_weights`` (default True) else 1, divided by ``layer_idx + 1`` if
    ``scale_attn_by_inverse_layer_idx``."""
    s = getattr(module, "scaling", None)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    config = getattr(module, "config", None)

    def option(name: str, default: Any) -> Any:
        if hasattr(module, name):
            return getattr(module, name)
        return getattr(config, name, default) if config is not None else default

    scale = 1.0 / math.sqrt(query.shape[-1]) if option("scale_attn_weights", True) else 1.0
    if option("scale_attn_by_inverse_layer_idx", False):
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError(
                f"{type(module).__name__}: scale_attn_by_inverse_layer_idx is set but the module has no `layer_idx`"
            )
        scale /= float(layer_idx + 1)
    return scale


class HFCall(NamedTuple):
    """A transformers attention call in the form ``sa_attention`` takes (see :func:`prepare_call`)."""

    query: Tensor  # (B, Hq, Tq, D)
    key: Tensor  # (B, Hkv, Tk, D)
    value: Tensor  # (B, Hkv, Tk, Dv)
    attention_mask: Tensor | None  # bool (True = attend) or additive float, (B, 1, Tq, Tk); None: see is_causal
    is_causal: bool
    scale: float
    bias: Tensor | None  # an additive position bias (T5-style models pass `position_bias`)
    dropout_p: float
    with_weights: bool  # the caller collects attention weights
    softcap: float | None  # logit soft-capping (Gemma 2's `softcap`)
    window: tuple[int, int] | None  # `sliding_window` kwarg without a mask: (sliding_window - 1, -1)
    documents: Documents | None  # padding-free batch: one row of packed documents


class Documents(NamedTuple):
    """The packed documents of a padding-free batch (FlashAttention's varlen arguments)."""

    cu_seqlens_q: Tensor  # int32 (n_docs + 1,)
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def packed_documents(query: Tensor, key: Tensor, attention_mask: Tensor | None,
                     kwargs: dict[str, Any]) -> Documents | None:
    """The documents of a padding-free call, as transformers' flash-attention path finds them: the
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``),
    else, with no attention mask, ``position_ids`` of one row that restart (each restart at the row's smallest
    position id begins a document). None for an ordinary batch."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError("padding-free attention needs both `cu_seq_lens_q` and `cu_seq_lens_k`")
        lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        docs = Documents(cu_q.to(torch.int32), cu_k.to(torch.int32),
                         int(lengths_q.max()) if max_q is None else int(max_q),
                         int(lengths_k.max()) if max_k is None else int(max_k))
    else:
        pos = kwargs.get("position_ids")
        if (attention_mask is not None or not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[0] != 1
                or pos.shape[1] < 2 or pos.shape[1] != query.shape[2] or query.shape[2] != key.shape[2]):
            return None
        flat = pos.reshape(-1)
        if bool((flat.diff() == 1).all()):  # one document: an ordinary causal row
            return None
        starts = (flat == flat.min()).nonzero().view(-1).to(torch.int32)
        cu = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
        longest = int(cu.diff().max())
        docs = Documents(cu, cu, longest, longest)
    if query.shape[0] != 1:
        raise ValueError(f"padding-free attention (`cu_seq_lens_q/k`) needs a batch of one packed row, got batch "
                         f"{query.shape[0]}")
    if attention_mask is not None and not _only_causal_window(attention_mask, kwargs.get("sliding_window")):
        raise ValueError("padding-free attention (`cu_seq_lens_q/k`) got an attention mask that hides more than "
                         "causality and the sliding window (padding?); a packed row has no padding: the documents "
                         "are the mask")
    return docs


def _only_causal_window(mask: Tensor, sliding_window: int | None) -> bool:
    """Whether ``mask`` (bool True = attend, or additive) is exactly the causal (and sliding-window) mask of its row:
    such a mask, built by transformers over the whole packed row, agrees with the documents' own causal window
    inside each document, so the documents say everything it says."""
    keep = mask if mask.dtype == torch.bool else mask > MASKED_FLOAT_THRESHOLD
    tq, tk = keep.shape[-2], keep.shape[-1]
    behind = torch.arange(tq, device=keep.device)[:, None] + (tk - tq) - torch.arange(tk, device=keep.device)
    want = behind >= 0
    if sliding_window is not None:
        want &= behind < int(sliding_window)
    return bool((keep == want).all())


def prepare_call(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> HFCall:
    """What every attention function of this module does with transformers' arguments: reject unsupported options,
    derive the scale, resolve causality for a ``None`` mask, follow autocast, trim masks built for a longer cache."""
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("sasoftmax attention functions do not support attention sinks (`s_aux`); use `eager`")
    scale = derive_scaling(module, query) if scaling is None else scaling
    documents = packed_documents(query, key, attention_mask, kwargs)
    # A sliding window travels in transformers' mask when there is one (whatever the cache layout); without a mask
    # (padding-free documents, or a causal row the builder left to us) it is applied here, in positions.
    sliding = kwargs.get("sliding_window") if attention_mask is None or documents is not None else None
    window = None if sliding is None else (int(sliding) - 1, -1)
    if documents is not None:
        attention_mask = None  # (checked by packed_documents: it says nothing the documents do not)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    position_bias = kwargs.get("position_bias")
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        # SDPA is on autocast's lower-precision list; do what it does. (Llama-style RoPE under autocast hands over
        # float32 q/k with a bfloat16 v.)
        dt = torch.get_autocast_dtype(dev)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    tq, tk = query.shape[2], key.shape[2]
    causal = False
    if documents is not None:
        causal = bool(is_causal)
    elif attention_mask is None:
        if is_causal and tq > 1:
            causal = True
            if tk > tq:
                # transformers' SDPA mask builder leaves out a causal mask with more keys than queries only when the
                # queries start at position 0 (prefill into an empty static cache): the keys past `tq` are unwritten
                # slots. Keep the first `tq` keys, exactly as transformers' sdpa integration does.
                key, value = key[:, :, :tq], value[:, :, :tq]
                if position_bias is not None:
                    position_bias = position_bias[..., :tq]
    elif attention_mask.shape[-1] > tk:  # builders may size the mask for a longer (static) cache
        attention_mask = attention_mask[..., :tk]
    softcap = kwargs.get("softcap")
    return HFCall(query, key, value, attention_mask, causal, float(scale), position_bias, float(dropout),
                  _weights_requested(kwargs), None if softcap is None else float(softcap), window, documents)


def _peer_options(call: HFCall) -> dict[str, Any]:
    return dict(is_causal=call.is_causal, scale=call.scale, bias=call.bias, dropout_p=call.dropout_p)


def _options(call: HFCall) -> dict[str, Any]:
    return dict(_peer_options(call), window=call.window, softcap=call.softcap)


def _varlen(call: HFCall, **options: Any) -> Tensor:
    """A padding-free call through :func:`sasoftmax.sa_attention_varlen`, in transformers' ``(1, T, Hq, Dv)``."""
    if call.bias is not None:
        raise ValueError("padding-free attention does not take a `position_bias`")
    docs = call.documents
    assert docs is not None
    q, k, v = (t[0].transpose(0, 1) for t in (call.query, call.key, call.value))  # (T, H, D)
    out = sa_attention_varlen(q, k, v, docs.cu_seqlens_q, docs.cu_seqlens_k, docs.max_seqlen_q, docs.max_seqlen_k,
                              is_causal=call.is_causal, scale=call.scale, window=call.window, softcap=call.softcap,
                              dropout_p=call.dropout_p, **options)
    return out.to(call.query.dtype)[None]


def _hf_layout(out: Tensor, call: HFCall) -> Tensor:
    """``(B, Hq, Tq, D)`` -> transformers' ``(B, Tq, Hq, D)`` in the query's dtype."""
    return out.to(call.query.dtype).transpose(1, 2).contiguous()


def sa_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                         normalize: bool = True, detach_range: bool = False, eps: float = DEFAULT_EPS,
                         backend: str = "auto", **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """SA-Softmax attention as a transformers attention function.

    query ``(B, Hq, Tq, D)``, key/value ``(B, Hkv, Tk, D)`` (grouped-query heads not repeated), attention_mask bool
    ``(B, 1, Tq, Tk)`` (True = attend), an additive float mask (``finfo.min`` = masked) or None (purely causal when
    ``module.is_causal`` and Tq > 1). Returns ``(output (B, Tq, Hq, D), weights (B, Hq, Tq, Tk) or None)``; weights
    only when attention outputs are requested."""
    call = prepare_call(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if call.documents is not None and not call.with_weights:
        out = _varlen(call, normalize=normalize, detach_range=detach_range, eps=eps, backend=backend)
        return out, None
    if call.with_weights:
        if call.documents is not None:
            raise ValueError("attention weights of a padding-free batch are not available; pass a padded batch")
        out, weights = sa_attention_with_weights(call.query, call.key, call.value, call.attention_mask,
                                                 normalize=normalize, detach_range=detach_range, eps=eps,
                                                 **_options(call))
        return _hf_layout(out, call), weights
    out = sa_attention(call.query, call.key, call.value, call.attention_mask, normalize=normalize,
                       detach_range=detach_range, eps=eps, backend=backend, **_options(call))
    return _hf_layout(out, call), None


def sa_softmax_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                                 **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """``"sa_softmax"``: the paper's normalized form (:func:`sa_attention_forward` with ``normalize=True``)."""
    return sa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, normalize=True, **kwargs)


def sa_softmax_plain_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                       attention_mask: Tensor | None, dropout: float = 0.0,
                                       scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """``"sa_softmax_plain"``: ``x * softmax(x)`` (:func:`sa_attention_forward` with ``normalize=False``)."""
    return sa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, normalize=False,
                                **kwargs)


def normalizer_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None, *,
                                 normalizer: str, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """A :mod:`sasoftmax.normalizers` entry as a transformers attention function (arguments and returns as
    :func:`sa_attention_forward`); weights from its materialized ``weights`` when requested."""
    from ..normalizers import get_normalizer, materialized_attention

    entry = get_normalizer(normalizer)
    call = prepare_call(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    unsupported = [name for name, value in (("padding-free documents (`cu_seq_lens_q/k`)", call.documents),
                                            ("`softcap`", call.softcap), ("`sliding_window`", call.window))
                   if value is not None]
    if unsupported:
        raise ValueError(f"normalizer {normalizer!r} attention does not support {', '.join(unsupported)}; the SA "
                         "names (sa_softmax, sa_softmax_plain) do")
    if call.with_weights:
        if entry.weights is None:
            raise ValueError(f"normalizer {normalizer!r} has no materialized `weights`: it cannot return weights")
        out, weights = materialized_attention(entry.weights, call.query, call.key, call.value,
                                              attn_mask=call.attention_mask, return_weights=True, **_peer_options(call))
        return _hf_layout(out, call), weights.to(call.query.dtype)
    out = entry.fn(call.query, call.key, call.value, attn_mask=call.attention_mask, alibi_slopes=None, module=None,
                   **_peer_options(call))
    return _hf_layout(out, call), None


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or "|" in name or ":" in name:
        raise ValueError(f"`name` must be a non-empty string without '/', '|' or ':' , got {name!r}")
    if name in _RESERVED:
        raise ValueError(f"`name`={name!r} is a built-in transformers attention implementation; choose another")


def _install(name: str, fn: AttentionForward) -> None:
    attention_interface, mask_interface, sdpa_mask = _import_transformers()
    attention_interface.register(name, fn)
    mask_interface.register(name, sdpa_mask)
    _registered[name] = fn


def register() -> None:
    """Register ``"sa_softmax"`` and ``"sa_softmax_plain"`` with transformers (attention function and mask builder).

    Idempotent. Raises ``ImportError`` with the install hint when transformers is missing."""
    _install(NORMALIZED, sa_softmax_attention_forward)
    _install(PLAIN, sa_softmax_plain_attention_forward)


def register_variant(
    name: str,
    *,
    normalize: bool = True,
    detach_range: bool = False,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> str:
    """Register one more SA attention implementation under ``name`` (e.g. ``"sa_softmax_detached"`` with
    ``detach_range=True``, or a fixed ``backend``). Returns ``name``. Re-registering a name replaces it."""
    _check_name(name)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"`eps` must be a number >= 0, got {eps!r}")
    from ..attention import available_backends

    if backend not in available_backends():
        raise ValueError(f"unknown `backend`={backend!r}; expected one of {available_backends()}")
    _install(name, functools.partial(sa_attention_forward, normalize=bool(normalize), detach_range=bool(detach_range),
                                     eps=float(eps), backend=backend))
    return name


def register_from_registry(normalizer: str, name: str | None = None) -> str:
    """Register the :mod:`sasoftmax.normalizers` entry ``normalizer`` with transformers under ``name`` (default: the
    normalizer's own name), with the SDPA mask builder; returns the name.

    Entries with learnable parameters (``ssmax``) are refused: a transformers attention module has nowhere to keep
    them. Peers run through their materialized weights (O(T^2) memory); attention weights are returned when
    requested. ``ValueError`` for an unknown normalizer or a reserved name."""
    from ..normalizers import get_normalizer

    entry = get_normalizer(normalizer)
    if entry.needs_params:
        raise ValueError(
            f"normalizer {normalizer!r} has learnable parameters (created by its init_params on sasoftmax's own "
            "attention modules); it cannot be used as a transformers attention implementation"
        )
    if entry.weights is None:
        raise ValueError(f"normalizer {normalizer!r} has no materialized `weights` function")
    name = normalizer if name is None else name
    _check_name(name)
    _install(name, functools.partial(normalizer_attention_forward, normalizer=normalizer))
    return name


def registered_names() -> list[str]:
    """Names registered by this module in this process."""
    return list(_registered)


def convert_model(model: Any, normalizer: str = NORMALIZED) -> Any:
    """Register (if needed) and switch ``model`` (a ``transformers.PreTrainedModel``) to ``normalizer`` in place
    via ``model.set_attn_implementation``; returns the model.

    This changes what a softmax-pretrained model computes: fine-tune it afterwards (see docs/integrations.md)."""
    register()
    if normalizer not in _registered:
        raise ValueError(
            f"`normalizer`={normalizer!r} is not a registered attention implementation; expected one of "
            f"{registered_names()} (add more with register_variant or register_from_registry)"
        )
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}")
    model.set_attn_implementation(normalizer)
    return model
