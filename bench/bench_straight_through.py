"""Which recovers more per distillation step on a quantized model: training through the quantizer
(straight-through: float masters fake-quantized in the forward, re-packed after) or training only the
float parameters around frozen codes (norms, embeddings, pruned float linears)?

    .venv/bin/python bench/bench_straight_through.py [plans/smollm2_recover_int4.lwp] [--steps 60]

Compresses the plan's model with its strongest allowed compression (as `lwdsl profile` does), then
distils two copies of it from the original for the same steps on the same windows, one each way, and
measures the held-out perplexity increase and KL of each (on evaluation windows never trained on).
Prints one JSON object: the recovered fraction of the log-perplexity increase and of the KL, and the
seconds a step, for each way.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from lwdsl.apply import DriverContext, apply_solution
    from lwdsl.apply.distill import distill
    from lwdsl.models.load import load_model
    from lwdsl.plans import load_plan
    from lwdsl.profile.recovery import strongest_choices
    from lwdsl.solution import Solution
    from lwdsl.verify.quality import compare_quality
    from lwdsl.verify.text import plan_texts

    parser = argparse.ArgumentParser()
    parser.add_argument("plan", nargs="?", default=str(ROOT / "plans/smollm2_recover_int4.lwp"))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    plan_file = load_plan(args.plan)
    plan, base_dir = plan_file.plan, Path(plan_file.base_dir)
    teacher, tokenizer = load_model(plan.model, base_dir)
    texts = plan_texts(plan, base_dir, tokenizer, calibration_tokens=max(1024, 128 * args.steps))
    choices = strongest_choices(plan_file)
    solution = Solution(plan_name=plan.name, plan_hash=plan_file.sha256, status="OPTIMAL", layers=choices)
    kinds = {d.name: d.kind for d in plan.target.devices}
    compressed = apply_solution(copy.deepcopy(teacher), solution, DriverContext(
        device_kinds=kinds, calibration_ids=texts.calibration.ids[:4].reshape(1, -1)))
    evaluation = texts.evaluation.ids
    start = compare_quality(teacher, compressed, evaluation)
    result = {"plan": plan.name, "steps": args.steps, "threads": torch.get_num_threads(),
              "compressed": {"perplexity_increase": start.perplexity_increase, "kld": start.kld}, "ways": {}}
    for name, through in (("straight_through", True), ("float_only", False)):
        student = copy.deepcopy(compressed)
        began = time.perf_counter()
        distill(student, teacher, texts.calibration.ids, args.steps, through_quantizer=through)
        seconds = time.perf_counter() - began
        quality = compare_quality(teacher, student, evaluation)
        result["ways"][name] = {
            "perplexity_increase": quality.perplexity_increase, "kld": quality.kld,
            "recovered_log_ppl": 1 - math.log1p(quality.perplexity_increase) / math.log1p(start.perplexity_increase),
            "recovered_kld": 1 - quality.kld / start.kld, "s_per_step": seconds / max(1, args.steps)}
        del student
    result["load_average"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
