#!/usr/bin/env python
"""Static report of the fused Triton SA kernels for sm_90 (H100/H200), made without a GPU.

For every dtype, padded head dim and feature set it runs the launcher's host code (``sasoftmax::triton_sa_fwd`` and,
through autograd, ``sasoftmax::triton_sa_bwd``, for the fast and the deterministic backward) on small CPU tensors with
a launch hook that records each kernel launch instead of running it: the kernel, its arguments and the configuration
the launcher picked (block sizes, warps, stages). Each recorded launch is then compiled for ``sm_90a`` with Triton's
own argument specialization (the same signature, ``== 1`` constants and divisibility hints as a real launch), and
``ptxas -v`` (the ``ptxas-blackwell`` binary that Triton's wheel carries) is run on the PTX. Reported per kernel and
configuration: registers, spill bytes (stores), shared memory (Triton's dynamic shared memory plus ptxas' static), and
the number of ``tl.dot`` per inner-loop iteration (from the TTIR: the dots of the innermost loops, summed over the
passes of the kernel; every pass has a masked and an unmasked loop variant, counted once).

Targets (``--check`` makes the exit status non-zero when one is missed): no spills for bf16/fp16 at head dim <= 128
in every feature set but "all" and "window-softcap", at most 256 spill bytes for those two, shared memory within
the 232448 bytes of an H100/H200 everywhere (float32 is reported but has no spill target).

The last line of the output is a JSON list of records ``{"kernel", "dtype", "D", "features", "config", "regs",
"spill_bytes", "shared_bytes", "dots_per_iter"}``.

``--sweep KIND`` compiles candidate configurations of one kernel kind ("fwd", "kv", "kv_det", "dq") instead, to
choose the launcher's table (``GPU_CONFIGS`` in ``backends/triton/__init__.py``). ``--render FILE`` prints a saved
report's JSON as markdown tables (the form recorded in ``docs/triton.md``).

Usage: ``python benchmarks/triton_static.py [--dtypes bf16,fp16] [--dims 64,128,256] [--features ...] [--jobs 2]``.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be built for the GPU, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KiB)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FEATURES: dict[str, dict] = {
    # the common training case: causal, normalized, range gradient
    "causal-normalized": dict(is_causal=True),
    "causal-plain": dict(is_causal=True, normalize=False),
    # bool key-padding mask (B, 1, 1, N), normalized, range gradient
    "padding-mask": dict(mask="keys"),
    "dropout": dict(is_causal=True, dropout_p=0.1),
    # every feature: causal, float mask with -inf (bool + additive parts), bias with gradient (broadcast over the
    # batch), ALiBi, dropout, normalized with range gradient
    "all": dict(is_causal=True, mask="float", bias=True, alibi=True, dropout_p=0.1),
    # Mistral / Gemma 2: causal with a sliding window of 256 keys, soft-capping at 30
    "window-softcap": dict(is_causal=True, window=(256, -1), softcap=30.0),
    # inference: causal normalized, no gradient (forward only)
    "inference": dict(is_causal=True, grad=False),
}
KERNEL_NAMES = {"fwd": "sa_fwd", "pre": "sa_bwd_pre", "kv": "sa_bwd_kv", "post": "sa_bwd_post",
                "kv_det": "sa_bwd_kv[det]", "dq": "sa_bwd_dq[det]", "pre_det": "sa_bwd_pre[det]"}
SWEEP: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3),
            (128, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
    "kv": [(32, 128, 4, 3), (32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3),
           (16, 128, 8, 2), (16, 64, 4, 2), (32, 64, 8, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 2),
           (64, 32, 4, 2), (32, 32, 4, 2)],
}
SWEEP["kv_det"] = SWEEP["kv"]
# the fast key/value kernel at head dim 128, where dropout was the tightest case (``--sweep kv --sweep-set kv128``)
SWEEP_KV128 = [(16, 128, 8, 2), (16, 128, 8, 1), (16, 128, 8, 3), (16, 64, 4, 2), (16, 64, 8, 2),
                     (32, 64, 8, 2)]
# head dim 256: small tiles only (the accumulators alone are BLOCK x 256 float32)
SWEEP_256: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 1)],
    "kv": [(16, 64, 8, 1), (16, 64, 8, 2), (16, 32, 4, 2), (32, 64, 8, 1), (16, 32, 4, 1), (32, 32, 8, 2)],
    "dq": [(64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2), (64, 64, 8, 1)],
}
SWEEP_256["kv_det"] = SWEEP_256["kv"]
# float32 (exact FMA products, no tensor cores): candidates for every head dim
SWEEP_FP32: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (64, 64, 8, 2), (16, 32, 4, 1)],
    "kv": [(32, 64, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    "dq": [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 1)],
}
SWEEP_FP32["kv_det"] = SWEEP_FP32["kv"]


def _candidates(kind: str, dtype: str, D: int, sweep_set: str = "") -> list[tuple[int, int, int, int]]:
    if sweep_set == "kv128":
        return SWEEP_KV128
    if dtype == "fp32":
        return SWEEP_FP32[kind]
    return (SWEEP_256 if D > 128 else SWEEP)[kind]


def _record(dtype_name: str, D: int, features: str, override: tuple[str, int, tuple] | None = None) -> list:
    """Run the launcher's host code for one call (forward, fast and deterministic backward) and return the recorded
    launches ``(kind, fn, args, kwargs)`` (duplicates removed)."""
    import torch

    from sasoftmax.attention.backends import triton as tb
    from sasoftmax.attention.inputs import prepare

    if override is not None:
        kind, bd, cfg = override
        table = tb.GPU_CONFIGS_FP32 if dtype_name == "fp32" else tb.GPU_CONFIGS
        table[kind] = {**table[kind], bd: cfg}
    f = FEATURES[features]
    dtype = getattr(torch, DTYPES[dtype_name])
    B, H, N = 2, 4, 1024
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    records: list = []
    seen: set = set()

    def hook(kind, fn, grid, args, kwargs):
        key = (kind, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in seen:
            seen.add(key)
            records.append((kind, fn, list(args), dict(kwargs)))

    grad = f.get("grad", True)
    tb.LAUNCH_HOOK = hook
    try:
        for det in ([False, True] if grad else [False]):
            tb.DETERMINISTIC = det
            q, k, v = (rand(B, H, N, D).requires_grad_(grad) for _ in range(3))
            mask = None
            if f.get("mask") == "keys":
                mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
                mask[1, ..., N // 2:] = False
            elif f.get("mask") == "float":
                mask = torch.zeros(1, 1, N, N, dtype=dtype)
                mask[..., : N // 4] = float("-inf")
            bias = rand(1, H, N, N).requires_grad_(grad) if f.get("bias") else None
            slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32)) if f.get("alibi") else None
            inp = prepare(q, k, v, mask, is_causal=f.get("is_causal", False), bias=bias, alibi_slopes=slopes,
                          normalize=f.get("normalize", True), dropout_p=f.get("dropout_p", 0.0),
                          window=f.get("window"), softcap=f.get("softcap"))
            out = torch.ops.sasoftmax.triton_sa_fwd(*tb.fwd_op_args(inp))[0]
            if grad:
                out.backward(torch.zeros_like(out))
    finally:
        tb.LAUNCH_HOOK = None
        tb.DETERMINISTIC = None
    if grad:  # name the deterministic path's kernels apart
        det_pre = [r for r in records if r[0] == "pre" and not r[3]["ZERO_DQ"]]
        records = [("pre_det", *r[1:]) if any(r is d for d in det_pre) else r for r in records]
    return records


def _ptxas() -> str:
    from triton import knobs

    return knobs.nvidia.ptxas_blackwell.path


def _dots_per_iter(ttir: str) -> tuple[int, list[int]]:
    """``(dots per iteration, dots of each innermost loop)`` from the TTIR text: innermost ``scf.for`` loops come in
    (unmasked, masked) pairs of the same pass, so the per-iteration count is the sum over the loops divided by 2."""
    lines = ttir.splitlines()
    loops: list[tuple[int, int, int]] = []  # (start, end, indent)
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            for j in range(i + 1, len(lines)):
                lj = lines[j]
                if lj.strip().startswith("}") and len(lj) - len(lj.lstrip()) == indent:
                    loops.append((i, j, indent))
                    break
    inner = [(a, b) for a, b, _ in loops if not any(a < c < b for c, _, _ in loops)]
    counts = [sum(1 for line in lines[a:b] if re.search(r"= tt\.dot ", line)) for a, b in inner]
    with_dots = [c for c in counts if c]
    return (sum(with_dots) // 2 if with_dots else 0), counts


def _compile(fn, args: list, kwargs: dict) -> dict:
    """Compile one recorded launch for sm_90 the way the JIT would, and read its resources."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    consts = {k: v for k, v in kwargs.items() if k not in opts}
    bound = dict(zip(fn.arg_names, args, strict=False))
    bound.update(consts)
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        val = bound[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[(i,)] = val
            continue
        ty, attr = native_specialize_impl(BaseBackend, val, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        sig[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    t0 = time.time()
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    seconds = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(k.asm["ptx"])
        res = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores", log)
    smem = re.search(r"(\d+) bytes smem", log)
    dots, loops = _dots_per_iter(k.asm["ttir"])
    return {"regs": regs, "spill_bytes": int(spill.group(1)) if spill else 0,
            "shared_bytes": int(k.metadata.shared) + (int(smem.group(1)) if smem else 0),
            "dots_per_iter": dots, "loop_dots": loops, "compile_s": round(seconds, 1)}


def _config_of(kwargs: dict) -> str:
    bm, bn = kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N")
    tile = f"{bm}x{bn}" if bn is not None else f"{bm}"
    stages = f" s{kwargs['num_stages']}" if "num_stages" in kwargs else ""
    return f"{tile} w{kwargs.get('num_warps')}{stages}"


def _job(job: tuple) -> list[dict]:
    dtype_name, D, features, kinds, override = job
    out = []
    for kind, fn, args, kwargs in _record(dtype_name, D, features, override):
        if kinds and kind not in kinds:
            continue
        rec = {"kernel": KERNEL_NAMES[kind], "dtype": dtype_name, "D": D, "features": features,
               "config": _config_of(kwargs)}
        try:
            rec.update(_compile(fn, args, kwargs))
        except Exception as err:  # a configuration that does not compile is reported, not hidden
            rec.update(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        out.append(rec)
    return out


def _target(rec: dict) -> str | None:
    """Why ``rec`` misses a target, or None."""
    if "error" in rec:
        return rec["error"]
    if rec["shared_bytes"] > SMEM_LIMIT:
        return f"shared memory {rec['shared_bytes']} > {SMEM_LIMIT}"
    if rec["dtype"] in ("bf16", "fp16") and rec["D"] <= 128:
        limit = 256 if rec["features"] in ("all", "window-softcap") else 0
        if rec["spill_bytes"] > limit:
            return f"{rec['spill_bytes']} spill bytes > {limit}"
    return None


def _line(rec: dict) -> str:
    if "error" in rec:
        return f"{rec['kernel']:<16} {rec['dtype']:<5} {rec['D']:>4} {rec['features']:<18} {rec['config']:<16} " \
               f"ERROR {rec['error']}"
    return (f"{rec['kernel']:<16} {rec['dtype']:<5} {rec['D']:>4} {rec['features']:<18} {rec['config']:<16} "
            f"{rec['regs']:>5} {rec['spill_bytes']:>7} {rec['shared_bytes']:>8} {rec['dots_per_iter']:>5}  "
            f"{'-' if _target(rec) is None else 'MISS: ' + _target(rec)}")


def render(records: list[dict]) -> str:
    """Markdown: one table per dtype, a row per (kernel, head dim), ``regs/spill bytes`` per feature set, the
    configuration, the products per iteration and the largest shared memory over the feature sets."""
    out = []
    order = list(KERNEL_NAMES.values())
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        recs = [r for r in records if r["dtype"] == dtype]
        feats = [f for f in FEATURES if any(r["features"] == f for r in recs)]
        out += [f"**{dtype}** (cells: registers / spill bytes)", "",
                "| kernel | D | config | dots | " + " | ".join(feats) + " | max shared bytes |",
                "|:---|---:|:---|:---:|" + "---:|" * len(feats) + "---:|"]
        keys = sorted({(r["kernel"], r["D"]) for r in recs}, key=lambda kd: (order.index(kd[0]), kd[1]))
        for kernel, D in keys:
            cell = {r["features"]: r for r in recs if r["kernel"] == kernel and r["D"] == D}
            any_rec = next(iter(cell.values()))
            dots = sorted({r.get("dots_per_iter") for r in cell.values()} - {None})
            cells = ["-" if f not in cell else ("error" if cell[f].get("error") else
                                                f"{cell[f]['regs']} / {cell[f]['spill_bytes']}") for f in feats]
            shared = max((r.get("shared_bytes") or 0) for r in cell.values())
            out.append(f"| {kernel} | {D} | {any_rec['config']} | {', '.join(map(str, dots))} | "
                       + " | ".join(cells) + f" | {shared} |")
        out.append("")
    return "\n".join(out)


def configs_markdown() -> str:
    """The launcher's configurations (``GPU_CONFIGS``, ``GPU_CONFIGS_FP32``, row kernels) as a markdown table."""
    from sasoftmax.attention.backends import triton as tb

    def fmt(cfg: tuple[int, int, int, int]) -> str:
        bm, bn, w, st = cfg
        return f"{bm}×{bn}, {w} warps, {st} stage{'s' if st != 1 else ''}"

    head = "| kernel (BLOCK_M × BLOCK_N) | " + " | ".join(
        f"{dt} D={d}" for dt in ("bf16/fp16", "fp32") for d in (64, 128, 256)) + " |"
    lines = [head, "|:---|" + "---:|" * 6]
    names = {"fwd": "sa_fwd", "kv": "sa_bwd_kv (fast)", "kv_det": "sa_bwd_kv (deterministic)",
             "dq": "sa_bwd_dq (deterministic)"}
    for kind, name in names.items():
        cells = [fmt(table[kind][d]) for table in (tb.GPU_CONFIGS, tb.GPU_CONFIGS_FP32) for d in (64, 128, 256)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = [f"{tb.row_block(d)} rows, {tb.ROW_WARPS} warps" for d in (64, 128, 256)]
    lines.append("| sa_bwd_pre, sa_bwd_post | " + " | ".join(rows + rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp16", help="comma separated: bf16, fp16, fp32")
    ap.add_argument("--dims", default="64,128,256", help="head dims (comma separated)")
    ap.add_argument("--features", default=",".join(FEATURES), help="feature sets (comma separated)")
    ap.add_argument("--kernels", default="", help="only these kernel kinds (fwd,pre,kv,post,kv_det,dq,pre_det)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--sweep", default="", help="compile the candidate configurations of one kernel kind")
    ap.add_argument("--sweep-set", default="", help="an alternative candidate list for --sweep (kv128)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--render", default="", metavar="FILE",
                    help="print the markdown summary of a saved report (its last line, the JSON list) and exit")
    ap.add_argument("--configs", action="store_true", help="print the launcher's configurations (markdown) and exit")
    args = ap.parse_args(argv)
    if args.configs:
        print(configs_markdown())
        return 0
    if args.render:
        with open(args.render) as fh:
            last = [line for line in fh.read().splitlines() if line.startswith("[")][-1]
        print(render(json.loads(last)))
        return 0
    dtypes = [d for d in args.dtypes.split(",") if d]
    dims = [int(d) for d in args.dims.split(",") if d]
    features = [f for f in args.features.split(",") if f]
    for name in features:
        if name not in FEATURES:
            ap.error(f"unknown feature set {name!r}; known: {', '.join(FEATURES)}")
    kinds = [k for k in args.kernels.split(",") if k]
    if args.sweep:
        kinds = [args.sweep]
        jobs = [(dt, D, fs, kinds, (args.sweep, D, cfg)) for D in dims for dt in dtypes
                for cfg in _candidates(args.sweep, dt, D, args.sweep_set) for fs in features]
    else:
        jobs = [(dt, D, fs, kinds, None) for dt in dtypes for D in dims for fs in features]

    import triton

    print(f"triton {triton.__version__}; target sm_90a (GPUTarget('cuda', 90, 32)); ptxas {_ptxas()}", flush=True)
    print(f"{'kernel':<16} {'dtype':<5} {'D':>4} {'features':<18} {'config':<16} {'regs':>5} {'spill':>7} "
          f"{'shared':>8} {'dots':>5}  target", flush=True)
    t0 = time.time()
    records: list[dict] = []
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for recs in pool.map(_job, jobs):
                for rec in recs:
                    print(_line(rec), flush=True)
                records.extend(recs)
    else:
        for job in jobs:
            recs = _job(job)
            for rec in recs:
                print(_line(rec), flush=True)
            records.extend(recs)
    missed = [r for r in records if _target(r) is not None]
    print(f"{len(records)} kernels compiled in {time.time() - t0:.0f} s; {len(missed)} miss a target", flush=True)
    keys = ("kernel", "dtype", "D", "features", "config", "regs", "spill_bytes", "shared_bytes", "dots_per_iter")
    print(json.dumps([{k: r.get(k) for k in keys} | ({"error": r["error"]} if "error" in r else {})
                      for r in records]))
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
