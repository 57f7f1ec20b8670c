#!/usr/bin/env python
"""Training throughput of the same tiny GPT with SA-Softmax vs softmax (SDPA), side by side, on CPU.

    python benchmarks/bench_train.py [--layers 2 --width 128 --heads 4 --seq 128 --batch 16 --steps 20
                                      --dtype bfloat16 --positional alibi --threads 0 --rounds 3]

Each round times ``--steps`` optimizer steps (forward, backward, AdamW) of every variant in turn after warmup, so
that both see the same machine conditions; the best round per variant is reported (tokens/s), with the ratio
SA/softmax (target >= 0.85), the date and machine information. No numbers are stored anywhere by this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from sasoftmax.lm.model import GPT, GPTConfig


def _machine() -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _setup(normalizer: str, args: argparse.Namespace):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=args.vocab, n_layer=args.layers, n_embd=args.width,
                                n_head=args.heads, block_size=args.seq, normalizer=normalizer,
                                positional=args.positional)
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
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--positional", default="alibi")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    variants = {"softmax": _setup("softmax", args), "sa_softmax": _setup("sa_softmax", args)}
    for model, opt, x, y in variants.values():
        _steps(model, opt, x, y, args.warmup, dtype)
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, (model, opt, x, y) in variants.items():
            best[name] = min(best[name], _steps(model, opt, x, y, args.steps, dtype))
    tokens = args.batch * args.seq * args.steps
    rate = {name: tokens / t for name, t in best.items()}
    info = _machine()
    print(f"bench_train  {info['date']}  {info['platform']}  {info['processor']}  cpus={info['cpu_count']}  "
          f"threads={info['torch_threads']}  torch {info['torch']}")
    print(f"model: {args.layers} layers x {args.width} wide, {args.heads} heads, seq {args.seq}, batch {args.batch}, "
          f"vocab {args.vocab}, {args.positional}, {args.dtype}; best of {args.rounds} rounds x {args.steps} steps")
    for name, r in rate.items():
        print(f"  {name:<11} {r:>10,.0f} tokens/s")
    ratio = rate["sa_softmax"] / rate["softmax"]
    print(f"  ratio sa_softmax/softmax = {ratio:.3f}  (target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "args": vars(args), "tokens_per_s": rate, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
