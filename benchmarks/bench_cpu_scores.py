"""CPU benchmark of the fused kernel's two ways to form its score products, side by side with SDPA.

The kernel forms S = Q K^T (and, in the backward, dP = dO V^T) either from K/V packed once per call into float32
panels (csrc/panels.h; the default from 16 query rows per key/value head) or by BLAS on every block of query rows.
This script times SA (both forms) with each, and SDPA, alternately in one process (forward+backward and forward
alone, medians of ``--reps`` rounds), and prints the ratios to SDPA:

    python benchmarks/bench_cpu_scores.py                         # B=2, H=8, D=64, fp32, not causal, N=2048,4096
    python benchmarks/bench_cpu_scores.py --dtype bfloat16 --out docs/results/cpu_scores_bf16.md
"""

from __future__ import annotations

import argparse
import datetime
import os

from _machine import cpu_name, vector_isa
from bench_cpu_attention import _inputs, _table, time_steps

VARIANTS = [("SA", True), ("SA plain", False)]
MODES = ["panels", "blas"]


def _step(ext, mode: str, normalize: bool, q, k, v, g, causal: bool, grad: bool):
    import torch

    from sasoftmax.attention import prepare
    from sasoftmax.attention.backends import cpp

    rows = ext.DEFAULT_PANEL_MIN_ROWS if mode == "panels" else 2**62

    def run() -> None:  # (the backward forms S as the forward did: the op saves panel_rows)
        if grad:
            cpp.run(prepare(q, k, v, is_causal=causal, normalize=normalize), panel_rows=rows).backward(g)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                cpp.run(prepare(q, k, v, is_causal=causal, normalize=normalize), panel_rows=rows)

    return run


def _sdpa(q, k, v, g, causal: bool, grad: bool):
    import torch
    import torch.nn.functional as F

    def run() -> None:
        if grad:
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(g)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5, help="alternating timing rounds (median reported)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--out", help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    import torch

    from sasoftmax.attention.backends import cpp as cpp_backend
    from sasoftmax.attention.backends.cpp import build

    ext = build.build()
    if ext is None or not ext.panels_available():
        print(f"the kernel's panel path is unavailable here: {cpp_backend.load_error() or 'no AVX2/AVX512 build'}")
        return 2
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Kernel score products, {args.dtype}, B={args.batch}, H={args.heads}, D={args.head_dim}, "
              f"{'causal' if args.causal else 'not causal'} — {when}, {cpu_name()} ({vector_isa()}), "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"medians of {args.reps} alternating rounds; panels = K/V packed once per call, blas = BLAS per block")
    print(header, flush=True)
    columns = ["N", "pass", "SDPA (s)"]
    for name, _ in VARIANTS:
        columns += [f"{name} panels (s)", f"{name} blas (s)", f"{name} panels/SDPA", f"{name} blas/SDPA"]
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        q, k, v, g = _inputs(n, args, grad=True)
        for grad, label in ((True, "fwd+bwd"), (False, "fwd")):
            steps = {"sdpa": _sdpa(q, k, v, g, args.causal, grad)}
            for name, normalize in VARIANTS:
                for mode in MODES:
                    steps[name, mode] = _step(ext, mode, normalize, q, k, v, g, args.causal, grad)
            t = time_steps(steps, args.reps)
            row = [str(n), label, f"{t['sdpa']:.3f}"]
            for name, _ in VARIANTS:
                row += [f"{t[name, 'panels']:.3f}", f"{t[name, 'blas']:.3f}",
                        f"{t[name, 'panels'] / t['sdpa']:.2f}x", f"{t[name, 'blas'] / t['sdpa']:.2f}x"]
            rows.append(row)
            print(" | ".join(f"{c}={x}" for c, x in zip(columns, row, strict=True)), flush=True)
    text = header + "\n\n" + "\n".join(_table(columns, rows)) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
