"""Decode speed and perplexity of any GGUF model lwdsl reads (Qwen2, Gemma 3, Llama), under a few
weight formats, against llama.cpp on the same GGUF file.

    PYTHONPATH=. .venv/bin/python bench/bench_models.py models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    PYTHONPATH=. .venv/bin/python bench/bench_models.py models/gemma-3-270m-q4_k_m.gguf --only "int4 g32 + int8 head,llama.cpp"

Rows and columns as in `bench/bench_decode.py` (median decode step over `--new-tokens` tokens after a
64-token prompt, best of 2; perplexity over 2 windows of 256 tokens of CPython's docs, the same ids for
every row; bytes a step reads and the bound at the measured read bandwidth). Each lwdsl row loads the
converted model afresh (one model in memory at a time). The llama.cpp row runs llama-cpp-python from
the benchmark venv (`LWDSL_BENCH_PYTHON`, default `.venv-bench/bin/python` here or `/work/.venv-bench`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (PROMPT_TOKENS, adjacent, error_row, print_table, read_bandwidth_gbs, texts,  # noqa: E402
                          torch_row)
from peers import SETUP_HINT, bench_python  # noqa: E402

from lwdsl import ast  # noqa: E402
from lwdsl.apply.quantize import quantize_linears  # noqa: E402
from lwdsl.models.load import load_model  # noqa: E402
from lwdsl.runtime.generate import _runner  # noqa: E402
from lwdsl.solution import QuantFormat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INT8 = QuantFormat(dtype="int8")
G32 = QuantFormat(dtype="int4", group=32)
VARIANTS = {  # name -> (format, names left out) steps, in order
    "int4 g32 + int8 head": [(G32, ("lm_head",)), (INT8, ())],
    "int4 g32": [(G32, ())],
    "int8": [(INT8, ())],
    "fp32": [],
}


def llamacpp_row(gguf_file: Path, config, windows, prompt, new_tokens, threads, bandwidth) -> dict | None:
    python = bench_python()
    if not python.exists():
        return error_row(f"llama.cpp ({gguf_file.name})", f"no benchmark venv at {python}: {SETUP_HINT}")
    request = {"gguf": str(gguf_file), "threads": threads, "prompt_ids": prompt[0].tolist(),
               "new_tokens": new_tokens, "windows": windows.tolist()}
    done = subprocess.run([str(python), str(ROOT / "bench" / "llamacpp_runner.py")],
                          input=json.dumps(request), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print("llama.cpp run failed:", done.stderr[-2000:])
        return None
    answer = json.loads(done.stdout)
    from lwdsl.inventory.gguf_header import read_header

    tensors = {t.name: t.n_bytes for t in read_header(gguf_file).tensors}
    weights = sum(tensors.values())
    if "output.weight" in tensors:  # untied: the embedding is one row a step, the head is read whole
        weights -= tensors["token_embd.weight"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * (PROMPT_TOKENS + new_tokens // 2)
    moved = weights + kv  # llama.cpp keeps an f16 KV cache
    version = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    return {"variant": f"llama.cpp ({gguf_file.name})", "ms": answer["ms_per_token"],
            "cpu_ms": answer.get("cpu_ms_per_token", float("nan")), "prefill_s": answer["prefill_s"],
            "ppl": answer["perplexity"], "mb": moved / 1e6, "bound_ms": moved / bandwidth * 1e3,
            "notes": f"llama-cpp-python {version}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf_file = args.gguf.resolve()
    block = ast.ModelBlock(source=f"gguf:{gguf_file}", scheme="gguf", location=str(gguf_file))
    chosen = [v for v in args.only.split(",") if v] or list(VARIANTS) + ["llama.cpp"]
    bandwidth = read_bandwidth_gbs(args.threads) * 1e9
    rows, windows, prompt, config = [], None, None, None
    for name, steps in VARIANTS.items():
        if name not in chosen and windows is not None:
            continue
        model, tokenizer = load_model(block, gguf_file.parent)
        if windows is None:
            windows, prompt, _ = texts(tokenizer)
            from lwdsl.verify.text import _leading_bos

            bos = _leading_bos(tokenizer)
            if bos is not None:  # Gemma: every window (and the prompt) starts with BOS, as `check` scores it
                windows = torch.cat([torch.full((windows.shape[0], 1), bos), windows[:, :-1]], dim=1)
                prompt = torch.cat([torch.full((1, 1), bos), prompt[:, :-1]], dim=1)
            config = model.config
            print(f"{gguf_file.name}: torch {torch.__version__}, {args.threads} threads, read bandwidth "
                  f"{bandwidth / 1e9:.1f} GB/s, prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new tokens")
        if name in chosen:
            for fmt, skip in steps:
                quantize_linears(model, fmt, skip=skip)
            step = _runner(model, 8, None)
            fused = getattr(step, "fused", "")
            notes = "fused step" if not isinstance(fused, str) else f"eager step ({fused})"
            rows.append(adjacent(lambda bw: torch_row(name, model, windows, prompt, args.new_tokens, bw, notes),
                                 args.threads))
            print(rows[-1], flush=True)
        del model
        gc.collect()
    if "llama.cpp" in chosen and (row := adjacent(lambda bw: llamacpp_row(
            gguf_file, config, windows, prompt, args.new_tokens, args.threads, bw) or {}, args.threads)):
        rows.append(row)
        print(row, flush=True)
    print()
    print_table(rows)
    ours = [r for r in rows if not r["variant"].startswith("llama.cpp")]
    theirs = [r for r in rows if r["variant"].startswith("llama.cpp")]
    for row in ours:
        for other in theirs:
            print(f"{row['variant']} vs {other['variant']}: {other['ms'] / row['ms']:.2f}x (>1: lwdsl faster)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
