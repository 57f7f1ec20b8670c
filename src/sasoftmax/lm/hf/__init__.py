"""The project's GPT as a Hugging Face ``transformers`` model (models out; attention *into* transformers models is
:mod:`sasoftmax.integrations.hf`).

* :mod:`.config`: :class:`SAGPTConfig` (``model_type = "sasoftmax_gpt"``), light: no model code of transformers;
* :mod:`.modeling`: :class:`SAGPTForCausalLM` (``generate()``, the KV cache, lm-eval).

Nothing is registered on import. :func:`register` registers both with ``AutoConfig`` / ``AutoModelForCausalLM``, so
that an exported directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)``; without it,
``from_pretrained(DIR, trust_remote_code=True)`` loads it through the small modeling file the export writes.
"""

from .config import MODEL_TYPE, SAGPTConfig
from .modeling import SAGPTForCausalLM, register

__all__ = ["MODEL_TYPE", "SAGPTConfig", "SAGPTForCausalLM", "register"]
