"""Prefill of the real SmolLM2 (int4 g32 asym + int8 head, lwdsl's native int layers): lwdsl's own
prefill (`LeanLlama.forward`) in float32 (every earlier round's path: dequantized float32 matmuls,
float32 attention), all in bfloat16 (oneDNN's bf16 matmul and torch's bf16 flash attention: AMX
tiles on an Intel Xeon, AVX512-BF16 on a Zen 4), and as lwdsl runs it (each part in the dtype this
CPU's probe chose), interleaved in one process; llama.cpp on the same GGUF in the same run; the cost
model's prediction for the same formats and prompt length beside the measured time.

    PYTHONPATH=. .venv/bin/python bench/bench_prefill.py [--rows 64,512,2048] [--rounds 3] [--threads 2]
        [--ppl-windows 8] [--no-llamacpp]

Prints one row per prompt length: median (best) seconds of each path over random token ids, the
speed-ups, llama.cpp's time, and predicted / measured for lwdsl's path; then perplexity of each path
over `--ppl-windows` windows of 512 tokens of the Python docs text, every window a 512-row prefill
through the same `LeanLlama.forward` (all positions' logits), so the dtype's effect on quality is
measured where it runs."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lwdsl import ast
from lwdsl.apply.native import prefill_dtype
from lwdsl.apply.quantize import quantize_linears
from lwdsl.cost.evaluate import breakdown, default_choices
from lwdsl.hardware import resolve_target
from lwdsl.hardware.cpu import identity
from lwdsl.inventory import load_inventory
from lwdsl.models.load import load_model
from lwdsl.parse import parse_text
from lwdsl.runtime.generate import LeanLlama
from lwdsl.solution import QuantFormat
from peers import SETUP_HINT, bench_python

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
INT4 = QuantFormat(dtype="int4", group=32, symmetric=False)
INT8 = QuantFormat(dtype="int8")
PATHS = {"fp32": "fp32", "bf16": "bf16", "lwdsl": None}  # LWDSL_PREFILL_DTYPE per path (None: the probe's)
PPL_WINDOW = 512
PLAN = """plan prefill_bench {{
  model "gguf:{gguf}"
  target here {{ device cpu0 cpu "local" }}
  workload inference {{ batch 1 context {rows} generate 1 }}
  minimize latency token
}}
"""


def predicted_prefill_s(rows: int) -> float:
    """The cost model's prefill for this bench's formats (int4 g32 asym, int8 head) at `rows` tokens."""
    plan = parse_text(PLAN.format(gguf=GGUF, rows=rows))
    inventory = load_inventory(plan.model, ROOT)
    target = resolve_target(plan.target)
    choices = [c.model_copy(update={"format": INT8 if c.name == "lm_head" else INT4})
               for c in default_choices(inventory, target) if c.name != "model.embed_tokens"]
    return breakdown(inventory, target, plan.workload, choices).predicted.latency.prefill_s


def run_path(path: str | None, run):
    if path is None:
        os.environ.pop("LWDSL_PREFILL_DTYPE", None)
    else:
        os.environ["LWDSL_PREFILL_DTYPE"] = path
    return run()


def llamacpp_prefill_s(ids: torch.Tensor, threads: int, rounds: int) -> float | str:
    """llama.cpp's best prefill of the same token ids (last row's logits only), or why it did not run."""
    python = bench_python()
    if not python.exists():
        return f"no benchmark venv: {SETUP_HINT}"
    request = {"gguf": str(GGUF), "threads": threads, "prompt_ids": ids[0].tolist(), "new_tokens": 1,
               "windows": [], "repeats": rounds,
               # last-row logits only: a batch that holds the whole prompt keeps its row in llama-cpp-python's
               # score buffer (ubatches of 512 still split the work inside llama.cpp)
               "model_options": {"n_batch": max(512, ids.shape[1])}}
    try:
        done = subprocess.run([str(python), str(ROOT / "bench" / "llamacpp_runner.py")], input=json.dumps(request),
                              capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"did not run: {error}"
    if done.returncode != 0:
        return f"failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or ['no output'])[-1][:160]}"
    return json.loads(done.stdout)["prefill_s"]


def perplexity(runner: LeanLlama, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for window in windows:
        logits = runner.forward(window[None], 0, every_position=True)[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(nll / count)


def docs_windows(tokenizer, count: int) -> torch.Tensor:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: 8 * PPL_WINDOW * count], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: PPL_WINDOW * count]).reshape(count, PPL_WINDOW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,512,2048")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--no-llamacpp", action="store_true")
    args = parser.parse_args()
    forced = os.environ.get("LWDSL_PREFILL_DTYPE")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ast.ModelBlock(source=f"gguf:{GGUF}", scheme="gguf", location=str(GGUF)),
                                  GGUF.parent)
    model = copy.deepcopy(model)
    quantize_linears(model, INT4, skip=("lm_head",))
    quantize_linears(model, INT8)
    rows = [int(r) for r in args.rows.split(",")]
    runner = LeanLlama(model, max(rows + [PPL_WINDOW]) + 8)
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    chosen = {r: (short[prefill_dtype(r)], short[prefill_dtype(r, "attention")]) for r in rows}
    times: dict[tuple[int, str], list[float]] = {}
    generator = torch.Generator().manual_seed(0)
    prompts = {r: torch.randint(0, 40000, (1, r), generator=generator) for r in rows}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for r in rows:
                for name, path in PATHS.items():
                    began = time.perf_counter()
                    run_path(path, lambda: runner.forward(prompts[r], 0))
                    times.setdefault((r, name), []).append(time.perf_counter() - began)
        peer = {r: ("not run (--no-llamacpp)" if args.no_llamacpp else llamacpp_prefill_s(prompts[r], args.threads,
                                                                                            args.rounds))
                for r in rows}
        predicted = {r: run_path(None, lambda: predicted_prefill_s(r)) for r in rows}
        windows = docs_windows(tokenizer, args.ppl_windows) if args.ppl_windows else None
        ppl = {name: run_path(path, lambda: perplexity(runner, windows)) for name, path in PATHS.items()} \
            if windows is not None else {}
    run_path(forced, lambda: None)
    print(f"CPU: {identity()}; {args.threads} threads; {args.rounds} rounds; load {os.getloadavg()[0]:.2f}")
    print("| tokens | fp32 s (today's path) | bf16 s | lwdsl s (probe's choice: matmul, attention) | fp32 / lwdsl "
          "| llama.cpp s | llama.cpp / lwdsl | predicted s | predicted / measured |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f})"
    for r in rows:
        ours = statistics.median(times[(r, "lwdsl")])
        theirs = peer[r]
        peer_cells = (f"{theirs:.3f} | {theirs / ours:.2f}x" if isinstance(theirs, float)
                      else f"error: {theirs} | -")
        print(f"| {r} | {cell(times[(r, 'fp32')])} | {cell(times[(r, 'bf16')])} | {cell(times[(r, 'lwdsl')])} "
              f"{chosen[r][0]}, {chosen[r][1]} | {statistics.median(times[(r, 'fp32')]) / ours:.2f}x | {peer_cells} "
              f"| {predicted[r]:.3f} | {predicted[r] / ours:.3f} |")
    if ppl:
        print(f"perplexity over {args.ppl_windows} x {PPL_WINDOW} tokens (python docs), each window one prefill: "
              + ", ".join(f"{name} {value:.4f} ({value / ppl['fp32'] - 1:+.3%})" for name, value in ppl.items()))


if __name__ == "__main__":
    main()
