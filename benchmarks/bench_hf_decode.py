"""Prefill and per-token decode latency of a tiny random Llama with ``sa_softmax`` vs ``sdpa`` attention.

Both implementations run in the same process on the same weights, interleaved repetition by repetition, so machine
noise hits both alike. Prints the medians, the ratio sa_softmax / sdpa (target <= 1.1) and, with ``--profile``, the
Python functions that dominate one SA decode step.

    .venv/bin/python benchmarks/bench_hf_decode.py [--layers 4 --hidden 256 --heads 4 --kv-heads 2
                                                    --prompt 128 --new 32 --reps 5 --threads 0 --profile]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import inspect
import io
import platform
import pstats
import statistics
import time

import torch
import transformers
from _machine import cpu_name
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import sasoftmax
import sasoftmax.integrations.hf as sa_hf

IMPLS = ("sdpa", "sa_softmax")


def build(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    models = {}
    for impl in IMPLS:
        m = copy.deepcopy(base)
        m.set_attn_implementation(impl)
        models[impl] = m.eval()
    return models


def _cache_kw(model: torch.nn.Module) -> str:
    """transformers >= 5.2x names the cache argument `cache` (`past_key_values` is deprecated there)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, DynamicCache, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, **{_cache_kw(model): cache})
    return time.perf_counter() - t0, cache, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def decode(model: torch.nn.Module, cache: DynamicCache, nxt: torch.Tensor, steps: int) -> list[float]:
    times, kw = [], _cache_kw(model)
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(nxt, use_cache=True, **{kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="cProfile the SA decode steps")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    sa_hf.register()
    models = build(args)
    ids = torch.randint(3, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    pre: dict[str, list[float]] = {k: [] for k in IMPLS}
    dec: dict[str, list[float]] = {k: [] for k in IMPLS}
    for impl in IMPLS:  # warm-up
        _, cache, nxt = prefill(models[impl], ids)
        decode(models[impl], cache, nxt, 4)
    for _ in range(args.reps):
        for impl in IMPLS:
            t, cache, nxt = prefill(models[impl], ids)
            pre[impl].append(t)
            dec[impl].append(statistics.median(decode(models[impl], cache, nxt, args.new)))

    print(f"date      {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine   {platform.machine()} {cpu_name()}, torch threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}")
    print(f"versions  torch {torch.__version__}, transformers {transformers.__version__}, "
          f"sasoftmax {sasoftmax.__version__}")
    print(f"model     Llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads} kv, "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} decode steps, {args.reps} reps (medians)")
    print(f"{'':10}{'prefill ms':>12}{'decode ms/token':>18}")
    for impl in IMPLS:
        print(f"{impl:10}{1e3 * statistics.median(pre[impl]):12.2f}{1e3 * statistics.median(dec[impl]):18.3f}")
    r_pre = statistics.median(pre["sa_softmax"]) / statistics.median(pre["sdpa"])
    r_dec = statistics.median(dec["sa_softmax"]) / statistics.median(dec["sdpa"])
    print(f"{'ratio':10}{r_pre:12.2f}{r_dec:18.2f}   (sa_softmax / sdpa; target <= 1.1)")

    if args.profile:
        _, cache, nxt = prefill(models["sa_softmax"], ids)
        prof = cProfile.Profile()
        prof.enable()
        decode(models["sa_softmax"], cache, nxt, args.new)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print(f"\ncProfile of {args.new} sa_softmax decode steps (by own time):")
        print(s.getvalue())


if __name__ == "__main__":
    main()
