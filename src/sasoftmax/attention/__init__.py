"""SA-Softmax attention: the public entry points (:mod:`.api`), the one canonical form of a call (:mod:`.inputs`) and
the backends (:mod:`.backends`). The module map is in ``docs/architecture.md``."""

from .api import available_backends, sa_attention, sa_attention_with_weights
from .inputs import AttentionInputs, prepare
from .paged import paged_history, paged_store, sa_paged_decode
from .varlen import sa_attention_varlen

__all__ = ["sa_attention", "sa_attention_with_weights", "sa_attention_varlen", "sa_paged_decode", "paged_store",
           "paged_history",
           "available_backends", "AttentionInputs", "prepare"]
