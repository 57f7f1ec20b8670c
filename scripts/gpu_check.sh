#!/usr/bin/env bash
# One-command GPU check of the fused Triton SA kernel.
#
#   scripts/gpu_check.sh            # results in $OUT if set, else ./gpu_results
#
# 1. pytest tests/core/test_triton.py and tests/gpu/test_devices.py on CUDA: every test of the files (the small CPU-equivalent
#    cases run on the GPU with the compiled kernels, bf16 added) including the `gpu`-marked tests with realistic
#    shapes, and every normalizer's model training on CUDA and matching its CPU run;
# 2. the benchmark benchmarks/bench_gpu_attention.py (bf16, SA vs SDPA flash vs eager SA), markdown table to
#    $RESULTS/bench.md.
# Environment: PYTHON (default: .venv/bin/python if it exists and sees CUDA, else python3), JOBS (pytest-xdist workers,
# default 8; kernels compile in parallel that way), BENCH_ARGS (extra benchmark arguments, e.g. "--time-budget 240"),
# STAGES (default "tests bench"; "tests" or "bench" alone runs one stage, e.g. to fit a 10-minute command limit).
# Exit status: non-zero if the tests failed or the benchmark failed.
set -u
cd "$(dirname "$0")/.."

RESULTS="${OUT:-./gpu_results}"
mkdir -p "$RESULTS"

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PYTHON; nothing to check." | tee "$RESULTS/summary.txt"
    exit 2
fi

{
    echo "date: $(date -u)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$RESULTS/env.txt"

XDIST=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${JOBS:-8}")
fi

STAGES="${STAGES:-tests bench}"
test_rc=0
if [[ " $STAGES " == *" tests "* ]]; then
    echo "== pytest tests/core/test_triton.py tests/gpu/test_devices.py on CUDA (gpu-marked tests included) =="
    start=$(date +%s)
    "$PYTHON" -m pytest tests/core/test_triton.py tests/gpu/test_devices.py -q -rs "${XDIST[@]}" \
        --junitxml="$RESULTS/pytest.xml" 2>&1 \
        | tee "$RESULTS/pytest.log"
    test_rc=${PIPESTATUS[0]}
    echo "pytest exit $test_rc after $(( $(date +%s) - start )) s" | tee -a "$RESULTS/summary.txt"
fi

bench_rc=0
if [[ " $STAGES " == *" bench "* ]]; then
    echo "== benchmark =="
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/bench_gpu_attention.py --out "$RESULTS/bench.md" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/bench.log"
    bench_rc=${PIPESTATUS[0]}
    echo "benchmark exit $bench_rc after $(( $(date +%s) - start )) s" | tee -a "$RESULTS/summary.txt"
fi

if [ "$test_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    exit 1
fi
exit 0
