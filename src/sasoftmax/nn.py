"""``torch.nn`` building blocks with SA-Softmax (the short public path of :mod:`sasoftmax.integrations.nn`):
:class:`SAMultiheadAttention`, a drop-in for ``nn.MultiheadAttention``, and :func:`convert` for existing models."""

from .integrations.nn import SAMultiheadAttention, convert

__all__ = ["SAMultiheadAttention", "convert"]
