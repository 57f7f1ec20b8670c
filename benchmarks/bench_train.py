#!/usr/bin/env python
"""Training throughput of the same tiny GPT with SA-Softmax vs softmax (SDPA), side by side, on CPU.

    python benchmarks/bench_train.py [--layers 2 --width 128 --heads 4 --seq 128 --batch 16 --steps 20
                                      --dtype bfloat16 --positional alibi --threads 0 --rounds 3]
    python benchmarks/bench_train.py --seq 512 --batch 4 --layers 4 --width 256 --dtype float32,bfloat16 \
                                     --positional alibi,rope               # every combination, one after another

For each (dtype, positional) combination, each round times ``--steps`` optimizer steps (forward, backward, AdamW) of
every variant in turn after warmup, so that both see the same machine conditions; the median round per variant is
reported (tokens/s), with the ratio SA/softmax (target >= 0.9), the date, the machine and the ``sa_attention``
backend the SA model ran. No numbers are stored anywhere by this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _machine import machine_info

from sasoftmax.lm.model import GPT, GPTConfig

TARGET = 0.9


def _setup(normalizer: str, positional: str, args: argparse.Namespace):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=args.vocab, n_layer=args.layers, n_embd=args.width,
                                n_head=args.heads, block_size=args.seq, normalizer=normalizer,
                                positional=positional)
    model = GPT(cfg)
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    return model, opt, x, y


def _steps(model, opt, x, y, n: int, dtype: torch.dtype) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _sa_backend() -> str:
    from sasoftmax.attention.backends import cpp as cpp_backend

    err = cpp_backend.load_error()
    return "auto -> cpp (fused kernel)" if err is None else f"auto -> chunked ({err})"


def measure(dtype_name: str, positional: str, args: argparse.Namespace) -> dict[str, float]:
    """Median tokens/s of softmax and SA-Softmax for one (dtype, positional) combination, rounds alternating."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    variants = {name: _setup(name, positional, args) for name in ("softmax", "sa_softmax")}
    for model, opt, x, y in variants.values():
        _steps(model, opt, x, y, args.warmup, dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, opt, x, y) in variants.items():
            times[name].append(_steps(model, opt, x, y, args.steps, dtype))
    tokens = args.batch * args.seq * args.steps
    return {name: tokens / statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="float32 and/or bfloat16, comma separated")
    p.add_argument("--positional", default="alibi", help="positional registry names, comma separated")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"bench_train  {info['date']}  {info['machine']}  {info['processor']} ({info['isa']})  cpus={info['cpus']}  "
          f"threads={info['threads']}  torch {info['torch']}  sa_attention {_sa_backend()}")
    results = []
    for dtype_name in args.dtype.split(","):
        for positional in args.positional.split(","):
            rate = measure(dtype_name, positional, args)
            ratio = rate["sa_softmax"] / rate["softmax"]
            print(f"model: {args.layers} layers x {args.width} wide, {args.heads} heads, seq {args.seq}, batch "
                  f"{args.batch}, vocab {args.vocab}, {positional}, {dtype_name}; median of {args.rounds} rounds x "
                  f"{args.steps} steps")
            for name, r in rate.items():
                print(f"  {name:<11} {r:>10,.0f} tokens/s")
            verdict = "met" if ratio >= TARGET else "NOT met"
            print(f"  ratio sa_softmax/softmax = {ratio:.3f}  (target >= {TARGET}: {verdict})", flush=True)
            results.append({"dtype": dtype_name, "positional": positional, "tokens_per_s": rate, "ratio": ratio})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
