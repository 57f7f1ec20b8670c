#!/usr/bin/env python
"""GPU benchmark of the fused SA attention kernel against FlashAttention (SDPA) and eager SA.

For each head dim, causal mode and sequence length it measures, in bf16:

* ``SA-norm triton``  — ``sa_attention(..., backend="triton")`` (normalized SA, range differentiated);
* ``SA-plain triton`` — the same with ``normalize=False``;
* ``SDPA flash``      — ``F.scaled_dot_product_attention`` forced to the flash backend (plain softmax, the speed bar);
* ``SA eager``        — a naive materialized SA (scores, softmax, min/max in float32 over the full N x N matrix, as in
  the authors' code); skipped above ``--eager-max`` tokens or when it runs out of memory.

Reported per method and shape: the forward for inference (``torch.no_grad``), the forward for training (inputs that
require grad: what the backward needs is saved) and forward+backward, each as time (median,
``triton.testing.do_bench``) and TFLOP/s in FlashAttention's convention (forward ``4 B H N^2 D``, x0.5 causal;
backward 2.5x forward). The convention counts the products of softmax attention: normalized SA does more work (a
third ``Q K^T`` product in the forward), so its TFLOP/s understate the hardware rate. Also: the peak extra memory of
one forward+backward, each method's forward+backward time relative to SDPA flash, and, for the SA methods, the
largest error of the output against the chunked backend (``sa_attention(..., backend="chunked")``, relative to the
largest output value; rows above ``--tol`` are marked and make the exit status 1). The batch is sized so that
``B * N = --tokens`` and ``H * D = --hidden`` (FlashAttention's benchmark setup).

The Triton kernels are compiled before timing, in ``--compile-jobs`` parallel processes (each runs the benchmark's
calls at a small length, which shares the compiled kernels through Triton's on-disk cache).

Usage: ``python benchmarks/bench_gpu_attention.py --out results.md``. Needs a CUDA GPU; exits with status 2 and a
message otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as a markdown table to this path")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="sequence lengths (comma separated)")
    ap.add_argument("--dims", default="64,128", help="head dims (comma separated)")
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=16384, help="batch * seq_len")
    ap.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    ap.add_argument("--eager-max", type=int, default=8192, help="skip eager SA above this length")
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=40, help="do_bench repetition time (ms)")
    ap.add_argument("--tol", type=float, default=3e-2, help="largest accepted error against the chunked backend")
    ap.add_argument("--time-budget", type=float, default=300.0,
                    help="seconds; shapes not started within this budget are skipped (and listed)")
    ap.add_argument("--compile-jobs", type=int, default=8, help="processes that compile the kernels before timing")
    ap.add_argument("--autotune", action="store_true", help="let Triton autotune the SA kernels (slower start)")
    return ap.parse_args(argv)


def _methods() -> list[tuple[str, Callable, bool | None]]:
    """``(name, fn(q, k, v, causal), normalize of the SA function it computes or None)``."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sasoftmax.attention.api import sa_attention

    def eager_sa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        n = q.shape[-2]
        s = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
        if causal:
            masked = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            s_inf = s.masked_fill(masked, float("-inf"))
            s = s.masked_fill(masked, 0.0)
        else:
            s_inf = s
        p = torch.softmax(s_inf, dim=-1)
        a = s.amin(dim=-1, keepdim=True).clamp(max=0.0)
        b = s.amax(dim=-1, keepdim=True).clamp(min=0.0)
        w = (s - a) / (b - a + 1e-10) * p
        return torch.matmul(w.to(v.dtype), v)

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return [
        ("SA-norm triton", lambda q, k, v, c: sa_attention(q, k, v, is_causal=c, backend="triton"), True),
        ("SA-plain triton", lambda q, k, v, c: sa_attention(q, k, v, is_causal=c, normalize=False,
                                                             backend="triton"), False),
        ("SDPA flash", flash, None),
        ("SA eager", eager_sa, True),
    ]


