"""CPU benchmark: SA attention (auto backend) vs softmax SDPA vs a naive eager SA implementation.

Times forward+backward and measures the peak memory of each, side by side in one run, and prints the ratios.
Each (implementation, N) runs in a fresh subprocess so that its peak resident memory can be read from the OS
(``ru_maxrss`` minus the resident size after the inputs exist).

    python benchmarks/bench_cpu_attention.py                    # the issue's table (B=2, H=8, D=64, fp32)
    python benchmarks/bench_cpu_attention.py --lengths 512,1024 --out results.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from _machine import cpu_name

IMPLS = ("sa_auto", "sdpa_softmax", "naive_eager_sa")


def naive_eager_sa(q, k, v, causal: bool):
    """SA attention written the way the authors' GPT-NeoX patch does it: everything materialized, autograd backward."""
    import torch

    n = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    if causal:
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        masked = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        tril_scores = scores * keep
    else:
        probs = torch.softmax(scores, dim=-1)
        tril_scores = scores
    mn = torch.clamp(tril_scores.min(dim=-1, keepdim=True).values, max=0)
    mx = torch.clamp(tril_scores.max(dim=-1, keepdim=True).values, min=0)
    weights = probs * (scores - mn) / (mx - mn + 1e-10)
    if causal:
        weights = weights * keep
    return torch.matmul(weights, v)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(impl: str, n: int, b: int, h: int, d: int, causal: bool, reps: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from sasoftmax import sa_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    g = torch.randn(b, h, n, d)

    def step():
        if impl == "sa_auto":
            o = sa_attention(q, k, v, is_causal=causal)
        elif impl == "sdpa_softmax":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            o = naive_eager_sa(q, k, v, causal)
        o.backward(g)
        q.grad = k.grad = v.grad = None

    base = _rss_bytes()
    step()  # warm-up (also the memory high-water mark)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "n": n, "seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def _run_one(impl: str, n: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", impl, "--lengths", str(n), "--batch", str(args.batch),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--reps", str(args.reps)]
    if args.causal:
        cmd.append("--causal")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  {impl} N={n} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--causal", action="store_true", help="causal attention (default: not causal)")
    ap.add_argument("--out", help="also write the table as markdown to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    if args.worker:
        print(json.dumps(_worker(args.worker, lengths[0], args.batch, args.heads, args.head_dim, args.causal,
                                 args.reps)))
        return

    import torch

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    header = (f"CPU attention forward+backward, fp32, B={args.batch}, H={args.heads}, D={args.head_dim}, "
              f"{'causal' if args.causal else 'not causal'} — {when}, {machine}")
    rows = ["| N | SA auto (s) | SDPA softmax (s) | naive eager SA (s) | SA/SDPA time | SA peak MiB | "
            "SDPA peak MiB | eager peak MiB | SA/eager memory |",
            "|---|---|---|---|---|---|---|---|---|"]
    print(header)
    for n in lengths:
        r = {impl: _run_one(impl, n, args) for impl in IMPLS}

        def sec(name, r=r):
            return f"{r[name]['seconds']:.3f}" if r[name] else "failed"

        def mib(name, r=r):
            return f"{r[name]['peak_bytes'] / 2**20:.0f}" if r[name] else "failed"

        t_ratio = (f"{r['sa_auto']['seconds'] / r['sdpa_softmax']['seconds']:.2f}x"
                   if r["sa_auto"] and r["sdpa_softmax"] else "n/a")
        m_ratio = (f"{r['sa_auto']['peak_bytes'] / max(r['naive_eager_sa']['peak_bytes'], 1):.3f}"
                   if r["sa_auto"] and r["naive_eager_sa"] else "n/a")
        row = (f"| {n} | {sec('sa_auto')} | {sec('sdpa_softmax')} | {sec('naive_eager_sa')} | {t_ratio} | "
               f"{mib('sa_auto')} | {mib('sdpa_softmax')} | {mib('naive_eager_sa')} | {m_ratio} |")
        rows.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
