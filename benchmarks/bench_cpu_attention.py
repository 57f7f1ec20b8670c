"""CPU benchmark: SA attention (auto backend) vs softmax SDPA vs a naive eager SA implementation.

Time: every implementation runs in this one process, alternately (SA, SA plain, SDPA, eager, SA, SA plain, ...),
forward+backward and forward alone (no grad), ``--reps`` rounds after a warm-up; medians are reported with the
ratios to SDPA. Memory: each (implementation, N) runs one forward+backward in a fresh subprocess whose peak resident
memory is read from the OS (the high-water mark VmHWM minus the resident size once the inputs exist and the
implementation's libraries are loaded).

    python benchmarks/bench_cpu_attention.py                              # B=2, H=8, D=64, fp32, not causal
    python benchmarks/bench_cpu_attention.py --causal --dtype bfloat16 --out results.md

SA = ``sa_attention(backend="auto")`` (on the CPU: the fused C++ kernel when it is available, else the chunked
path; the header says which), normalized form unless marked "plain".
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

from _machine import cpu_name, vector_isa

IMPLS = ("sa", "sa_plain", "sdpa", "eager")
LABELS = {"sa": "SA", "sa_plain": "SA plain", "sdpa": "SDPA", "eager": "naive eager SA"}


def naive_eager_sa(q, k, v, causal: bool):
    """SA attention written the way the authors' GPT-NeoX patch does it: everything materialized, autograd backward."""
    import torch

    n = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    if causal:
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        masked = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(masked.float(), dim=-1).to(q.dtype)
        tril_scores = scores * keep
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        tril_scores = scores
    mn = torch.clamp(tril_scores.min(dim=-1, keepdim=True).values, max=0)
    mx = torch.clamp(tril_scores.max(dim=-1, keepdim=True).values, min=0)
    weights = probs * (scores - mn) / (mx - mn + 1e-10)
    if causal:
        weights = weights * keep
    return torch.matmul(weights, v)


def _attend(impl: str, q, k, v, causal: bool):
    import torch.nn.functional as F

    from sasoftmax import sa_attention

    if impl == "sa":
        return sa_attention(q, k, v, is_causal=causal)
    if impl == "sa_plain":
        return sa_attention(q, k, v, is_causal=causal, normalize=False)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return naive_eager_sa(q, k, v, causal)


def _inputs(n: int, args, grad: bool):
    import torch

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim).to(dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v, torch.randn(args.batch, args.heads, n, args.head_dim).to(dtype)


def _fwd_bwd(impl: str, q, k, v, g, causal: bool) -> None:
    out = _attend(impl, q, k, v, causal)
    out.backward(g)
    q.grad = k.grad = v.grad = None


def _fwd(impl: str, q, k, v, causal: bool) -> None:
    import torch

    with torch.no_grad():
        _attend(impl, q, k, v, causal)


def time_steps(steps: dict, reps: int) -> dict:
    """Median seconds of each step (a callable), the steps run in turn ``reps`` times after one warm-up round."""
    for step in steps.values():
        step()
    times: dict = {key: [] for key in steps}
    for _ in range(reps):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}