def _warm(job: tuple[int, int, bool, bool]) -> float:
    """Compile the Triton kernels of one (D, H, causal, normalize) case: inference forward, training forward and
    backward at a short length (same kernel specialization as the timed lengths, so the on-disk cache serves them)."""
    import torch

    from sasoftmax.attention.api import sa_attention

    D, H, causal, normalize = job
    t0 = time.time()
    q, k, v = (torch.randn(1, H, 256, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        sa_attention(q, k, v, is_causal=causal, normalize=normalize, backend="triton")
    sa_attention(q, k, v, is_causal=causal, normalize=normalize, backend="triton").sum().backward()
    torch.cuda.synchronize()
    return time.time() - t0


def _precompile(args: argparse.Namespace, dims: list[int], causal_modes: list[bool]) -> float:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(D, max(1, args.hidden // D), c, n) for D in dims for c in causal_modes for n in (True, False)]
    t0 = time.time()
    if args.compile_jobs <= 1:
        for job in jobs:
            _warm(job)
    else:
        with ProcessPoolExecutor(min(args.compile_jobs, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_warm, jobs))
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.autotune:
        os.environ["SASOFTMAX_TRITON_AUTOTUNE"] = "1"
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_attention: no CUDA GPU found; this benchmark needs one (nothing was measured).",
              file=sys.stderr)
        return 2
    try:
        import triton
        import triton.testing  # noqa: F401
    except ImportError:
        print("bench_gpu_attention: the `triton` package is required.", file=sys.stderr)
        return 2
    from sasoftmax.attention.api import sa_attention

    dev = torch.device("cuda")
    dtype = torch.bfloat16
    t_start = time.time()
    dims = _parse_ints(args.dims)
    causal_modes = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    gpu_name = torch.cuda.get_device_name(0)
    print(f"device: {gpu_name}; torch {torch.__version__}; triton {triton.__version__}; dtype bf16", flush=True)
    compile_s = _precompile(args, dims, causal_modes)
    print(f"kernels compiled in {compile_s:.0f} s ({args.compile_jobs} processes)", flush=True)
    methods = _methods()
    rows: list[dict] = []
    skipped: list[str] = []
    print(_HEADER, flush=True)
    for D in dims:
        H = max(1, args.hidden // D)
        for causal in causal_modes:
            for N in _parse_ints(args.lengths):
                B = max(1, args.tokens // N)
                if time.time() - t_start > args.time_budget:
                    skipped.append(f"D={D} causal={causal} N={N} (time budget)")
                    continue
                gen = torch.Generator(device=dev).manual_seed(0)
                q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=gen).requires_grad_()
                           for _ in range(3))
                g = torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=gen)
                fwd_flops = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)
                refs: dict[bool, torch.Tensor] = {}
                shape_rows = []
                for name, fn, normalize in methods:
                    row = {"D": D, "causal": causal, "N": N, "B": B, "H": H, "method": name}
                    if name == "SA eager" and N > args.eager_max:
                        row["note"] = f"skipped (N > {args.eager_max})"
                        shape_rows.append(row)
                        continue
                    try:
                        row.update(_measure(fn, q, k, v, g, causal, fwd_flops, args.warmup, args.rep))
                        if normalize is not None:
                            if normalize not in refs:
                                with torch.no_grad():
                                    refs[normalize] = sa_attention(q, k, v, is_causal=causal, normalize=normalize,
                                                                   backend="chunked").float()
                            row["err"] = _error(fn, q, k, v, causal, refs[normalize])
                            if row["err"] > args.tol:
                                row["note"] = f"error {row['err']:.2g} > {args.tol:g}"
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "OOM"
                    q.grad = k.grad = v.grad = None
                    torch.cuda.empty_cache()
                    shape_rows.append(row)
                ref = next((r for r in shape_rows if r["method"] == "SDPA flash" and "fb_ms" in r), None)
                for row in shape_rows:
                    if ref is not None and "fb_ms" in row:
                        row["vs_flash"] = row["fb_ms"] / ref["fb_ms"]
                    print(_fmt_line(row), flush=True)
                rows.extend(shape_rows)
                del q, k, v, g, refs
                torch.cuda.empty_cache()
    total = time.time() - t_start
    print(f"total time {total:.0f} s (compilation {compile_s:.0f} s)", flush=True)
    if skipped:
        print("skipped: " + "; ".join(skipped), flush=True)
    if args.out:
        _write_markdown(args.out, rows, skipped, gpu_name, total, torch.__version__, triton.__version__)
        print(f"wrote {args.out}", flush=True)
    failed = [r for r in rows if "err" in r and r["err"] > args.tol]
    if failed:
        print(f"{len(failed)} rows exceed the error tolerance {args.tol:g} against the chunked backend", flush=True)
    return 1 if failed else 0


def _error(fn: Callable, q, k, v, causal: bool, ref) -> float:
    import torch

    with torch.no_grad():
        out = fn(q, k, v, causal).float()
    return float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def _measure(fn: Callable, q, k, v, g, causal: bool, fwd_flops: float, warmup: int, rep: int) -> dict:
    import torch
    import triton.testing

    def fwd_infer():
        with torch.no_grad():
            return fn(q, k, v, causal)

    def fwd_train():
        return fn(q, k, v, causal)

    def fwd_bwd():
        fn(q, k, v, causal).backward(g)

    fwd_bwd()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    bench = triton.testing.do_bench
    fwd_ms = bench(fwd_infer, warmup=warmup, rep=rep, return_mode="median")
    fwt_ms = bench(fwd_train, warmup=warmup, rep=rep, return_mode="median")
    fb_ms = bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=[q, k, v], return_mode="median")
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {
        "fwd_ms": fwd_ms,
        "fwd_tflops": fwd_flops / (fwd_ms * 1e-3) / 1e12,
        "fwt_ms": fwt_ms,
        "fwt_tflops": fwd_flops / (fwt_ms * 1e-3) / 1e12,
        "fb_ms": fb_ms,
        "fb_tflops": 3.5 * fwd_flops / (fb_ms * 1e-3) / 1e12,
        "peak_mib": peak / 2**20,
    }


