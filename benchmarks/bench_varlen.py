"""Packed documents on the CPU: ``sa_attention_varlen`` against the three ways to do without it, side by side.

For ``--docs`` causal documents of about ``--length`` tokens each (lengths drawn around it, reproducibly), one
forward+backward of:

* ``varlen``: ``sa_attention_varlen`` on the packed ``(total, H, D)`` tensors;
* ``separate``: ``sa_attention`` on each document, one call after the other (the target: varlen should cost this);
* ``padded``: the documents padded to the longest in a ``(docs, H, longest, D)`` batch with a key-padding mask;
* ``dense``: the whole packed row as one ``(1, H, total, D)`` call with a dense block-diagonal causal bool mask
  (what a user without varlen writes; skipped above ``--dense-max`` tokens).

All through ``backend="auto"`` (the fused kernel where it runs). Times are medians of ``--reps`` rounds run
alternately in one process; peak memory (``--memory``) is measured for each in a fresh process::

    python benchmarks/bench_varlen.py                          # 16 documents of ~1024 tokens, H=4, D=64, fp32
    python benchmarks/bench_varlen.py --memory --out docs/results/varlen_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

from _machine import cpu_name, vector_isa
from bench_cpu_attention import _status_bytes, _table, time_steps

METHODS = ["varlen", "separate", "padded", "dense"]


def _lengths(args) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(0)
    spread = torch.randint(-args.length // 4, args.length // 4 + 1, (args.docs,), generator=g)
    return [max(1, args.length + int(s)) for s in spread]


def _inputs(args):
    import torch

    lengths = _lengths(args)
    total = sum(lengths)
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(total, args.heads, args.head_dim, generator=g).to(dt).requires_grad_(True)
               for _ in range(3))
    grad = torch.randn(total, args.heads, args.head_dim, generator=g).to(dt)
    return lengths, q, k, v, grad


def _step(method: str, lengths: list[int], q, k, v, grad):
    """One forward+backward of ``method`` (the inputs' gradients cleared)."""
    import torch

    from sasoftmax import sa_attention, sa_attention_varlen

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    offsets = cu.tolist()
    longest = max(lengths)

    def to4(t):  # (n, H, D) -> (1, H, n, D)
        return t.transpose(0, 1)[None]

    def run() -> None:
        if method == "varlen":
            out = sa_attention_varlen(q, k, v, cu, cu, longest, longest, is_causal=True)
            out.backward(grad)
        elif method == "separate":
            for d in range(len(lengths)):
                a, b = offsets[d], offsets[d + 1]
                out = sa_attention(to4(q[a:b]), to4(k[a:b]), to4(v[a:b]), is_causal=True)
                out.backward(to4(grad[a:b]))
        elif method == "padded":
            def pad(t):
                return torch.stack([torch.nn.functional.pad(t[a:b], (0, 0, 0, 0, 0, longest - (b - a)))
                                    for a, b in zip(offsets, offsets[1:], strict=False)]).transpose(1, 2)
            keep = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (docs, longest) real keys
            out = sa_attention(pad(q), pad(k), pad(v), keep[:, None, None, :], is_causal=True)
            out.backward(pad(grad))
        elif method == "dense":
            doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            keep = (doc[:, None] == doc[None, :]).tril()
            out = sa_attention(to4(q), to4(k), to4(v), keep)
            out.backward(to4(grad))
        else:
            raise ValueError(method)
        q.grad = k.grad = v.grad = None

    return run


def _memory_worker(method: str, args) -> dict:
    """Peak resident memory of one step above what the process held before it (see bench_cpu_attention)."""
    small = argparse.Namespace(**{**vars(args), "docs": 2, "length": 16})
    _step(method, *_inputs(small))()
    inputs = _inputs(args)
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _step(method, *inputs)()
    return {"method": method, "peak_bytes": max(_status_bytes("VmHWM") - base, 0)}


def _peak_memory(method: str, args) -> float | None:
    cmd = [sys.executable, __file__, "--memory-worker", method, "--docs", str(args.docs), "--length",
           str(args.length), "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--dtype", args.dtype]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  memory {method} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--length", type=int, default=1024, help="mean document length (tokens)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3, help="alternating timing rounds (median reported)")
    ap.add_argument("--dense-max", type=int, default=1 << 15, help="skip the dense mask above this many tokens")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (one fresh process each)")
    ap.add_argument("--out", help="also write the table as markdown to this file")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.memory_worker, args)))
        return 0
    import torch

    from sasoftmax.attention.backends import cpp

    lengths, q, k, v, grad = _inputs(args)
    total = sum(lengths)
    methods = [m for m in METHODS if m != "dense" or total <= args.dense_max]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kernel = "cpp" if cpp.load_error() is None else f"chunked ({cpp.load_error()})"
    header = (f"Packed causal documents, {args.docs} documents of {min(lengths)}-{max(lengths)} tokens ({total} in "
              f"all), H={args.heads}, D={args.head_dim}, {args.dtype}, forward+backward — {when}, {cpu_name()} "
              f"({vector_isa()}), {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads; backend auto -> {kernel}; medians of {args.reps} alternating rounds")
    print(header, flush=True)
    times = time_steps({m: _step(m, lengths, q, k, v, grad) for m in methods}, args.reps)
    memory = {m: _peak_memory(m, args) for m in methods} if args.memory else {}
    columns = ["method", "fwd+bwd (s)", "time / separate", "peak MiB", "memory / separate"]
    rows = []
    for m in METHODS:
        if m not in times:
            rows.append([m, "skipped", "n/a", "n/a", "n/a"])
            continue
        mem, base = memory.get(m), memory.get("separate")
        rows.append([m, f"{times[m]:.3f}", f"{times[m] / times['separate']:.2f}x",
                     "-" if mem is None else f"{mem / 2**20:.0f}",
                     "-" if mem is None or not base else f"{mem / base:.2f}x"])
    text = header + "\n\n" + "\n".join(_table(columns, rows)) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
