"""Which matmul kernel is fastest for each packed format, phase and SmolLM2 shape — measured here.

    PYTHONPATH=. .venv/bin/python bench/bench_kernels.py [--rows 1,64,256] [--threads 2]

Every candidate computes `x @ W.T` for one weight format from the same packed integers. Weights are
rotated through enough copies to exceed the last-level cache, so a 1-row (decode) figure is the
memory-bound time a real decode sees, not a cache-resident one. The table prints milliseconds per
call and, per (format, rows, shape), the winner; `lwdsl.apply.kernels.DISPATCH` is written from it.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lwdsl.apply import kernels

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in) of SmolLM2
CACHE_DEFEAT_BYTES = 96 << 20  # three times this machine's 32 MiB L3


def _time_ms(fn, calls_per_batch: int, batches: int = 7, budget_s: float = 1.5) -> float:
    """Best batch average: on a shared machine the least-disturbed batch is the kernel's own time."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls_per_batch):
            fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed / calls_per_batch), spent + elapsed
        if spent > budget_s:
            break
    return best * 1e3


def _rotating(candidate, prepared: list, x: torch.Tensor):
    index = [0]

    def call():
        index[0] = (index[0] + 1) % len(prepared)
        return candidate(x, prepared[index[0]])

    return call


def bench(rows_list: list[int]) -> list[dict]:
    results = []
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features) / in_features ** 0.5
        for format_name, candidates in kernels.CANDIDATES.items():
            quantized = kernels.QUANTIZERS[format_name](weight)
            if quantized is None:  # the format does not apply to this shape (group does not divide)
                continue
            copies = max(2, min(16, CACHE_DEFEAT_BYTES // kernels.stored_bytes(quantized)))
            for rows in rows_list:
                x = torch.randn(rows, in_features)
                reference = F.linear(x, kernels.DEQUANTIZERS[format_name](quantized))
                row = {"format": format_name, "rows": rows, "shape": (out_features, in_features),
                       "ms": {}, "error": {}}
                for name, (prepare, run) in candidates.items():
                    prepared = [prepare(quantized) for _ in range(copies)]
                    output = run(x, prepared[0]).float()
                    row["error"][name] = ((output - reference).norm() / reference.norm()).item()
                    row["ms"][name] = _time_ms(_rotating(run, prepared, x), calls_per_batch=max(4, copies))
                    del prepared
                row["winner"] = min(row["ms"], key=row["ms"].get)
                results.append(row)
                print(_format_row(row), flush=True)
    return results


def _format_row(row: dict) -> str:
    cells = "  ".join(f"{name}={ms:7.3f}ms(err {row['error'][name]:.1e})" for name, ms in row["ms"].items())
    return f"{row['format']:>9} rows={row['rows']:<4} {str(row['shape']):>13}  {cells}  -> {row['winner']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,64,256")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"quantized engine {torch.backends.quantized.engine}")
    warm = torch.randn(512, 512)
    for _ in range(50):
        warm @ warm
    bench([int(r) for r in args.rows.split(",")])


if __name__ == "__main__":
    main()
