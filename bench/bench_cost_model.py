"""Predicted vs measured fp32 decode time per token on the real SmolLM2-135M, after a fresh probe.

    .venv/bin/python bench/bench_cost_model.py [--threads 2] [--context 128] [--generate 64]

1. probes this machine (`lwdsl.hardware.probe.measure`, the same threads as the decode loop);
2. predicts `latency.token_s` with the cost model (inventory from the GGUF, `device cpu "local"`),
   twice: as lwdsl's executor runs it (the fused native step, `lwdsl.runtime.fused`), and as an
   eager torch loop (the same device without the probe's fused figures);
3. measures both: lwdsl's lean decode loop (`lwdsl.runtime.generate.decode`, fused), and a
   transformers decode loop (KV cache, greedy, fp32, op by op): the median step time of each;
4. prints the ratio predicted / measured of each (goal: within 10%).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure_decode(model, context: int, generate: int, repeats: int) -> tuple[list[float], list[float], list[float]]:
    """Per-step (wall, process CPU) seconds of `generate` greedy decode steps after a `context`-token
    prefill, and streaming-read bandwidth samples taken between the steps (the probe's own kernel on a
    128 MiB matrix), i.e. what the memory gave at the moments the loop ran."""
    import torch
    from transformers import DynamicCache

    steps: list[float] = []
    cpu_steps: list[float] = []
    bandwidth: list[float] = []
    matrix = torch.ones(8192, 4096)
    vector = torch.ones(4096)
    prompt = torch.randint(100, 40_000, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(repeats):
            cache = DynamicCache()
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(generate):
                t0, c0 = time.perf_counter(), time.process_time()
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                steps.append(time.perf_counter() - t0)
                cpu_steps.append(time.process_time() - c0)
                t0 = time.perf_counter()
                torch.mv(matrix, vector)
                bandwidth.append(matrix.numel() * 4 / (time.perf_counter() - t0))
    return steps, cpu_steps, bandwidth


def measure_fused(model, context: int, generate: int, repeats: int) -> list[float]:
    """Per-step wall seconds of lwdsl's own decode loop (the fused native step where it applies)."""
    import torch

    from lwdsl.runtime.generate import decode

    prompt = torch.randint(100, 40_000, (1, context), generator=torch.Generator().manual_seed(0))
    steps: list[float] = []
    for _ in range(repeats):
        run = decode(model, prompt, generate + 1, stop_at_eos=False)
        assert run.step == "fused", run.step
        steps += run.token_s
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for probe and decode (1: robust on a shared machine)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe-budget", type=float, default=1.0, help="seconds per probe figure")
    args = parser.parse_args(argv)

    import torch

    from lwdsl import ast
    from lwdsl.cost import breakdown
    from lwdsl.hardware.probe import measure, write_cache
    from lwdsl.hardware.resolve import resolve_target
    from lwdsl.inventory import load_inventory
    from lwdsl.models.fetch import fetch_smollm2
    from lwdsl.models.load import load_model

    torch.set_num_threads(args.threads)
    gguf = fetch_smollm2(ROOT / "models")
    block = ast.ModelBlock(source=f"gguf:{gguf}", scheme="gguf", location=str(gguf))
    model, _ = load_model(block, ROOT)
    inventory = load_inventory(block, ROOT)

    figures = measure("cpu", budget_s=args.probe_budget)
    print(f"probe: {figures['threads']} threads, streaming read {figures['bandwidth_Bps'] / 1e9:.2f} GB/s, "
          f"copy {figures['copy_Bps'] / 1e9:.2f} GB/s, fp32 matmul {figures['rates']['fp32'] / 1e9:.1f} GFLOP/s, "
          f"eager op overhead {figures['op_overhead_s'] * 1e6:.2f} us")
    with tempfile.TemporaryDirectory() as folder:  # the plan's `device cpu0 cpu "local"`, read from the probe cache
        cache = write_cache(figures, Path(folder) / "probe.json")
        device = ast.Device(name="cpu0", kind="cpu", catalog="local")
        target = resolve_target(ast.Target(devices=(device,)), probe_cache=cache, run_probe=False)
    workload = ast.InferenceWorkload(batch=1, context=args.context, generate=args.generate)
    fused_result = breakdown(inventory, target, workload)
    fused_steps = measure_fused(model, args.context, args.generate, args.repeats)
    fused_measured = statistics.median(fused_steps)
    print(f"lwdsl decode loop (fused native step): predicted {fused_result.predicted.latency.token_s * 1e3:.2f} "
          f"ms/token, measured median {fused_measured * 1e3:.2f} ms/token, ratio "
          f"{fused_result.predicted.latency.token_s / fused_measured:.3f}")
    for name, part in fused_result.time_by_component.items():
        print(f"  predicted {name:<10} {part.token_s * 1e3:8.3f} ms/token")

    # the eager loop: the same device without the fused step's figures
    target = target.model_copy(update={"devices": {"cpu0": target.device("cpu0").model_copy(
        update={"fused_stream": {}})}})
    result = breakdown(inventory, target, workload)
    predicted = result.predicted.latency.token_s

    steps, cpu_steps, bandwidth = measure_decode(model, args.context, args.generate, args.repeats)
    measured = statistics.median(steps)
    ratio = predicted / measured
    print(f"transformers eager loop, SmolLM2-135M fp32, batch 1, context {args.context}, {args.generate} "
          f"generated tokens x {args.repeats}")
    for name, part in result.time_by_component.items():
        print(f"  predicted {name:<10} {part.token_s * 1e3:8.3f} ms/token")
    print(f"predicted decode {predicted * 1e3:.2f} ms/token; measured median {measured * 1e3:.2f} ms/token "
          f"(p10 {sorted(steps)[len(steps) // 10] * 1e3:.2f}, p90 {sorted(steps)[9 * len(steps) // 10] * 1e3:.2f})")
    print(f"ratio predicted/measured = {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.10 else 'outside'} 10%)")
    if args.threads == 1:  # one thread: process CPU time is the step's own time, whatever else runs here
        cpu = statistics.median(cpu_steps)
        print(f"measured median CPU time {cpu * 1e3:.2f} ms/token; ratio predicted/CPU time = {predicted / cpu:.3f}")
    during = statistics.median(bandwidth)
    same_moment = target.model_copy(update={"devices": {"cpu0": target.device("cpu0").model_copy(
        update={"bandwidth_Bps": during})}})
    predicted_during = breakdown(inventory, same_moment, workload).predicted.latency.token_s
    print(f"streaming read between the decode steps: median {during / 1e9:.2f} GB/s; predicted with it "
          f"{predicted_during * 1e3:.2f} ms/token, ratio to measured median {predicted_during / measured:.3f}")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(a shared machine inflates the measured side; rerun on a quiet one)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
