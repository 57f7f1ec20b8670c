#!/usr/bin/env bash
# Run the transformers integration and export tests against another transformers release, in a separate venv.
#   TRANSFORMERS=5.17.0 bash scripts/compat_hf.sh      # the version of the project's GPU image
# The venv goes to ${VENV:-.venv-hf-$TRANSFORMERS}; torch and the test tools come from requirements/ (same pins).
set -euo pipefail
cd "$(dirname "$0")/.."
ver="${TRANSFORMERS:?set TRANSFORMERS to a transformers version, e.g. TRANSFORMERS=5.17.0}"
venv="${VENV:-.venv-hf-$ver}"
PY="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
pins() { grep -E "^($1)==" requirements/main.txt requirements/test.txt | cut -d: -f2; }
# shellcheck disable=SC2046
"$venv/bin/python" -m pip install --quiet $(pins 'torch|numpy|tokenizers|matplotlib|pytest|hypothesis') "transformers==$ver"
"$venv/bin/python" -m pip install --quiet --no-deps -e .
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$venv/bin/python" -m pytest tests/integrations/test_hf.py tests/integrations/test_nn.py tests/lm/test_export.py -q -p no:cacheprovider "$@"
