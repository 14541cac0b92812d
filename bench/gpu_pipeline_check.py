"""Device check: a two-GPU pipeline, solved, applied and loaded for real, against the CPU model.

    PYTHONPATH=. .venv/bin/python bench/gpu_pipeline_check.py

Needs two CUDA devices (prints "skipped: needs 2 CUDA devices" and exits 0 otherwise) and the SmolLM2
GGUF under models/ (git-ignored: a device run carries it). Solves `plans/smollm2_two_gpus.lwp` (two 400 MiB
cards: the 540 MB of fp32 weights fit neither alone) with `shard pipeline`, applies it into a temporary folder,
loads the artifact — which places each block on cuda:0 or cuda:1 as the solver chose, from the
manifest's `stage_devices` — and checks:
- every block's weights sit on the device its stage names, the embedding and head on theirs;
- the logits of a prompt match the source model's on the CPU (TF32 off: fp32 on both; only the
  order of float sums differs);
- greedy decoding through the lean loop gives the CPU model's tokens, and says it ran eager.
Exit 0 when all hold, 1 when one does not.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
PLAN = ROOT / "plans" / "smollm2_two_gpus.lwp"  # two 400 MiB cards: the fp32 weights fit neither


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("skipped: needs 2 CUDA devices")
        return 0
    from lwdsl import ast
    from lwdsl.apply.pipeline import apply_plan
    from lwdsl.artifact import load, read_manifest
    from lwdsl.models.fetch import fetch_smollm2
    from lwdsl.models.load import load_model
    from lwdsl.placement import describe_runs
    from lwdsl.plans import load_plan
    from lwdsl.runtime.generate import decode
    from lwdsl.solve.search import solve_plan

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gguf = fetch_smollm2(ROOT / "models")
    failures = []
    with tempfile.TemporaryDirectory(prefix="lwdsl-gpu-pipeline-") as tmp:
        solution = solve_plan(load_plan(PLAN)).solution
        folder = apply_plan(PLAN, Path(tmp) / "artifact", solution)
        manifest = read_manifest(folder)
        print(f"solver: {describe_runs(solution.pipeline_stages)}; embedding and head on {manifest.pipeline_io}")
        print(f"manifest stage_devices: {manifest.stage_devices}")
        model = load(folder)
        print(f"loaded: {model.lwdsl_placement.note}")
        wanted = [manifest.stage_devices[s] for s in manifest.pipeline_stages]
        for index, (layer, device) in enumerate(zip(model.model.layers, wanted)):
            found = {str(p.device) for p in layer.parameters()}
            if found != {device}:
                failures.append(f"block {index} on {found}, the manifest says {device}")
        io = manifest.stage_devices[manifest.pipeline_io]
        for name, module in (("embedding", model.model.embed_tokens), ("head", model.lm_head)):
            if str(module.weight.device) != io:
                failures.append(f"{name} on {module.weight.device}, the manifest says {io}")

        block = ast.ModelBlock(source=f"gguf:{gguf}", scheme="gguf", location=str(gguf))
        reference, tokenizer = load_model(block, gguf.parent)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = reference(ids).logits[0]
            placed = model(ids).logits[0]  # CPU ids in, logits back on the CPU (the placement's io hooks)
        difference = (placed.float().cpu() - expected).abs().max().item()
        print(f"logits: max |placed - cpu| = {difference:.2e} (logits of magnitude ~{expected.abs().max():.0f})")
        if placed.device.type != "cpu" or difference > 1e-3:
            failures.append(f"logits differ by {difference:.2e} (on {placed.device})")
        cpu_run = decode(reference, ids, max_new_tokens=8)
        gpu_run = decode(model, ids, max_new_tokens=8)
        print(f"greedy tokens: cpu {cpu_run.token_ids}, pipelined {gpu_run.token_ids}; step: {gpu_run.step}")
        if gpu_run.token_ids != cpu_run.token_ids:
            failures.append("greedy tokens differ")
        if not gpu_run.step.startswith("eager: pipelined over"):
            failures.append(f"decode step {gpu_run.step!r}, expected eager (pipelined)")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("ok" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
