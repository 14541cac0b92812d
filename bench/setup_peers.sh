#!/usr/bin/env bash
# The benchmarks' peers in their own venv (bench/.venv, gitignored; never a dependency of lwdsl):
# llama-cpp-python built from source for THIS CPU (GGML_NATIVE: the ISA the compiler sees here; its
# AMX paths off, they crashed on the Intel VM the first benchmarks ran on) and torchao, with the same
# torch build as lwdsl's venv. Idempotent: a venv that already imports both is kept.
#
#   bash bench/setup_peers.sh            # ~20 min on 2 cores the first time (llama.cpp's C++ build)
#   LWDSL_BENCH_VENV=/elsewhere bash bench/setup_peers.sh
#
# bench/bench_decode.py runs its llama.cpp and torchao rows with this venv's Python
# (LWDSL_BENCH_PYTHON overrides it); a peer that cannot run there is an error row in its table.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LWDSL_BENCH_VENV:-bench/.venv}
PY=${PYTHON:-python3}
if "$VENV/bin/python" -c "import llama_cpp, torchao" 2>/dev/null; then
  echo "$VENV: llama-cpp-python $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'), torchao ready"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
BPY="$VENV/bin/python"
"$BPY" -m pip install -q --upgrade pip
TORCH_VERSION=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || echo "2.13.0")
"$BPY" -m pip install -q "torch==$TORCH_VERSION" || "$BPY" -m pip install -q "torch>=2.4"
"$BPY" -m pip install -q numpy gguf torchao
export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_NATIVE=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
"$BPY" -m pip install -q --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
"$BPY" -c "import llama_cpp, torchao; print('llama-cpp-python', llama_cpp.__version__, '/ torchao', torchao.__version__)"
