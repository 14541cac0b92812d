"""Prefill of the real SmolLM2 (int4 g32 asym + int8 head, lwdsl's native int layers) in the two
precisions lwdsl's prefill can multiply in: float32 (every earlier round's path) and bfloat16 (oneDNN's
bf16 matmul: AMX on Intel Xeons, AVX512-BF16 on Zen 4), interleaved in one process.

    PYTHONPATH=. .venv/bin/python bench/bench_prefill.py [--rows 64,512,2048] [--rounds 3] [--threads 2]

Prints one row per prompt length: median (best) seconds of `LeanLlama.forward` over random token ids
in each precision, the ratio, and which one this CPU's probe chose (`prefill.int_dtype`)."""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from lwdsl import ast
from lwdsl.apply.native import prefill_dtype
from lwdsl.apply.quantize import quantize_linears
from lwdsl.hardware.cpu import identity
from lwdsl.models.load import load_model
from lwdsl.runtime.generate import LeanLlama
from lwdsl.solution import QuantFormat

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,512,2048")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(ast.ModelBlock(source=f"gguf:{GGUF}", scheme="gguf", location=str(GGUF)), GGUF.parent)
    model = copy.deepcopy(model)
    quantize_linears(model, QuantFormat(dtype="int4", group=32, symmetric=False), skip=("lm_head",))
    quantize_linears(model, QuantFormat(dtype="int8"))
    rows = [int(r) for r in args.rows.split(",")]
    runner = LeanLlama(model, max(rows) + 8)
    chosen = {r: str(prefill_dtype(r)).removeprefix("torch.") for r in rows}
    times: dict[tuple[int, str], list[float]] = {}
    forced = os.environ.get("LWDSL_PREFILL_DTYPE")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(args.rounds):
            for r in rows:
                ids = torch.randint(0, 40000, (1, r), generator=generator)
                for dtype in ("fp32", "bf16"):
                    os.environ["LWDSL_PREFILL_DTYPE"] = dtype
                    began = time.perf_counter()
                    runner.forward(ids, 0)
                    times.setdefault((r, dtype), []).append(time.perf_counter() - began)
    if forced is None:
        os.environ.pop("LWDSL_PREFILL_DTYPE", None)
    print(f"CPU: {identity()}; {args.threads} threads; {args.rounds} rounds; load {os.getloadavg()[0]:.2f}")
    print("| tokens | fp32 s median (best) | bf16 s median (best) | fp32 / bf16 | probe's choice |")
    print("|---:|---:|---:|---:|---|")
    for r in rows:
        f32, b16 = times[(r, "fp32")], times[(r, "bf16")]
        print(f"| {r} | {statistics.median(f32):.3f} ({min(f32):.3f}) | {statistics.median(b16):.3f} ({min(b16):.3f}) "
              f"| {statistics.median(f32) / statistics.median(b16):.2f}x | {chosen[r]} |")


if __name__ == "__main__":
    main()
