"""SA-Softmax attention in existing model code: :mod:`.torch` (any code calling ``F.scaled_dot_product_attention``:
``sdpa_override``, ``patch``), :mod:`.nn` (``torch.nn.MultiheadAttention``; also :mod:`sasoftmax.nn`), :mod:`.hf`
(transformers) and :mod:`.torchtitan` (optional dependencies, imported only when named)."""

__all__: list[str] = []
