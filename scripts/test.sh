#!/usr/bin/env bash
# Set everything up from nothing but Python + pip, then lint, type-check src/ and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`). Without arguments the serving tests
# (tests/serve) then run in their own environment, .venv-serve, with vLLM (skipped, saying so, where it cannot be
# installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/mypy  # src/sasoftmax, configured in pyproject.toml
# Two workers, one intra-op thread each: on a 2-core machine this is much faster than two threads fighting.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q "$@" || status=$?
if [ $# -eq 0 ]; then
  if bash scripts/setup.sh serve; then
    .venv-serve/bin/python -m pytest -q tests/serve || status=$?
  else
    echo "test.sh: vLLM could not be installed on this machine; the serving tests (tests/serve) did not run" >&2
  fi
fi
exit $status
