"""`lwdsl check` for a training plan: a short real run of `lwdsl train` with the solved settings,
held to the plan's `require` lines (`memory DEVICE`: that rank's measured peak; `memory`: the ranks'
peaks together; `time`: the whole run, its steps at the median step time measured) and to the
predictions (`estimate`'s, the trainer's cost model)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lwdsl.verify.compare import compare_predictions, compare_requirements
from lwdsl.verify.records import CheckReport, CheckSettings, Measurements, PredictionResult

CHECK_STEPS = 4  # optimizer steps the gate runs: the first is excluded from the median step time


def check_training(plan_file, steps: int = CHECK_STEPS) -> CheckReport:
    from lwdsl.solve.search import solve_plan
    from lwdsl.train import train_plan

    plan = plan_file.plan
    workload = plan.workload
    solution = solve_plan(plan_file).solution
    folder = Path(tempfile.mkdtemp(prefix="lwdsl-check-train-"))
    try:
        report = train_plan(plan_file, folder, steps=steps, checkpoint_every=steps, solution=solution)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ranks = [n for n in (solution.predicted.memory.by_device if solution.predicted else {})][: report.ranks]
    by_rank = dict(zip(ranks, report.measured.peak_memory_by_rank))
    run_steps = -(-max(1, workload.tokens) // max(1, workload.batch * workload.sequence))
    measured = Measurements(memory_bytes=by_rank, memory_total_bytes=sum(by_rank.values()) or None,
                            training_time_s=run_steps * report.measured.step_s, step_s=report.measured.step_s,
                            cost_per_h=solution.predicted.cost_per_h if solution.predicted else None)
    predicted = solution.predicted
    requirements = compare_requirements(plan, plan_file.text, measured, predicted, None)
    predictions = compare_predictions(predicted, measured)
    if report.predicted.step_s and report.measured.step_s:
        predictions.append(PredictionResult(
            metric="step time", predicted=report.predicted.step_s, measured=report.measured.step_s,
            error_relative=(report.measured.step_s - report.predicted.step_s) / report.predicted.step_s))
    return CheckReport(
        plan=plan.name, plan_file=str(plan_file.path), plan_hash=plan_file.sha256, artifact=None,
        solution_status=solution.status, passed=all(r.passed for r in requirements), requirements=requirements,
        predictions=predictions, measured=measured, baseline=Measurements(),
        settings=CheckSettings(eval_tokens=0, eval_source="-", batch=workload.batch, context=workload.sequence,
                               generate=0, repeats=steps, warmup=1),
        notes=[f"training plan: {steps} steps of `lwdsl train` (ZeRO stage {report.zero_stage}, {report.ranks} "
               f"rank(s)); loss {report.loss[0]:.4f} -> {report.loss[-1]:.4f}; `time` is {run_steps} steps at the "
               f"measured median step of {report.measured.step_s:.2f} s"])
