"""llama.cpp's side of bench/bench_decode.py, run by the benchmark venv's Python (llama-cpp-python).

Reads a JSON request on stdin: {"gguf", "threads", "prompt_ids", "new_tokens", "windows"} and prints a
JSON answer: median decode ms/token (wall and process CPU), prefill seconds, the greedy tokens
(`generated`), and perplexity over the same token windows the
torch side scores (each window from a fresh context; token t predicted from tokens < t). Decode is a
plain greedy loop of single-token `eval` calls, the same shape of work as lwdsl's lean loop.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    request = json.load(sys.stdin)
    windows = request["windows"]
    context = max(len(request["prompt_ids"]) + request["new_tokens"], max((len(w) for w in windows), default=0)) + 8
    # logits of every position only where windows are scored (a prefill timed alone computes the last
    # row's, as lwdsl's does)
    llm = Llama(model_path=request["gguf"], n_ctx=context, n_threads=request["threads"],
                n_threads_batch=request["threads"], logits_all=bool(windows), verbose=False,
                **request.get("model_options", {}))

    best_ms, best_cpu_ms, prefill_s = float("inf"), float("inf"), float("inf")
    generated = []
    for _ in range(request.get("repeats", 2)):
        generated = []
        llm.reset()
        started = time.perf_counter()
        llm.eval(request["prompt_ids"])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill_s = min(prefill_s, time.perf_counter() - started)
        generated.append(token)
        steps, cpu_steps = [], []
        for _ in range(request["new_tokens"] - 1):
            started, started_cpu = time.perf_counter(), time.process_time()
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            steps.append(time.perf_counter() - started)
            cpu_steps.append(time.process_time() - started_cpu)
        best_ms = min(best_ms, 1e3 * float(np.median(steps)))
        best_cpu_ms = min(best_cpu_ms, 1e3 * float(np.median(cpu_steps)))

    nll, count = 0.0, 0
    for window in windows:  # (none: a prefill timed alone, no perplexity)
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(log_probs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    json.dump({"ms_per_token": best_ms, "cpu_ms_per_token": best_cpu_ms, "prefill_s": prefill_s,
               "perplexity": float(np.exp(nll / count)) if count else None,
               "generated": generated},
              sys.stdout)


if __name__ == "__main__":
    main()
