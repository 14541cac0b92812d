#!/usr/bin/env bash
# Every benchmark in one run, on this machine, each printing its ratios against its peer and its
# goal; the raw output of each lands in out/bench/<name>.txt. docs/BENCHMARKS.md holds the latest
# tables. Run on a quiet machine: timings on a shared 2-core box are not worth recording.
#   bash bench/run_all.sh            (llama.cpp and torchao rows: bash bench/setup_peers.sh first)
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
mkdir -p out/bench
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
for bench in bench_parse bench_cost_model bench_solver bench_kernels bench_decode bench_predictions; do
  echo "== $bench"
  .venv/bin/python "bench/$bench.py" 2>&1 | tee "out/bench/$bench.txt" || status=1
done
exit $status
