"""The project's GPT as a Hugging Face ``transformers`` model: ``AutoModelForCausalLM``, ``generate()``, lm-eval.

:class:`SAGPTConfig` (``model_type = "sasoftmax_gpt"``) holds the fields of :class:`sasoftmax.lm.model.GPTConfig`;
:class:`SAGPTForCausalLM` wraps a :class:`sasoftmax.lm.model.GPT` (``model.transformer``, the same parameters and
state-dict keys under the prefix ``transformer.``), so its logits are the project model's own. ``generate()`` runs
through the model's KV cache (transformers' ``DynamicCache``); every positional encoding (RoPE rotation offsets,
ALiBi/Kerple/FIRE biases for a query at position t over keys 0..t) is computed for the cached positions.

``attention_mask`` is a key-padding mask: padding tokens are never attended to. Positions count from the first token
of the row, padding included; RoPE, ALiBi and Kerple depend only on distances between tokens, so left padding does
not change their outputs; FIRE's threshold reads the absolute position of the query.

:func:`register` registers both classes with the Auto classes (an explicit call; importing this module registers
nothing). Exported directories also carry a small modeling file that imports this module, so
``trust_remote_code=True`` loads them the Hub way when sasoftmax is installed, without the call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...positional import PositionalEncoding
from ..model import GPT
from .config import MODEL_TYPE, SAGPTConfig, register_config

__all__ = ["MODEL_TYPE", "SAGPTConfig", "SAGPTForCausalLM", "register"]

# the name of the cache in transformers' outputs: `cache` in recent releases, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

class _Cache:
    """transformers' cache object seen through :class:`sasoftmax.lm.model.KVCache`'s interface."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.length = cache.get_seq_length()

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k, v, layer)


class SAGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """A sasoftmax GPT for transformers: ``forward(input_ids, attention_mask=None, past_key_values=None,
    use_cache=None, labels=None) -> CausalLMOutputWithPast`` (labels are the input ids; the loss is on the shifted
    targets, as transformers' causal LMs do)."""

    config_class = SAGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = {"transformer.lm_head.weight": "transformer.wte.weight"}
    _supports_cache_class = True

    def __init__(self, config: SAGPTConfig) -> None:
        super().__init__(config)
        if not config.tie_embeddings:
            self._tied_weights_keys = {}
        self.transformer = GPT(config.gpt_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The GPT initializes its parameters itself (``GPT.reset_parameters``) and loading overwrites them; the
        positional encodings' unsaved buffers are recomputed (a model built on the meta device has none)."""
        if isinstance(module, PositionalEncoding):
            module.reset_buffers()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        if not isinstance(value, torch.nn.Embedding):
            raise TypeError(f"`value` must be a torch.nn.Embedding, got {type(value).__name__}")
        self.transformer.wte = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.transformer.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: Any = None,
                use_cache: bool | None = None, labels: Tensor | None = None, past_key_values: Any = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier releases): a transformers cache."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hf_cache = cache if cache is not None else past_key_values
        if use_cache and hf_cache is None:
            from transformers import DynamicCache

            hf_cache = DynamicCache(config=self.config)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
        logits, _ = self.transformer(input_ids, cache=_Cache(hf_cache) if use_cache else None, key_mask=key_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: hf_cache if use_cache else None})


def register() -> None:
    """Register :class:`SAGPTConfig` / :class:`SAGPTForCausalLM` with ``AutoConfig`` / ``AutoModelForCausalLM``
    (idempotent)."""
    register_config()
    AutoModelForCausalLM.register(SAGPTConfig, SAGPTForCausalLM, exist_ok=True)
