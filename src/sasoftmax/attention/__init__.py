"""SA-Softmax attention: the public entry point and its backends.

* :mod:`.api`: ``sa_attention`` / ``sa_attention_with_weights``;
* :mod:`.inputs`: validation and the one canonical form of a call (masks, causality, biases, GQA) and its helpers;
* :mod:`.backends`: the registry and the backends (reference, chunked, cpp, triton);
* :mod:`.materialized`: the materialized engine (reference backend, peers, diagnostics);
* :mod:`.op`: the custom ops of the memory-efficient backends; :mod:`.dropout`: the counter-based dropout mask.
"""

from .api import available_backends, sa_attention, sa_attention_with_weights
from .inputs import AttentionInputs, prepare

__all__ = ["sa_attention", "sa_attention_with_weights", "available_backends", "AttentionInputs", "prepare"]
