"""Rewrite the README's benchmark section from the result files the benchmark scripts wrote (docs/results/).

    python benchmarks/bench_cpu_attention.py --out docs/results/cpu_attention.md
    python benchmarks/bench_cpu_attention.py --causal --out docs/results/cpu_attention_causal.md
    python benchmarks/bench_cpu_attention.py --dtype bfloat16 --eager-max 2048 --out docs/results/cpu_attention_bf16.md
    python benchmarks/bench_cpu_attention.py --dtype bfloat16 --causal --eager-max 2048 [--reps 9] \
        --out docs/results/cpu_attention_bf16_causal.md
    python benchmarks/bench_train.py --seq 512 --batch 4 --layers 4 --width 256 --dtype float32 \
        --positional alibi,rope > docs/results/train_throughput.txt
    python benchmarks/bench_train.py --seq 512 --batch 4 --layers 4 --width 256 --dtype bfloat16 \
        --positional alibi,rope --steps 2 --warmup 1 --rounds 3 >> docs/results/train_throughput.txt
    python benchmarks/bench_hf_decode.py > docs/results/hf_decode.txt
    python benchmarks/bench_cpu_scores.py --out docs/results/cpu_scores.md
    python benchmarks/bench_cpu_scores.py --dtype bfloat16 --out docs/results/cpu_scores_bf16.md
    python benchmarks/readme_tables.py

Only text between the README's ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers changes; every figure in
it is copied from those files, which carry their own date and machine line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _read(name: str) -> str:
    path = RESULTS / name
    if not path.exists():
        sys.exit(f"readme_tables: {path} is missing; run the benchmark that writes it first (see this file's doc)")
    return path.read_text().strip()


def _cell(table: str, n: int, columns: tuple[str, ...]) -> str | None:
    """The entry of row ``N = n`` under the first header in ``columns`` that one of the file's tables has."""
    header: list[str] = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set(cells[0]) <= {"-"}:
            continue
        if cells[0] == "N":
            header = cells
        elif cells[0] == str(n):
            for col in columns:
                if col in header:
                    return cells[header.index(col)]
    return None


# Column names of bench_cpu_attention.py's tables (current first, then those of older result files).
TIME_RATIO = ("SA/SDPA fwd+bwd", "SA/SDPA time")
MEMORY_RATIO = ("SA/eager memory",)
LENGTHS = (1024, 2048, 4096)
# (what, ratio column, the target's limit)
TARGETS = (
    ("SA/SDPA forward+backward", TIME_RATIO, 1.25),
    ("SA plain/SDPA forward+backward", ("SA plain/SDPA fwd+bwd",), 1.25),
    ("SA/SDPA forward alone", ("SA/SDPA fwd",), 1.6),
    ("SA plain/SDPA forward alone", ("SA plain/SDPA fwd",), 1.15),
)


def _ratios(table: str, columns: tuple[str, ...], limit: float) -> str:
    """``1.27x / 1.16x / 1.40x at N = 1024 / 2048 / 4096`` for one column, and whether each meets ``limit``."""
    found = [(n, c) for n in LENGTHS if (c := _cell(table, n, columns)) is not None]
    ns, cells = [n for n, _ in found], [c for _, c in found]
    missed = [str(n) for n, c in zip(ns, cells, strict=True) if float(c.rstrip("x")) > limit]
    verdict = f"missed at N = {', '.join(missed)}" if missed else "met"
    return f"{' / '.join(cells)} at N = {' / '.join(map(str, ns))} ({verdict})"



def section() -> str:
    plain, causal = _read("cpu_attention.md"), _read("cpu_attention_causal.md")
    bf16, bf16_causal = _read("cpu_attention_bf16.md"), _read("cpu_attention_bf16_causal.md")
    tables = {"fp32": plain, "fp32 causal": causal, "bf16": bf16, "bf16 causal": bf16_causal}
    m4096 = _cell(plain, 4096, MEMORY_RATIO)
    verdict = [f"{label} (target <= {limit}x): " + "; ".join(
        f"{name} {_ratios(t, columns, limit)}" for name, t in tables.items()) for label, columns, limit in TARGETS]
    if m4096:
        verdict.append(f"peak memory at N=4096: {m4096} of the naive eager implementation's (target <= 0.1)")
    why = "why, and what would close the misses" if any("missed" in v for v in verdict) else "how the kernel does it"
    return f"""All figures below were printed by the scripts in `benchmarks/` (raw outputs in `docs/results/`; this
section is rebuilt from them by `benchmarks/readme_tables.py`), each measured side by side in one run.

**Attention** — `python benchmarks/bench_cpu_attention.py [--causal] [--dtype bfloat16 --eager-max 2048]`
(SA = `sa_attention` with `backend="auto"`, i.e. the fused C++ kernel on the CPU; SA plain = `normalize=False`;
naive eager SA = materialized, the way the authors' GPT-NeoX patch computes it; implementations timed alternately in
one process, medians; peak = resident-memory high-water mark of a fresh process minus its inputs; what the kernel
does and why a ratio is what it is: [`docs/cpu_kernel.md`](docs/cpu_kernel.md)):

{plain}

{causal}

{bf16}

{bf16_causal}

Against the project's targets ({why}: [`docs/cpu_kernel.md`](docs/cpu_kernel.md)):
{chr(10).join("- " + v for v in verdict)}.

**Training throughput**, a 4-layer, 256-wide GPT at sequence length 512, softmax (SDPA) vs SA-Softmax —
`python benchmarks/bench_train.py --seq 512 --batch 4 --layers 4 --width 256 --dtype float32 --positional alibi,rope`
(and `--dtype bfloat16 --steps 2 --warmup 1 --rounds 3`):

```
{_read("train_throughput.txt")}
```

**Hugging Face decoding**, tiny Llama, `sdpa` vs `sa_softmax` — `python benchmarks/bench_hf_decode.py`:

```
{_read("hf_decode.txt")}
```

**The kernel's score products**, K/V packed once per call into panels (the default) against BLAS repacking them per
block, SDPA alongside — `python benchmarks/bench_cpu_scores.py [--dtype bfloat16]`:

{_read("cpu_scores.md")}

{_read("cpu_scores_bf16.md")}
"""


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"readme_tables: README.md has no {START} ... {END} markers")
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{section()}{END}", text, flags=re.S)
    readme.write_text(new)
    print("README.md benchmark section rebuilt from docs/results/")


if __name__ == "__main__":
    main()
