"""SA-Softmax attention in existing model code: :mod:`.hf` (transformers, optional dependency) and :mod:`.nn`
(``torch.nn.MultiheadAttention``; also :mod:`sasoftmax.nn`). Nothing is imported eagerly."""

__all__: list[str] = []
