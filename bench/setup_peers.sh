#!/usr/bin/env bash
# The benchmarks' peers in their own venv (bench/.venv, gitignored; never a dependency of lwdsl):
# llama-cpp-python built from source for THIS CPU (the ISA it has; its AMX paths off, they crash on
# the Intel VMs these benchmarks run on) and torchao, with the same
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
# (a build whose ggml has AMX on an AMX CPU is rebuilt: it crashes there)
if "$VENV/bin/python" -c "import llama_cpp, torchao, sys; sys.exit(b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())" 2>/dev/null; then
  echo "$VENV: llama-cpp-python $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'), torchao ready"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
BPY="$VENV/bin/python"
"$BPY" -m pip install -q --upgrade pip
TORCH_VERSION=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || echo "2.13.0")
"$BPY" -m pip install -q "torch==$TORCH_VERSION" || "$BPY" -m pip install -q "torch>=2.4"
"$BPY" -m pip install -q numpy gguf torchao
# For this CPU, AMX excepted: with GGML_NATIVE the compiler's -march=native defines __AMX_INT8__ and
# ggml builds its AMX path whatever GGML_AMX_* say (llama-cpp-python 0.3.36 then crashes on its first
# eval on an AMX Xeon). So on a CPU that has AMX, every other ISA flag it has is named instead.
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  isa=""
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
              avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case " $flags " in *" ${pair%%:*} "*) isa="$isa -DGGML_${pair##*:}=ON";; esac
  done
  native="-DGGML_NATIVE=OFF$isa"
else
  native="-DGGML_NATIVE=ON"
fi
export CMAKE_ARGS="${CMAKE_ARGS:-} $native -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
"$BPY" -m pip uninstall -y -q llama-cpp-python 2>/dev/null || true  # a build to replace (see above)
"$BPY" -m pip install -q --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
"$BPY" -c "import llama_cpp, torchao; print('llama-cpp-python', llama_cpp.__version__, '/ torchao', torchao.__version__)"
