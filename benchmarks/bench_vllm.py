"""vLLM with the SA attention backend vs vLLM's own CPU (softmax) backend, on the same random tiny Llama.

Both engines live in one process and are timed alternately (A B A B ...), medians reported: prefill tokens/s
(prompts of --prompt-len tokens, one new token) and decode tokens/s (--decode-tokens new tokens after a short prompt,
the prefill time measured alone subtracted), at batch 1 and 8. Run it in the serving environment:

    bash scripts/setup.sh serve && .venv-serve/bin/python benchmarks/bench_vllm.py [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # two engines in one process


def _model(path: Path, sa: bool, args: argparse.Namespace) -> Path:
    import torch
    import transformers

    from sasoftmax.integrations.vllm import mark_sa

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=args.width, intermediate_size=4 * args.width,
                                   num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                                   num_key_value_heads=args.width // 64, max_position_embeddings=2048)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    if sa:
        mark_sa(path)
    return path


def _timed(llm, prompts, n_new: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256, help="hidden size (heads of 64)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args()

    from vllm import LLM

    from sasoftmax.utils import cpu_name, format_table, vector_isa

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    engines = {}
    for name, sa in (("softmax (CPU_ATTN)", False), ("sa_softmax (plugin)", True)):
        path = _model(tmp / name.split()[0], sa, args)
        engines[name] = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=2048,
                            enforce_eager=True, enable_prefix_caching=False, seed=0)
    rows = []
    for batch in (1, 8):
        long = [[(7 * i + j) % 4000 + 1 for j in range(args.prompt_len)] for i in range(batch)]
        short = [[(3 * i + j) % 4000 + 1 for j in range(16)] for i in range(batch)]
        times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "short": [], "decode": []} for n in engines}
        for r in range(args.repeats + 1):  # the first round warms up
            for name, llm in engines.items():
                pre, sh, dec = _timed(llm, long, 1), _timed(llm, short, 1), _timed(llm, short, args.decode_tokens)
                if r:
                    times[name]["prefill"].append(pre)
                    times[name]["short"].append(sh)
                    times[name]["decode"].append(dec)
        speed = {}
        for name, t in times.items():
            prefill = batch * args.prompt_len / statistics.median(t["prefill"])
            decode = batch * (args.decode_tokens - 1) / (statistics.median(t["decode"]) - statistics.median(t["short"]))
            speed[name] = (prefill, decode)
        soft, sa = speed["softmax (CPU_ATTN)"], speed["sa_softmax (plugin)"]
        # the spread: each round's SA / softmax decode time (the two engines ran back to back in that round)
        ts, tq = times["softmax (CPU_ATTN)"], times["sa_softmax (plugin)"]
        rounds = [(tq["decode"][r] - tq["short"][r]) / (ts["decode"][r] - ts["short"][r]) for r in range(args.repeats)]
        rows.append([batch, f"{soft[0]:.0f}", f"{sa[0]:.0f}", f"{soft[0] / sa[0]:.2f}x",
                     f"{soft[1]:.0f}", f"{sa[1]:.0f}", f"{soft[1] / sa[1]:.2f}x",
                     f"{min(rounds):.2f}x-{max(rounds):.2f}x"])
    header = ["batch", "prefill tok/s softmax", "prefill tok/s SA", "SA time / softmax",
              "decode tok/s softmax", "decode tok/s SA", "SA time / softmax", "decode ratio per round"]
    table = format_table(header, rows, markdown=True)
    text = (f"vLLM 0.32 CPU, tiny Llama {args.layers}x{args.width} (heads of 64), float32, prompt {args.prompt_len} "
            f"tokens, {args.decode_tokens} decode tokens, median of {args.repeats}, "
            f"{time.strftime('%Y-%m-%d')}, {cpu_name()} ({vector_isa()}), {os.cpu_count()} CPUs\n\n{table}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
