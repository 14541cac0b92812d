#!/usr/bin/env bash
# The README's main command: the whole path on the default SmolLM2 plan, on this machine.
#   validate -> profile -> solve -> apply -> check, then the final report; exits with check's code
#   (0: every `require` line holds as measured, 1: one does not, 2: bad input).
# Usage: bash scripts/demo.sh [PLAN] [OUT_DIR]     (defaults: plans/smollm2_edge.lwp, out/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
PLAN=${1:-plans/smollm2_edge.lwp}
OUT=${2:-out/demo}
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
lwdsl() { .venv/bin/python -m lwdsl "$@"; }
mkdir -p "$OUT"

echo "== validate $PLAN"
lwdsl validate "$PLAN"
echo "== profile (cached after the first run)"
lwdsl profile "$PLAN"
echo "== solve"
lwdsl solve "$PLAN" --out "$OUT/solution.json"
echo "== apply"
lwdsl apply "$PLAN" -o "$OUT/artifact" --solution "$OUT/solution.json"
echo "== check"
set +e
lwdsl check "$PLAN" --artifact "$OUT/artifact" --junit "$OUT/check.xml" --markdown "$OUT/check.md"
code=$?
set -e
echo "reports: $OUT/check.xml $OUT/check.md (exit $code)"
exit "$code"
