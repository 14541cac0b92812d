"""Decode speed and perplexity of SmolLM2-135M under each weight format, against torchao and llama.cpp.

    PYTHONPATH=. .venv/bin/python bench/bench_decode.py [--threads 2] [--new-tokens 64]

One run prints one table. Every row decodes greedily through lwdsl's lean loop
(`lwdsl.runtime.generate.decode`: static KV cache, one prefill, then one token a step; each step one
native call, `lwdsl.runtime.fused`, where the model's modules allow, else torch op by op) except the
llama.cpp rows, which run llama-cpp-python on the same GGUF file in the benchmark venv
(`bash bench/setup_peers.sh` builds bench/.venv; a peer that cannot run is an error row), and on each
`--exported-gguf FILE` (a file `lwdsl export` wrote from an artifact: the plan's result running in
llama.cpp). Columns:
- ms/token: median decode step over `--new-tokens` tokens after a 64-token prompt (best of 2 runs);
- CPU ms/token: the same steps in process CPU time, all threads (on a shared machine: the work a step
  costs, apart from waiting for a core);
- prefill: the 64-token prompt's forward;
- ppl: perplexity over 2 windows of 256 tokens of CPython's `pydoc_data.topics` (the same token ids
  for every row, llama.cpp included);
- MB/token: weight bytes a decode step reads (every linear, one embedding row) plus the KV cache at
  the mid-point of the decode; bound = that / measured read bandwidth; "% of bound" = bound / ms/token.
The SmolLM2 GGUF is Q4_1 (4-bit, groups of 32, with a min): "int4 g32 asym" re-quantizes values that
already sit on such a grid, so it is near-lossless by construction and proves little about quality.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from lwdsl import ast
from lwdsl.apply import capture_inputs
from lwdsl.apply.prune import prune_module
from lwdsl.apply.quantize import quantize_linears
from lwdsl.apply.registry import ApplyContext
from lwdsl.models.load import load_model
from lwdsl.runtime.generate import LeanLlama, decode
from lwdsl.solution import PruneChoice, QuantFormat
from peers import SETUP_HINT, bench_python

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TOKENS, WINDOW, WINDOWS, CALIBRATION_TOKENS = 64, 256, 2, 512


BENCH_PYTHON = bench_python()

INT8 = QuantFormat(dtype="int8")
CHANNELS = PruneChoice(kind="channels", fraction=0.25)
# name -> list of steps applied in order: (format, kernel or None, names to leave out) quantizes the
# linears; a PruneChoice prunes every block's MLP (magnitude scores). Rows marked EAGER decode with
# the fused step switched off (LWDSL_FUSED=0): every op through torch, for comparison.
VARIANTS = {
    "fp32": [],
    "fp32 (eager step)": [],
    "int8": [(INT8, None, ())],
    "int8 (eager step)": [(INT8, None, ())],
    "int8 g32 (Q8_0's layout)": [(QuantFormat(dtype="int8", group=32), None, ())],
    "int8 (fbgemm dyn. W8A8)": [(INT8, "fbgemm_dynamic", ())],
    "int8 + MLP channels pruned 25%": [CHANNELS, (INT8, None, ())],
    "fp32 + MLP channels pruned 25%": [CHANNELS],
    "int4 g128 (where it divides)": [(QuantFormat(dtype="int4", group=128), None, ())],
    "int4 g32": [(QuantFormat(dtype="int4", group=32), None, ())],
    "int4 g32 asym": [(QuantFormat(dtype="int4", group=32, symmetric=False), None, ())],
    "int4 g32 asym + int8 head (as the GGUF)": [
        (QuantFormat(dtype="int4", group=32, symmetric=False), None, ("lm_head",)), (INT8, None, ())],
    "int4 g32 asym + int8 head (int4pack, eager)": [
        (QuantFormat(dtype="int4", group=32, symmetric=False), "int4pack_bf16", ("lm_head",)), (INT8, None, ())],
}
EAGER = {"fp32 (eager step)", "int8 (eager step)"}


def prune_mlps(model, choice: PruneChoice, calibration_ids: torch.Tensor) -> None:
    """Every block's MLP channels pruned as `lwdsl apply` does with a plan's calibration text: scores
    from the activations each MLP sees on `calibration_ids` (magnitude alone wrecks SmolLM2: pruning
    25% of every block by weight norms measured perplexity ~2e6)."""
    names = [f"model.layers.{index}.mlp" for index in range(len(model.model.layers))]
    inputs = capture_inputs(model, names, calibration_ids)
    for name, layer in zip(names, model.model.layers):
        layer.mlp = prune_module(layer.mlp, choice, ApplyContext(name=name, calibration=inputs[name]))


def read_bandwidth_gbs(threads: int) -> float:
    """Best-of-5 read bandwidth of a 256 MiB float32 sum: the memory bound's denominator (taken beside
    each row, `adjacent`)."""
    data = torch.ones(64 << 20)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def adjacent(make_row, threads: int) -> dict:
    """`make_row(bandwidth)` with its memory bound taken at the read bandwidth measured just before and
    just after it (their mean): this VM's read rate moves by tens of percent within seconds (19-37 GB/s
    within one minute here), so a bound measured once at start-up says little about a later row."""
    before = read_bandwidth_gbs(threads)
    row = make_row(before * 1e9)
    now = (before + read_bandwidth_gbs(threads)) / 2
    if "mb" in row:
        row["bound_ms"], row["gbs"] = row["mb"] * 1e6 / (now * 1e9) * 1e3, now
    return row


def texts(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[:40000], add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: WINDOW * WINDOWS]).reshape(WINDOWS, WINDOW)
    prompt = torch.tensor(ids[WINDOW * WINDOWS: WINDOW * WINDOWS + PROMPT_TOKENS])[None]
    start = WINDOW * WINDOWS + PROMPT_TOKENS  # calibration (pruning scores): apart from both
    calibration = torch.tensor(ids[start: start + CALIBRATION_TOKENS])[None]
    return windows, prompt, calibration


def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += window.numel() - 1
    return math.exp(nll / count)


def linear_bytes(module: nn.Module) -> int:
    if hasattr(module, "weight_bytes"):
        return module.weight_bytes()
    weight = module.weight
    if hasattr(weight, "qdata"):  # torchao Int8Tensor: int8 values + scales
        return sum(t.numel() * t.element_size() for t in (weight.qdata, weight.scale))
    return weight.numel() * weight.element_size()


def bytes_per_token(model, context: int) -> int:
    linears = sum(linear_bytes(m) for m in model.modules()
                  if isinstance(m, nn.Linear) or hasattr(m, "weight_bytes"))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4 * context
    return linears + config.hidden_size * 4 + kv


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, float]:
    best_ms, best_cpu_ms, best_prefill = float("inf"), float("inf"), float("inf")
    for _ in range(2):
        run = decode(model, prompt, new_tokens, stop_at_eos=False)
        best_ms, best_prefill = min(best_ms, run.ms_per_token), min(best_prefill, run.prefill_s)
        best_cpu_ms = min(best_cpu_ms, run.cpu_ms_per_token)
    return best_ms, best_cpu_ms, best_prefill


def torch_row(name, model, windows, prompt, new_tokens, bandwidth, notes) -> dict:
    ms, cpu_ms, prefill = time_decode(model, prompt, new_tokens)
    moved = bytes_per_token(model, PROMPT_TOKENS + new_tokens // 2)
    return {"variant": name, "ms": ms, "cpu_ms": cpu_ms, "prefill_s": prefill,
            "ppl": perplexity(model, windows), "mb": moved / 1e6, "bound_ms": moved / bandwidth * 1e3,
            "notes": notes}


LLAMACPP = "llama.cpp (Q4_1 GGUF, Q8_0 head)"


def error_row(variant: str, why: str) -> dict:
    """A peer that could not run: a row of the table saying why, never a silently missing row."""
    return {"variant": variant, "error": why}


def llamacpp_row(windows, prompt, new_tokens, threads, bandwidth, gguf_file: Path = GGUF,
                 label: str = LLAMACPP) -> dict:
    if not BENCH_PYTHON.exists():
        return error_row(label, f"no benchmark venv at {BENCH_PYTHON}: {SETUP_HINT}")
    request = {"gguf": str(gguf_file), "threads": threads, "prompt_ids": prompt[0].tolist(),
               "new_tokens": new_tokens, "windows": windows.tolist()}
    try:
        done = subprocess.run([str(BENCH_PYTHON), str(ROOT / "bench" / "llamacpp_runner.py")],
                              input=json.dumps(request), capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        return error_row(label, f"llama.cpp did not run: {error}")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return error_row(label, f"llama.cpp failed (exit {done.returncode}): {last}; {SETUP_HINT}")
    answer = json.loads(done.stdout)
    try:
        import gguf

        tensors = gguf.GGUFReader(str(gguf_file)).tensors
        weights = sum(int(t.n_bytes) for t in tensors)  # the tied output matrix is read whole each step
    except ImportError:  # the file is its tensors and a small header
        weights = gguf_file.stat().st_size
    kv = 2 * 30 * 3 * 64 * 2 * (PROMPT_TOKENS + new_tokens // 2)  # llama.cpp keeps an f16 KV cache
    moved = weights + kv
    return {"variant": label, "ms": answer["ms_per_token"],
            "cpu_ms": answer.get("cpu_ms_per_token", float("nan")),
            "prefill_s": answer["prefill_s"], "ppl": answer["perplexity"], "mb": moved / 1e6,
            "bound_ms": moved / bandwidth * 1e3, "notes": "llama-cpp-python " + _llamacpp_version()}


def _llamacpp_version() -> str:
    done = subprocess.run([str(BENCH_PYTHON), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip()


def _import_torchao():
    """torchao from lwdsl's venv, else from the benchmark venv's (same torch version: setup_peers.sh)."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        import glob
        import sys

        sys.path.extend(glob.glob(str(BENCH_PYTHON.parent.parent / "lib" / "python3*" / "site-packages")))
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    return Int8WeightOnlyConfig, quantize_


