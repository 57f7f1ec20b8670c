"""SA-Softmax as a torchtitan inner attention (torchtitan 0.3; optional dependency).

torchtitan's language models choose their inner attention by config (``FlexAttention``, ``VarlenAttention``) and
always train on packed documents. :class:`SAVarlenAttention` is a drop-in inner attention: its config subclasses
``VarlenAttention.Config``, so the model builds the same per-document metadata (``cu_seqlens`` from positions that
restart at 0) and each document attends only to itself, through :func:`sasoftmax.sa_attention_varlen`. Without
metadata (``attention_masks=None``) it is causal attention over the whole row.

The one-line switch is a model converter, as torchtitan's quantization and LoRA converters are::

    from torchtitan.models.llama3 import model_registry
    from sasoftmax.integrations.torchtitan import SAConverter

    model_spec = model_registry("debugmodel", attn_backend="varlen", converters=[SAConverter.Config()])

:class:`SAConverter` replaces every ``VarlenAttention`` and ``FlexAttention`` config of the model with
:class:`SAVarlenAttention` (Flex's standard causal + document mask is the same mask, built as varlen metadata). For
models that call SDPA directly (torchtitan's ``ScaledDotProductAttention``, e.g. Flux) use
:func:`sasoftmax.sdpa_override` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torchtitan.models.common.attention import FlexAttention, VarlenAttention, VarlenMetadata
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.module import Module

from ..attention import sa_attention, sa_attention_varlen
from ..attention.api import check_backend_name
from ..functional import DEFAULT_EPS

__all__ = ["SAVarlenAttention", "SAConverter"]


def _window_args(window_size: tuple[int, int]) -> tuple[bool, tuple[int, int] | None]:
    """torchtitan's ``window_size=(left, right)`` (``-1`` = unbounded) as ``(is_causal, window)``."""
    left, right = (int(x) for x in window_size)
    if right == 0 and left == -1:
        return True, None
    if left == -1 and right == -1:
        return False, None
    return False, (left, right)


class SAVarlenAttention(Module):
    """Inner attention computing SA-Softmax; ``forward(q_BLNH, k_BLNH, v_BLNH, *, attention_masks, scale,
    enable_gqa)`` as torchtitan's ``VarlenAttention``, returning ``(B, L, Nq, Hv)`` in the input dtype.

    ``attention_masks``: a ``VarlenMetadata`` (packed documents: the ``B * L`` tokens are split at ``cu_seq_q`` /
    ``cu_seq_k``) or None (one sequence per row). ``window_size`` as in ``VarlenAttention`` (default ``(-1, 0)``:
    causal). GQA (fewer key/value heads) is handled whether or not ``enable_gqa`` is passed."""

    @dataclass(kw_only=True, slots=True)
    class Config(VarlenAttention.Config):
        normalize: bool = True
        """True = the paper's normalized SA-Softmax, False = ``x * softmax(x)``."""
        detach_range: bool = False
        """Stop the gradient through the row min/max of the normalized form."""
        eps: float = DEFAULT_EPS
        """Denominator bias of the normalized form."""
        backend: str = "auto"
        """:func:`sasoftmax.sa_attention` backend."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        check_backend_name(config.backend)
        self.window_size = tuple(config.window_size)
        self.is_causal, self.window = _window_args(config.window_size)
        self.options: dict[str, Any] = {"normalize": config.normalize, "detach_range": config.detach_range,
                                        "eps": config.eps, "backend": config.backend}

    def forward(self, q_BLNH: Tensor, k_BLNH: Tensor, v_BLNH: Tensor, *, attention_masks: Any = None,
                scale: float | None = None, out_transform: Any = None, **kwargs: Any) -> Tensor:
        if out_transform is not None:
            raise ValueError("SAVarlenAttention: `out_transform` needs the log-sum-exp of softmax attention, which "
                             "SA-Softmax attention does not have")
        B, L, _, Dv = v_BLNH.shape
        if isinstance(attention_masks, VarlenMetadata):
            Dqk = q_BLNH.shape[-1]
            out = sa_attention_varlen(
                q_BLNH.reshape(B * L, -1, Dqk), k_BLNH.reshape(B * L, -1, Dqk), v_BLNH.reshape(B * L, -1, Dv),
                attention_masks.cu_seq_q, attention_masks.cu_seq_k, attention_masks.max_q, attention_masks.max_k,
                is_causal=self.is_causal, window=self.window, scale=scale, **self.options,
            )
            return out.view(B, L, -1, Dv)
        if attention_masks is not None:
            raise TypeError("SAVarlenAttention: `attention_masks` must be a VarlenMetadata or None, got "
                            f"{type(attention_masks).__name__} (build the model with SAVarlenAttention.Config so "
                            "that it creates varlen metadata)")
        out = sa_attention(q_BLNH.transpose(1, 2), k_BLNH.transpose(1, 2), v_BLNH.transpose(1, 2),
                           is_causal=self.is_causal, window=self.window, scale=scale, **self.options)
        return out.transpose(1, 2)


class SAConverter(ModelConfigConverter):
    """Model converter: every ``VarlenAttention`` / ``FlexAttention`` inner attention of the model config becomes
    :class:`SAVarlenAttention` with these options. A ``FlexAttention`` with non-default kernel options is refused
    (``ValueError``): the converter cannot tell which mask it was configured for."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        normalize: bool = True
        detach_range: bool = False
        eps: float = DEFAULT_EPS
        backend: str = "auto"

    def __init__(self, config: Config) -> None:
        check_backend_name(config.backend)
        self.config = config

    def convert(self, model_config: Module.Config) -> Module.Config:
        c = self.config
        found = list(model_config.traverse((VarlenAttention.Config, FlexAttention.Config)))
        if not found:
            raise ValueError("SAConverter: the model config has no VarlenAttention or FlexAttention inner attention "
                             "to replace")
        for fqn, cfg, parent, attr in found:
            if isinstance(cfg, SAVarlenAttention.Config):
                continue
            window: tuple[int, int] = (-1, 0)
            if isinstance(cfg, VarlenAttention.Config):
                window = tuple(cfg.window_size)
            elif cfg.kernel_options:
                raise ValueError(f"SAConverter: {fqn} is a FlexAttention with kernel_options "
                                 f"{cfg.kernel_options}; convert a model built with attn_backend='flex' defaults "
                                 "or 'varlen'")
            new = SAVarlenAttention.Config(window_size=window, normalize=c.normalize, detach_range=c.detach_range,
                                           eps=c.eps, backend=c.backend)
            if parent is None:
                return new
            if isinstance(parent, list):
                parent[attr] = new
            else:
                setattr(parent, attr, new)
        return model_config
