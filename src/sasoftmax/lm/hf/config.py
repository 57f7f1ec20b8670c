"""The configuration of the project's GPT in transformers' form (light: no model code of transformers needed)."""

from __future__ import annotations

import importlib
from typing import Any

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig

from ..model import GPTConfig

__all__ = ["MODEL_TYPE", "SAGPTConfig", "register_config"]

MODEL_TYPE = "sasoftmax_gpt"
_GPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "bias",
               "normalizer", "positional", "attn_backend", "tie_embeddings", "qk_norm", "qk_norm_type")


class SAGPTConfig(PreTrainedConfig):
    """A :class:`sasoftmax.lm.model.GPTConfig` in transformers' form, plus ``sasoftmax_imports``: modules to import
    before the model is built (those that registered a custom normalizer or positional encoding)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 50304, block_size: int = 512, n_layer: int = 12, n_head: int = 12,
                 n_kv_head: int | None = None, n_embd: int = 768, dropout: float = 0.0, bias: bool = False,
                 normalizer: str = "softmax", positional: str = "rope", attn_backend: str = "auto",
                 tie_embeddings: bool = True, qk_norm: bool = False, qk_norm_type: str = "layernorm",
                 sasoftmax_imports: list[str] | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        self.vocab_size, self.block_size, self.n_layer, self.n_head = vocab_size, block_size, n_layer, n_head
        self.n_kv_head, self.n_embd, self.dropout, self.bias = n_kv_head, n_embd, dropout, bias
        self.normalizer, self.positional, self.attn_backend = normalizer, positional, attn_backend
        self.tie_embeddings, self.qk_norm, self.qk_norm_type = tie_embeddings, qk_norm, qk_norm_type
        self.sasoftmax_imports = list(sasoftmax_imports or [])
        self.use_cache = use_cache
        # transformers' generic names for the same things
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = n_embd, n_layer, n_head
        self.num_key_value_heads = n_head if n_kv_head is None else n_kv_head
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)

    @classmethod
    def from_gpt(cls, gcfg: GPTConfig, **kwargs: Any) -> SAGPTConfig:
        return cls(**{f: getattr(gcfg, f) for f in _GPT_FIELDS}, **kwargs)

    def gpt_config(self) -> GPTConfig:
        """The project's config (validated; ``ValueError`` names a field the registries do not know)."""
        for module in self.sasoftmax_imports:
            importlib.import_module(module)
        gcfg = GPTConfig(**{f: getattr(self, f) for f in _GPT_FIELDS})
        try:
            gcfg.validate()
        except ValueError as err:
            hint = (" (the model was exported with `sasoftmax_imports` = "
                    f"{self.sasoftmax_imports})" if self.sasoftmax_imports else
                    "; import the module that registers it first")
            raise ValueError(f"{err}{hint}") from err
        return gcfg


def register_config() -> None:
    """Register :class:`SAGPTConfig` with ``AutoConfig`` (idempotent)."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, SAGPTConfig, exist_ok=True)