def torchao_row(base, windows, prompt, new_tokens, bandwidth) -> dict:
    try:
        Int8WeightOnlyConfig, quantize_ = _import_torchao()
    except Exception as error:  # noqa: BLE001 - any import failure is the row's error
        return error_row("torchao Int8WeightOnlyConfig", f"torchao not importable ({error}); {SETUP_HINT}")
    model = copy.deepcopy(base)
    model.lm_head = nn.Linear(576, model.config.vocab_size, bias=False)
    model.lm_head.weight = nn.Parameter(base.lm_head.weight.detach().clone(), requires_grad=False)
    quantize_(model, Int8WeightOnlyConfig())
    import torchao

    return torch_row("torchao Int8WeightOnlyConfig", model, windows, prompt, new_tokens, bandwidth,
                     f"torchao {torchao.__version__}")


def print_table(rows: list[dict]) -> None:
    reference = {row["variant"]: row for row in rows}
    header = (f"| {'variant':<42} | ms/token | CPU ms/token | prefill ms | ppl    | MB/token | read GB/s | bound ms |"
              " % of bound | notes")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|---")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']:<42} | error: {row['error']}")
            continue
        print(f"| {row['variant']:<42} | {row['ms']:8.2f} | {row['cpu_ms']:12.2f} | {row['prefill_s'] * 1e3:10.1f} | "
              f"{row['ppl']:6.3f} | {row['mb']:8.1f} | {row.get('gbs', 0):9.1f} | {row['bound_ms']:8.2f} | "
              f"{100 * row['bound_ms'] / row['ms']:9.0f}% | {row['notes']}")
    pairs = [("int8", "torchao Int8WeightOnlyConfig"),
             ("int4 g32 asym + int8 head (as the GGUF)", "llama.cpp (Q4_1 GGUF, Q8_0 head)")]
    for ours, theirs in pairs:
        if ours in reference and theirs in reference and "error" not in reference[theirs]:
            print(f"{ours} vs {theirs}: {reference[theirs]['ms'] / reference[ours]['ms']:.2f}x "
                  f"(>1 means lwdsl is faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--exported-gguf", metavar="FILE", action="append", default=[],
                        help="a GGUF written by `lwdsl export DIR --format gguf`: one more llama.cpp row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    block = ast.ModelBlock(source=f"gguf:{GGUF}", scheme="gguf", location=str(GGUF))
    base, tokenizer = load_model(block, GGUF.parent)
    windows, prompt, calibration = texts(tokenizer)
    bandwidth = read_bandwidth_gbs(args.threads) * 1e9
    print(f"torch {torch.__version__}, {args.threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new tokens, ppl over {WINDOWS}x{WINDOW} tokens")
    chosen = [v for v in args.only.split(",") if v] or list(VARIANTS) + ["torchao", "llama.cpp"]
    rows = []
    for name, steps in VARIANTS.items():
        if name not in chosen:
            continue
        model = copy.deepcopy(base)
        stayed = set()
        for step in steps:
            if isinstance(step, PruneChoice):
                prune_mlps(model, step, calibration)
                continue
            fmt, kernel, skip = step
            report = quantize_linears(model, fmt, skip=skip, kernel=kernel)
            stayed |= {n for n, what in report.items() if what.startswith("stayed")}
        os.environ["LWDSL_FUSED"] = "0" if name in EAGER else "1"
        fused = LeanLlama(model, 8).fused
        step_kind = "fused step" if not isinstance(fused, str) else f"eager step ({fused})"
        kernels = sorted({getattr(m, "kernel", "") for m in model.modules() if hasattr(m, "kernel")})
        notes = ", ".join([step_kind] + kernels) + (f"; {len(stayed)} linears stayed fp32 (group does not "
                                                    f"divide the input)" if stayed else "")
        rows.append(adjacent(lambda bw: torch_row(name, model, windows, prompt, args.new_tokens, bw, notes),
                             args.threads))
        os.environ.pop("LWDSL_FUSED")
        print(rows[-1], flush=True)
        del model
    if "torchao" in chosen:
        rows.append(adjacent(lambda bw: torchao_row(base, windows, prompt, args.new_tokens, bw), args.threads))
        print(rows[-1], flush=True)
    if "llama.cpp" in chosen:
        rows.append(adjacent(lambda bw: llamacpp_row(windows, prompt, args.new_tokens, args.threads, bw),
                             args.threads))
        print(rows[-1], flush=True)
    for exported in args.exported_gguf:  # llama.cpp running what lwdsl exported
        import gguf

        types = sorted({t.tensor_type.name for t in gguf.GGUFReader(exported).tensors} - {"F32"})
        rows.append(adjacent(lambda bw: llamacpp_row(windows, prompt, args.new_tokens, args.threads, bw,
                                                     Path(exported), f"llama.cpp on lwdsl export ({'/'.join(types)})"),
                             args.threads))
        print(rows[-1], flush=True)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
