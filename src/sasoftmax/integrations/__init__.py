"""SA-Softmax attention in existing model code: :mod:`.torch` (any code calling ``F.scaled_dot_product_attention``:
``sdpa_override``, ``patch``), :mod:`.nn` (``torch.nn.MultiheadAttention``; also :mod:`sasoftmax.nn`), and, each
needing its optional package and imported only when named, :mod:`.hf` (transformers), :mod:`.torchtitan` and
:mod:`.vllm` (serving: a vLLM plugin)."""

__all__: list[str] = []
