#!/usr/bin/env bash
# Set everything up from nothing but Python + pip, then lint, type-check src/ and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/mypy  # src/sasoftmax, configured in pyproject.toml
# Two workers, one intra-op thread each: on a 2-core machine this is much faster than two threads fighting.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q "$@"
