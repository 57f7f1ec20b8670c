#!/usr/bin/env bash
# Create ./.venv (if needed) and install the pinned requirements plus this package (editable).
# Usage: bash scripts/setup.sh [main|test|serve]   (default: test, which includes everything main needs; serve makes
# .venv-serve with vLLM, whose pins differ from the main stack's)
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-test}"
req="requirements/${which}.txt"
[ -f "$req" ] || { echo "setup.sh: unknown requirement set '$which' (expected main, test or serve)" >&2; exit 2; }
PY="${PYTHON:-python3}"
venv=.venv
[ "$which" = serve ] && venv=.venv-serve
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
# Re-install only when the requirement files or pyproject changed since the last successful setup.
stamp="$venv/.sasoftmax-setup-$which"
digest=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  "$venv/bin/python" -m pip install --quiet -r "$req"
  if [ -f "requirements/${which}-nodeps.txt" ]; then
    "$venv/bin/python" -m pip install --quiet --no-deps -r "requirements/${which}-nodeps.txt"
  fi
  if [ "$which" = serve ]; then
    # CUDA builds that vLLM pulls in and that fail to import beside the CPU torch; text models need none of them.
    "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$venv/bin/python" -m pip install --quiet --no-deps -e .
  echo "$digest" > "$stamp"
fi
# Build the fused CPU attention kernel here, once (cached inside .venv, keyed by its sources and the torch version),
# so that the tests and the main job do not pay for it. Without a C++ compiler this warns and everything runs on the
# chunked backend instead.
"$venv/bin/python" -c "from sasoftmax.attention.backends.cpp import build; raise SystemExit(build.main())" \
  || echo "setup.sh: continuing without the fused CPU attention kernel" >&2
