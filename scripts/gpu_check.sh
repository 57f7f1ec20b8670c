#!/usr/bin/env bash
# One-command GPU check of the fused Triton SA kernel; made to finish within 8 minutes on one H200.
#
#   scripts/gpu_check.sh            # results in $OUT if set, else ./gpu_results
#
# Stages (STAGES, default "tests bench"; "tests" or "bench" alone runs one of them):
# 1. tests (pytest on CUDA, compiled kernels):
#    - tests/gpu/test_triton_gpu.py: realistic shapes (N = 1000, bf16 and fp16, D = 64/128, causal or not, both
#      forms) on both backward paths (fast = atomics, deterministic), bitwise repeatability of the deterministic
#      path, an attention-sink token (range correction of 2048 rows on one key), GQA + bias + ALiBi, dropout,
#      D = 96/256, float32, B*H = 70000 (> 65535), torch.compile(fullgraph=True) with Inductor, O(N) memory,
#      sliding windows with soft-capping (N = 1000), packed documents (varlen) with and without a window;
#    - a chosen subset of tests/core/test_triton.py against float64 (every variant, float32/half, dropout, bias
#      gradients in every broadcast layout (atomics / partials), range correction, single-key rows, masked rows,
#      windows, soft-capping and the kernels' tanh);
#    - tests/gpu/test_devices.py (every normalizer's model trains on CUDA and matches its CPU run).
#    Capped at TESTS_TIMEOUT seconds (default 240).
# 2. bench: benchmarks/bench_gpu_attention.py (bf16, D = 64/128, causal and not, N = 1k..16k: SA normalized and
#    plain through the kernel vs SDPA flash vs eager SA; forward for inference, forward for training and
#    forward+backward TFLOP/s; every SA row checked against the chunked backend), markdown table in
#    $RESULTS/bench.md. Its time budget is what is left of TOTAL_BUDGET (default 450 s) minus a margin.
# Environment: PYTHON (default: .venv/bin/python if it exists and sees CUDA, else python3), JOBS (pytest-xdist
# workers, default 12: kernels compile in parallel that way), BENCH_ARGS (extra benchmark arguments),
# TESTS_TIMEOUT, TOTAL_BUDGET, STAGES.
# Files: env.txt, pytest.log, pytest.xml, bench.log, bench.md, summary.txt.
# Exit status: 2 without a GPU; non-zero if the tests or the benchmark (including its correctness checks) failed.
set -u
cd "$(dirname "$0")/.."
t0=$(date +%s)

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
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

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
    XDIST=(-n "${JOBS:-12}")
fi

STAGES="${STAGES:-tests bench}"
TOTAL_BUDGET="${TOTAL_BUDGET:-450}"
SUBSET="variants or bias_with_grad or test_half or dropout_matches or range_correction or deterministic_path or single_key or fully_masked or test_window or test_softcap or tanh"
test_rc=0
if [[ " $STAGES " == *" tests "* ]]; then
    echo "== pytest on CUDA: tests/gpu/test_triton_gpu.py, tests/core/test_triton.py (-k subset), tests/gpu/test_devices.py =="
    start=$(date +%s)
    timeout "${TESTS_TIMEOUT:-240}" "$PYTHON" -m pytest tests/gpu/test_triton_gpu.py tests/core/test_triton.py \
        tests/gpu/test_devices.py -k "test_triton_gpu or test_devices or $SUBSET" -q -rs "${XDIST[@]}" -p no:cacheprovider \
        --junitxml="$RESULTS/pytest.xml" 2>&1 | tee "$RESULTS/pytest.log"
    test_rc=${PIPESTATUS[0]}
    [ "$test_rc" -eq 124 ] && echo "pytest stopped by the ${TESTS_TIMEOUT:-240} s timeout" | tee -a "$RESULTS/pytest.log"
    echo "pytest exit $test_rc after $(( $(date +%s) - start )) s" | tee -a "$RESULTS/summary.txt"
fi

bench_rc=0
if [[ " $STAGES " == *" bench "* ]]; then
    left=$(( TOTAL_BUDGET - ($(date +%s) - t0) - 60 ))
    [ "$left" -lt 60 ] && left=60
    echo "== benchmark (time budget ${left} s) =="
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/bench_gpu_attention.py --out "$RESULTS/bench.md" --time-budget "$left" ${BENCH_ARGS:-} 2>&1 \
        | tee "$RESULTS/bench.log"
    bench_rc=${PIPESTATUS[0]}
    echo "benchmark exit $bench_rc after $(( $(date +%s) - start )) s" | tee -a "$RESULTS/summary.txt"
fi
echo "gpu_check total $(( $(date +%s) - t0 )) s" | tee -a "$RESULTS/summary.txt"

if [ "$test_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    exit 1
fi
exit 0