def _num(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


_HEADER = (f"{'D':>4} {'causal':>6} {'N':>6} {'B':>3} {'H':>3}  {'method':<16} {'fwd ms':>8} {'fwd TF':>7} "
           f"{'fwT ms':>8} {'fwT TF':>7} {'f+b ms':>8} {'f+b TF':>7} {'peak MiB':>9} {'f+b/fl':>7} {'err':>8}")


def _fmt_line(row: dict) -> str:
    line = (f"{row['D']:>4} {str(row['causal']):>6} {row['N']:>6} {row['B']:>3} {row['H']:>3}  {row['method']:<16} "
            f"{_num(row, 'fwd_ms', '8.3f'):>8} {_num(row, 'fwd_tflops', '7.1f'):>7} "
            f"{_num(row, 'fwt_ms', '8.3f'):>8} {_num(row, 'fwt_tflops', '7.1f'):>7} "
            f"{_num(row, 'fb_ms', '8.3f'):>8} {_num(row, 'fb_tflops', '7.1f'):>7} {_num(row, 'peak_mib', '9.0f'):>9} "
            f"{_num(row, 'vs_flash', '7.2f'):>7} {_num(row, 'err', '8.1e'):>8}")
    return line + (f"  {row['note']}" if "note" in row else "")


def _write_markdown(path: str, rows: list[dict], skipped: list[str], gpu: str, total: float, torch_v: str,
                    triton_v: str) -> None:
    lines = [
        "# SA attention on the GPU: fused Triton kernel vs FlashAttention (SDPA) vs eager",
        "",
        f"Device: {gpu}; torch {torch_v}; triton {triton_v}; bf16; total benchmark time {total:.0f} s "
        "(`benchmarks/bench_gpu_attention.py`).",
        "TFLOP/s with the FlashAttention convention (forward 4·B·H·N²·D, ×0.5 causal; backward 2.5× forward). The "
        "convention counts softmax attention's products; normalized SA does more work (three Q·Kᵀ-sized products in "
        "the forward instead of two), so its TFLOP/s understate what the hardware does.",
        "fwd = forward for inference (no grad); fwd (train) = forward with inputs that require grad; f+b = forward + "
        "backward. `f+b / flash` = forward+backward time divided by SDPA flash's on the same shape (lower is better). "
        "Peak MiB = extra memory allocated during one forward+backward. err = largest |output − chunked backend| "
        "relative to the largest output value (SA methods only).",
        "",
        "| D | causal | N | B | H | method | fwd ms | fwd TFLOP/s | fwd (train) ms | fwd (train) TFLOP/s | fwd+bwd ms "
        "| fwd+bwd TFLOP/s | peak MiB | f+b / flash | err | note |",
        "|---:|:---:|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['D']} | {r['causal']} | {r['N']} | {r['B']} | {r['H']} | {r['method']} | "
            f"{_num(r, 'fwd_ms', '.3f')} | {_num(r, 'fwd_tflops', '.1f')} | {_num(r, 'fwt_ms', '.3f')} | "
            f"{_num(r, 'fwt_tflops', '.1f')} | {_num(r, 'fb_ms', '.3f')} | {_num(r, 'fb_tflops', '.1f')} | "
            f"{_num(r, 'peak_mib', '.0f')} | {_num(r, 'vs_flash', '.2f')} | {_num(r, 'err', '.1e')} | "
            f"{r.get('note', '')} |"
        )
    if skipped:
        lines += ["", "Skipped (time budget): " + "; ".join(skipped)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
