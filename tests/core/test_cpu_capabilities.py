"""The fused CPU kernel built for, and run under, each instruction set this CPU supports.

``ATEN_CPU_CAPABILITY=default|avx2|avx512`` lowers what torch dispatches to, and with it what
:mod:`sasoftmax.attention.backends.cpp` compiles (its build is keyed by the flags). The whole suite runs the native
build; here a fresh process per lower capability builds that variant and runs the kernel's part of the float64
oracle matrix and its own accuracy tests with it, so that the DEFAULT (scalar) and, on AVX-512 machines, the AVX2
builds are exercised, not only compiled. A capability the CPU lacks is skipped, naming the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasoftmax.attention.backends import cpp as cpp_backend
from sasoftmax.utils import cpu_name

ROOT = Path(__file__).resolve().parents[2]
_DISABLED = os.environ.get("SASOFTMAX_CPP", "").strip() in ("0", "false", "no", "off")
pytestmark = pytest.mark.skipif(_DISABLED, reason="kernel disabled (SASOFTMAX_CPP=0)")

# the kernel's slice of the oracle matrix (every case on cpp / cpp-b1 / cpp-b3, float64 and float32 with panels),
# its edge cases, and the kernel's own tests (accuracy rules, many key blocks, dropout, threads, fallbacks)
SUBSET = ["tests/core/test_attention.py", "tests/core/test_edge_cases.py", "tests/core/test_cpp_backend.py",
          "-k", "cpp"]


def test_hardware_capabilities_are_ordered_and_include_the_native_build():
    caps = cpp_backend.hardware_capabilities()
    assert caps[0] == "DEFAULT" and list(caps) == sorted(caps, key=["DEFAULT", "AVX2", "AVX512"].index)
    assert cpp_backend.extension().capability() in caps


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_kernel_matches_the_oracle_under_capability(cap: str):
    native = cpp_backend.extension().capability()
    if cap == native:
        pytest.skip(f"{cap} is this machine's native build, which the whole suite runs")
    if cap not in cpp_backend.hardware_capabilities():
        pytest.skip(f"this CPU ({cpu_name()}) cannot run the {cap} build")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap.lower()}
    probe = subprocess.run(
        [sys.executable, "-c", "from sasoftmax.attention.backends import cpp as c; print(c.extension().capability())"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip().splitlines()[-1] == cap, probe.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *SUBSET],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert tests.returncode == 0, f"under ATEN_CPU_CAPABILITY={cap.lower()}:\n{tests.stdout[-6000:]}"
    assert " passed" in tests.stdout
