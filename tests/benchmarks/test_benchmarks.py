"""Smoke tests of the benchmark scripts: they run end to end at toy sizes and write what their docs say.

Timings are never asserted (the guide forbids timed tests); only that the scripts work and produce their tables."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_benchmark_exits_cleanly_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("triton")
    mod = _load("bench_gpu_attention")
    assert mod.main(["--lengths", "128"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gpu_benchmark_table_format(tmp_path: Path) -> None:
    mod = _load("bench_gpu_attention")
    rows = [
        {"D": 64, "causal": True, "N": 1024, "B": 16, "H": 32, "method": "SDPA flash", "fwd_ms": 1.0,
         "fwd_tflops": 100.0, "fb_ms": 3.0, "fb_tflops": 120.0, "peak_mib": 10.0, "vs_flash": 1.0},
        {"D": 64, "causal": True, "N": 1024, "B": 16, "H": 32, "method": "SA eager", "note": "OOM"},
    ]
    out = tmp_path / "bench.md"
    mod._write_markdown(str(out), rows, ["D=128 causal=False N=16384 (time budget)"], "GPU X", 12.0, "t", "tr")
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| SA eager |" in text and "OOM" in text and "GPU X" in text and "time budget" in text
    assert "1.00" in mod._fmt_line(rows[0]) and mod._fmt_line(rows[1]).endswith("OOM")


def test_cpu_scores_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "scores.md"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_scores.py"), "--lengths", "40", "--batch", "1",
         "--heads", "2", "--head-dim", "8", "--reps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    if res.returncode == 2:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 40 ")]
    assert [r.split(" | ")[1] for r in rows] == ["fwd+bwd", "fwd"]
    assert all(sum(c.strip().endswith("x") for c in r.split("|")) == 4 for r in rows), rows  # the four ratios


def test_cpu_attention_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "cpu.md"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_attention.py"), "--lengths", "64", "--batch", "1",
         "--heads", "2", "--head-dim", "16", "--reps", "1", "--causal", "--dtype", "bfloat16", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 64 ")]
    assert len(rows) == 2  # the time table and the memory table
    assert "bfloat16" in text and "SA = sa_attention(backend='auto') -> cpp" in text
    assert "failed" not in rows[1] and rows[0].count("x |") == 4  # every ratio was computed
    mod = _load("readme_tables")
    # (at this toy size the peaks can round to 0 MiB, so the memory ratio may read n/a; the column must exist)
    assert mod._cell(text, 64, mod.TIME_RATIO).endswith("x") and mod._cell(text, 64, mod.MEMORY_RATIO) is not None


def test_readme_and_benchmarks_page_hold_what_the_result_files_say() -> None:
    """The README's summary and docs/results/benchmarks.md are what readme_tables.py builds from the committed
    result files (no figure typed in, none stale)."""
    mod = _load("readme_tables")
    assert mod.summary() in (ROOT / "README.md").read_text()
    assert mod.section() in (ROOT / "docs" / "results" / "benchmarks.md").read_text()


def test_varlen_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "varlen.md"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_varlen.py"), "--docs", "3", "--length", "24", "--heads",
         "2", "--head-dim", "8", "--reps", "1", "--memory", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert set(rows) >= {"varlen", "separate", "padded", "dense"}
    assert rows["separate"].split(" | ")[2] == "1.00x"
    assert all(r.split(" | ")[2].endswith("x") for name, r in rows.items() if name != "method"), rows
