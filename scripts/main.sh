#!/usr/bin/env bash
# Set up ./.venv (pinned CPU stack) and run the main job: gradient demo, then tiny softmax vs SA-Softmax GPTs
# trained side by side and compared at 1x..8x the training length. Arguments go to `sasoftmax compare`
# (e.g. --data PATH, --out DIR, --set max_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh main
exec .venv/bin/sasoftmax compare "$@"
