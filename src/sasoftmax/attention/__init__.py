"""SA-Softmax attention: the public entry point and its backends (reference, chunked, triton)."""

from .api import BACKENDS, available_backends, sa_attention, sa_attention_with_weights
from .inputs import AttentionInputs, prepare

__all__ = ["sa_attention", "sa_attention_with_weights", "available_backends", "BACKENDS", "AttentionInputs", "prepare"]
