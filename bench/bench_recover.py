"""`prune channels up to 25%` + `recover distill up to N steps` on the real SmolLM2, measured.

    .venv/bin/python bench/bench_recover.py [plans/smollm2_recover.lwp] [--steps N]

Solves the plan (its recovery curve from `lwdsl profile` when stored, else the prior), applies the
chosen prune to a copy of the model, measures perplexity and KL to the original on the held-out
evaluation windows, runs the chosen distillation steps (`lwdsl.apply.distill`, what `apply` runs),
measures again and prints: the perplexity increase without and with recovery (the issue's bar: with
at most half of without), the recovered fraction predicted vs measured, and the distillation's time.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
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
    from lwdsl.solve.search import solve_plan
    from lwdsl.verify.quality import compare_quality
    from lwdsl.verify.text import plan_texts

    parser = argparse.ArgumentParser()
    parser.add_argument("plan", nargs="?", default=str(ROOT / "plans/smollm2_recover.lwp"))
    parser.add_argument("--steps", type=int, default=None, help="override the solver's step count")
    args = parser.parse_args()
    # torch's own thread count, as `lwdsl apply` runs the distillation (and the cost model prices it)
    plan_file = load_plan(args.plan)
    solution = solve_plan(plan_file).solution
    recover = solution.recover
    steps = args.steps if args.steps is not None else recover.steps
    teacher, tokenizer = load_model(plan_file.plan.model, plan_file.base_dir)
    texts = plan_texts(plan_file.plan, plan_file.base_dir, tokenizer, calibration_tokens=max(1024, 128 * steps))
    student = copy.deepcopy(teacher)
    kinds = {d.name: d.kind for d in plan_file.plan.target.devices}
    student = apply_solution(student, solution.model_copy(update={"recover": None}),
                             DriverContext(device_kinds=kinds, calibration_ids=texts.calibration.ids[:4].reshape(1, -1)))
    evaluation = texts.evaluation.ids
    pruned = compare_quality(teacher, student, evaluation)
    started = time.perf_counter()
    distill(student, teacher, texts.calibration.ids, steps)
    seconds = time.perf_counter() - started
    recovered = compare_quality(teacher, student, evaluation)
    ppl_without, ppl_with = pruned.perplexity_increase, recovered.perplexity_increase
    kl_without, kl_with = pruned.kld, recovered.kld
    from lwdsl.cost.recovery import RecoveryCurve, recovered_fraction
    from lwdsl.profile.recovery import load_curve

    curve = load_curve(plan_file) or RecoveryCurve()
    predicted_fraction = recovered_fraction(curve, steps)  # of the log-perplexity increase
    predicted_kld_fraction = recovered_fraction(curve.for_kld(), steps)
    measured_fraction = 1.0 - math.log1p(ppl_with) / math.log1p(ppl_without) if ppl_without > 0 else 0.0
    result = {
        "plan": plan_file.plan.name, "steps": steps, "curve": curve.model_dump(mode="json"),
        "perplexity_increase": {"pruned": ppl_without, "recovered": ppl_with,
                                "ratio": ppl_with / ppl_without if ppl_without else None},
        "kld": {"pruned": kl_without, "recovered": kl_with},
        "recovered_fraction": {"predicted": predicted_fraction, "measured_log_ppl": measured_fraction,
                               "measured_over_predicted": measured_fraction / predicted_fraction
                               if predicted_fraction else None,
                               "predicted_kld": predicted_kld_fraction,
                               "measured_kld": 1.0 - kl_with / kl_without if kl_without else None},
        "predicted_recovered_perplexity_increase": math.expm1((1 - predicted_fraction) * math.log1p(ppl_without)),
        "distill_s": seconds, "predicted_distill_s": recover.time_s * steps / max(1, recover.steps),
        "threads": torch.get_num_threads(), "load_average": __import__("os").getloadavg()[0],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
