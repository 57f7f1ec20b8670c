"""SA-Softmax attention: the public entry point and its backends (reference, chunked, cpp, triton).

* :mod:`.api`: ``sa_attention`` / ``sa_attention_with_weights`` and backend selection;
* :mod:`.inputs`: validation and the one canonical form of a call (masks, causality, biases, GQA) and its helpers;
* :mod:`.materialized`: the materialized engine (reference backend, peers, diagnostics);
* :mod:`.chunked`: the memory-efficient CPU/GPU backend; :mod:`.cpp_backend`: the fused CPU kernel (``csrc/``,
  built on first use); :mod:`.triton_backend`: the fused GPU kernel;
* :mod:`.ops`: the ``sasoftmax::attention_fwd``/``attention_bwd`` custom ops behind ``chunked`` and ``cpp``
  (``torch.compile`` traces them without a graph break);
* :mod:`.dropout`: the counter-based dropout mask every backend shares.
"""

from .api import BACKENDS, available_backends, sa_attention, sa_attention_with_weights
from .inputs import AttentionInputs, prepare

__all__ = ["sa_attention", "sa_attention_with_weights", "available_backends", "BACKENDS", "AttentionInputs", "prepare"]