def time_alternating(n: int, impls: list[str], args) -> dict[str, dict[str, float]]:
    """Median seconds of forward+backward ("fb") and forward alone ("fwd") per implementation, all in turn."""
    q, k, v, g = _inputs(n, args, grad=True)
    steps = {("fb", i): (lambda i=i: _fwd_bwd(i, q, k, v, g, args.causal)) for i in impls}
    steps.update({("fwd", i): (lambda i=i: _fwd(i, q, k, v, args.causal)) for i in impls})
    out: dict[str, dict[str, float]] = {i: {} for i in impls}
    for (mode, impl), t in time_steps(steps, args.reps).items():
        out[impl][mode] = t
    return out


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (e.g. VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_worker(impl: str, n: int, args) -> dict:
    """Peak resident memory of one forward+backward above what the process holds before it. A tiny call first loads
    the libraries the implementation uses (MKL, the kernel, ...), so that their one-off memory is not counted; the
    high-water mark is then reset (``/proc/self/clear_refs``) and read back (VmHWM, which, unlike ``ru_maxrss``, is
    not inherited from the parent process)."""
    tiny = _inputs(16, args, grad=True)
    _fwd_bwd(impl, *tiny, args.causal)
    q, k, v, g = _inputs(n, args, grad=True)
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _fwd_bwd(impl, q, k, v, g, args.causal)
    return {"impl": impl, "n": n, "peak_bytes": max(_status_bytes("VmHWM") - base, 0)}


def peak_memory(impl: str, n: int, args) -> float | None:
    """Peak resident memory (bytes) of one forward+backward in a fresh process, None if it failed."""
    cmd = [sys.executable, __file__, "--memory-worker", impl, "--lengths", str(n), "--batch", str(args.batch),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--dtype", args.dtype]
    if args.causal:
        cmd.append("--causal")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  memory {impl} N={n} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def _header(args) -> str:
    import torch

    from sasoftmax.attention.backends import cpp as cpp_backend

    err = cpp_backend.load_error()
    backend = (f"cpp (fused kernel, gemm: {cpp_backend.gemm_in_use()}, scores: {cpp_backend.score_products_in_use()})"
               if err is None else f"chunked ({err})")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"CPU attention, {args.dtype}, B={args.batch}, H={args.heads}, D={args.head_dim}, "
            f"{'causal' if args.causal else 'not causal'} — {when}, {cpu_name()} ({vector_isa()}), "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"SA = sa_attention(backend='auto') -> {backend}; medians of {args.reps} alternating rounds")


TIME_COLUMNS = ["N", "SA fwd+bwd (s)", "SA plain fwd+bwd (s)", "SDPA fwd+bwd (s)", "naive eager SA fwd+bwd (s)",
                "SA/SDPA fwd+bwd", "SA plain/SDPA fwd+bwd", "SA fwd (s)", "SA plain fwd (s)", "SDPA fwd (s)",
                "SA/SDPA fwd", "SA plain/SDPA fwd"]
MEMORY_COLUMNS = ["N", "SA peak MiB", "SDPA peak MiB", "naive eager SA peak MiB", "SA/eager memory"]


def _cells(n: int, t: dict, mem: dict) -> tuple[list[str], list[str]]:
    def sec(impl, mode):
        return f"{t[impl][mode]:.3f}" if impl in t else "skipped"

    def ratio(impl, mode):
        return f"{t[impl][mode] / t['sdpa'][mode]:.2f}x" if impl in t else "n/a"

    def mib(impl):
        return f"{mem[impl] / 2**20:.0f}" if mem.get(impl) is not None else "failed"

    time_row = [str(n), sec("sa", "fb"), sec("sa_plain", "fb"), sec("sdpa", "fb"), sec("eager", "fb"),
                ratio("sa", "fb"), ratio("sa_plain", "fb"), sec("sa", "fwd"), sec("sa_plain", "fwd"),
                sec("sdpa", "fwd"), ratio("sa", "fwd"), ratio("sa_plain", "fwd")]
    m_ratio = (f"{mem['sa'] / max(mem['eager'], 1):.3f}" if mem.get("sa") is not None and mem.get("eager")
               else "n/a")
    return time_row, [str(n), mib("sa"), mib("sdpa"), mib("eager"), m_ratio]


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5, help="alternating timing rounds (median reported)")
    ap.add_argument("--causal", action="store_true", help="causal attention (default: not causal)")
    ap.add_argument("--eager-max", type=int, default=4096, help="time the naive eager SA only up to this N")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", help="also write the tables as markdown to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.threads < 0:
        ap.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.memory_worker, lengths[0], args)))
        return
    header = _header(args)
    print(header, flush=True)
    time_rows, mem_rows = [], []
    for n in lengths:
        impls = [i for i in IMPLS if i != "eager" or n <= args.eager_max]
        t = time_alternating(n, impls, args)
        mem = {} if args.no_memory else {i: peak_memory(i, n, args) for i in ("sa", "sdpa", "eager")}
        tr, mr = _cells(n, t, mem)
        time_rows.append(tr)
        mem_rows.append(mr)
        print(" | ".join(f"{c}={x}" for c, x in zip(TIME_COLUMNS, tr, strict=True)), flush=True)
        if not args.no_memory:
            print(" | ".join(f"{c}={x}" for c, x in zip(MEMORY_COLUMNS, mr, strict=True)), flush=True)
    text = header + "\n\n" + "\n".join(_table(TIME_COLUMNS, time_rows)) + "\n"
    if not args.no_memory:
        text += "\nPeak resident memory of one forward+backward (fresh process each):\n\n"
        text += "\n".join(_table(MEMORY_COLUMNS, mem_rows)) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
