"""Rebuild the benchmark tables from the result files the benchmark scripts wrote (docs/results/): the full section
in docs/results/benchmarks.md and the summary table in the README.

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
    python benchmarks/bench_varlen.py --memory --out docs/results/varlen_cpu.md
    .venv-serve/bin/python benchmarks/bench_vllm.py --repeats 9 --out docs/results/vllm_cpu.md
    python benchmarks/readme_tables.py

Only text between the ``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers of the two files changes; every
figure in them is copied from the result files, which carry their own date and machine line.
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



def _when_where(table: str) -> str:
    """``2026-12-01, AMD EPYC (AVX2)`` from a bench_cpu_attention header line (``— DATE TIME UTC, CPU, ...``)."""
    m = re.search(r"— (\d{4}-\d\d-\d\d) [\d:]+ UTC, ([^,]+),", table)
    return f"{m.group(1)}, {m.group(2)}" if m else "date and machine in the file"


def _train_ratios(text: str) -> tuple[str, str]:
    """(``alibi 1.050 / rope 1.015`` in float32, the first header's date and CPU) of bench_train's output."""
    ratios = re.findall(r", (\w+), float32;.*?\n.*?\n.*?\n\s+ratio sa_softmax/softmax = ([\d.]+)", text)
    m = re.search(r"bench_train\s+(\d{4}-\d\d-\d\d)\S*\s+\S+\s+(.+?\))", text)
    where = f"{m.group(1)}, {m.group(2)}" if m else "date and machine in the file"
    return " / ".join(f"{pos} {r}" for pos, r in ratios), where


def _decode_ratio(text: str) -> tuple[str, str]:
    m = re.search(r"^ratio\s+([\d.]+)\s+([\d.]+)", text, flags=re.M)
    d = re.search(r"^date\s+(\d{4}-\d\d-\d\d)", text, flags=re.M)
    cpu = re.search(r"^machine\s+\S+ ([^,]+),", text, flags=re.M)
    return (f"prefill {m.group(1)}x, decode {m.group(2)}x" if m else "?",
            f"{d.group(1) if d else '?'}, {cpu.group(1) if cpu else '?'}")


def _vllm_ratios(text: str) -> tuple[str, str]:
    """(``decode 1.08x / 1.04x, prefill 1.04x / 1.14x (batch 1 / 8)``, date and CPU) of bench_vllm.py's table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[cells[0]] = cells
    batches = sorted(rows, key=int)
    # columns: batch, prefill softmax, prefill SA, prefill ratio, decode softmax, decode SA, decode ratio, ...
    decode = " / ".join(rows[b][6] for b in batches)
    prefill = " / ".join(rows[b][3] for b in batches)
    m = re.search(r", (\d{4}-\d\d-\d\d), ([^,]+),", text)
    where = f"{m.group(1)}, {m.group(2)}" if m else "date and machine in the file"
    return f"decode {decode}, prefill {prefill} (batch {' / '.join(batches)})", where


def summary() -> str:
    """The README's one table: each headline ratio, when and where it was measured, and its full table."""
    plain, causal = _read("cpu_attention.md"), _read("cpu_attention_causal.md")
    bf16, bf16_causal = _read("cpu_attention_bf16.md"), _read("cpu_attention_bf16_causal.md")
    train, train_where = _train_ratios(_read("train_throughput.txt"))
    decode, decode_where = _decode_ratio(_read("hf_decode.txt"))
    served, served_where = _vllm_ratios(_read("vllm_cpu.md"))
    full = "[table](docs/results/benchmarks.md)"

    def row(what: str, table: str, columns: tuple[str, ...]) -> str:
        cells = " / ".join(c for n in LENGTHS if (c := _cell(table, n, columns)) is not None)
        return f"| {what} | {cells} (N = {' / '.join(map(str, LENGTHS))}) | {_when_where(table)} | {full} |"

    rows = [
        row("SA / SDPA time, forward+backward, fp32", plain, TIME_RATIO),
        row("the same, causal", causal, TIME_RATIO),
        row("the same, bf16", bf16, TIME_RATIO),
        row("the same, bf16 causal", bf16_causal, TIME_RATIO),
        row("SA / SDPA time, forward alone, fp32", plain, ("SA/SDPA fwd",)),
        row("SA / naive eager SA, peak memory, fp32", plain, MEMORY_RATIO),
        f"| SA / softmax training tokens/s (4x256 GPT, length 512, fp32) | {train} | {train_where} | {full} |",
        f"| SA / SDPA, tiny Llama in transformers | {decode} | {decode_where} | {full} |",
        f"| SA / softmax time under vLLM (its CPU_ATTN), tiny Llama | {served} | {served_where} | "
        "[table](docs/results/vllm_cpu.md) |",
    ]
    return ("CPU, 2 threads; every figure printed by a script in `benchmarks/` that times ours and the baseline "
            "alternately in one process (medians), copied here by `benchmarks/readme_tables.py`:\n\n"
            "| measured | ratio | when, where | full table |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


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

**Packed documents**: `sa_attention_varlen` against separate calls per document, the documents padded to the longest,
and one call over the packed row with a dense block-diagonal causal mask — `python benchmarks/bench_varlen.py
--memory`:

{_read("varlen_cpu.md")}
"""


def _rewrite(path: Path, body: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        sys.exit(f"readme_tables: {path.name} has no {START} ... {END} markers")
    path.write_text(re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{body}{END}", text,
                           flags=re.S))


def main() -> None:
    _rewrite(RESULTS / "benchmarks.md", section())
    _rewrite(ROOT / "README.md", summary())
    print("docs/results/benchmarks.md and the README's summary rebuilt from docs/results/")


if __name__ == "__main__":
    main()
