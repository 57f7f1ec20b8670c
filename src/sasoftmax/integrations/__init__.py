"""Integrations of SA-Softmax attention into existing model code.

* :mod:`sasoftmax.integrations.hf`: Hugging Face ``transformers`` attention implementations ``"sa_softmax"`` and
  ``"sa_softmax_plain"`` (optional dependency, ``pip install 'sasoftmax[hf]'``).
* :mod:`sasoftmax.integrations.nn` (short path :mod:`sasoftmax.nn`; no extra dependency): a drop-in for
  ``torch.nn.MultiheadAttention`` and ``convert()`` for models built from it.

Nothing is imported here eagerly, so ``import sasoftmax.integrations`` never needs ``transformers``.
"""

__all__: list[str] = []
