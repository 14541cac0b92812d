#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): the serving executor on a CUDA card, predicted vs
# measured, next to plain torch. Run from the repository root after `bash scripts/setup.sh`:
#   bash bench/gpu_check.sh                  # prints "skipped: no CUDA device" (exit 0) without a card
#   bash bench/gpu_check.sh --cpu-dry-run    # every step on the CPU, small
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -u bench/gpu_check.py "$@"
