"""An exported artifact against lwdsl running it: GGUF in llama.cpp, the HF folder in transformers alone.

    PYTHONPATH=. .venv/bin/python bench/export_check.py PLAN ARTIFACT [--gguf FILE] [--hf FOLDER] [--json]

- GGUF (needs the benchmark venv `.venv-bench` with llama-cpp-python; skipped without it): the greedy
  continuation of a prompt (16 tokens) by llama.cpp against lwdsl's own decode loop (what `lwdsl run`
  runs), and the perplexity on the plan's evaluation windows (the windows `lwdsl check` scores, each
  from a fresh context) against lwdsl's perplexity of the artifact on the same windows.
- HF: a subprocess with lwdsl made unimportable loads the folder with
  `transformers.AutoModelForCausalLM.from_pretrained` and writes the logits of 256 tokens; they are
  compared with the artifact's logits in lwdsl (max absolute difference, and whether the argmax agrees).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ROOT, bench_python  # noqa: E402

PROMPT = "The capital of France is"
BENCH_PYTHON = bench_python()

HF_LOGITS = ROOT / "bench" / "hf_logits.py"  # run by a bare interpreter: lwdsl must not import


def hf_logits(folder: Path, ids: torch.Tensor) -> np.ndarray:
    """Logits of `ids` [1, n] from the HF folder, in a process where lwdsl cannot be imported."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "ids.npy"
        np.save(path, ids.numpy())
        done = subprocess.run([sys.executable, str(HF_LOGITS), str(folder), str(path), str(ROOT)],
                              capture_output=True, text=True, cwd=scratch, env={"PATH": "/usr/bin:/bin"})
        if done.returncode != 0:
            raise RuntimeError(f"transformers could not run {folder}: {done.stderr[-2000:]}")
        return np.load(str(path) + ".logits.npy")


def llamacpp(gguf: Path, prompt_ids: list[int], windows: list[list[int]], threads: int = 2) -> dict | None:
    if not BENCH_PYTHON.exists():
        return None
    request = {"gguf": str(gguf), "threads": threads, "prompt_ids": prompt_ids, "new_tokens": 16,
               "windows": windows, "repeats": 1}
    done = subprocess.run([str(BENCH_PYTHON), str(ROOT / "bench" / "llamacpp_runner.py")],
                          input=json.dumps(request), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp could not run {gguf}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    from lwdsl.artifact import load, load_tokenizer
    from lwdsl.plans import load_plan
    from lwdsl.runtime.generate import decode
    from lwdsl.verify.quality import perplexity
    from lwdsl.verify.text import plan_texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("artifact")
    parser.add_argument("--gguf")
    parser.add_argument("--hf")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan_file = load_plan(args.plan)
    model, tokenizer = load(args.artifact), load_tokenizer(args.artifact)
    windows = plan_texts(plan_file.plan, Path(plan_file.base_dir), tokenizer).evaluation.ids
    report = {"artifact": args.artifact, "windows": list(windows.shape)}
    if args.gguf:
        prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        ours = decode(model, prompt, 16, stop_at_eos=False).token_ids
        answer = llamacpp(Path(args.gguf), prompt[0].tolist(), windows.tolist(), args.threads)
        ppl = perplexity(model, windows)
        report["gguf"] = {"file": args.gguf, "bytes": Path(args.gguf).stat().st_size, "lwdsl_tokens": ours,
                          "lwdsl_perplexity": ppl}
        if answer is not None:
            report["gguf"].update(llamacpp_tokens=answer["generated"], tokens_equal=answer["generated"] == ours,
                                  llamacpp_perplexity=answer["perplexity"],
                                  perplexity_ratio=answer["perplexity"] / ppl)
        print(json.dumps(report["gguf"]), file=sys.stderr, flush=True)  # kept if the HF part fails
    if args.hf:
        ids = windows[:1, :256]
        with torch.inference_mode():
            ours = model(input_ids=ids).logits[0].float().numpy()
        theirs = hf_logits(Path(args.hf), ids)
        report["hf"] = {"folder": args.hf, "tokens": int(ids.shape[1]),
                        "max_abs_diff": float(np.abs(ours - theirs).max()),
                        "logit_scale": float(np.abs(ours).max()),
                        "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
