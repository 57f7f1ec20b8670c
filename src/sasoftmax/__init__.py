"""sasoftmax: Self-Adjust Softmax (arXiv 2502.18277) for PyTorch.

``sa_softmax`` is the function; ``sa_attention`` is attention with it, exact in value and gradient, with a
memory-efficient CPU/GPU path and fused kernels. ``docs/contract.md`` is the contract every backend meets.
``sdpa_override`` switches every ``F.scaled_dot_product_attention`` call in a block to SA attention.
"""

from .attention import available_backends, sa_attention, sa_attention_varlen, sa_attention_with_weights
from .functional import sa_softmax
from .integrations.torch import sdpa_override

__version__ = "0.1.0"

__all__ = ["sa_softmax", "sa_attention", "sa_attention_with_weights", "sa_attention_varlen", "available_backends",
           "sdpa_override", "__version__"]
