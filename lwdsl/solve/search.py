"""The solve stage: a loaded plan -> `Solution` (the best choice, or the lines that conflict).

    result = solve_plan(load_plan("plans/laptop_8b.lwp"), time_limit_s=30, workers=1)
    result.solution.status, result.solution.layers, result.solution.conflicts

One Problem per global scenario (tensor degree x KV format; for training, one decision over the
training settings); each is solved lexicographically; the lexicographically best scenario wins
(ties: the earlier scenario, i.e. fewer devices and the KV cache as loaded). Predicted figures come
from `lwdsl.cost.evaluate` on the chosen layers, so `solve` prints what `estimate` would.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from lwdsl import ast
from lwdsl.cost import evaluate
from lwdsl.cost.evaluate import decode_working_set, with_working_set
from lwdsl.cost.quality import prior_note
from lwdsl.errors import fail
from lwdsl.hardware import ResolvedTarget, resolve_target
from lwdsl.inventory import Inventory, load_inventory
from lwdsl.solution import Conflict, QualityProfile, Solution
from lwdsl.solve import build, readback, training
from lwdsl.solve.allowed import allowance
from lwdsl.solve.infeasible import conflict_sets, needed_values
from lwdsl.solve.model import Outcome, add_cutoff, compile_problem, solve_lexicographic
from lwdsl.solve.problem import Problem




@dataclass
class SolveResult:
    """The Solution, plus what the summary shows (requirement margins, timing)."""

    solution: Solution
    requirements: list[dict] = field(default_factory=list)
    scenarios: int = 0
    solve_s: float = 0.0
    build_s: float = 0.0
    quality_source: str = "prior"
    problem_size: dict = field(default_factory=dict)
    plan: ast.Plan | None = field(default=None, repr=False)  # what the checks were read against
    problem: Problem | None = field(default=None, repr=False)


def priced_prefill_dtypes(target) -> dict[str, dict[int, str]]:
    """The prefill dtypes this CPU's probe chose, where the target is priced from that probe (a local
    CPU device: only it has the probe's prefill tables); else none."""
    if not any(spec.prefill_int_matmul or spec.prefill_attention_run for spec in target.devices.values()):
        return {}
    from lwdsl.apply.native import probed_prefill_dtypes

    return probed_prefill_dtypes()


def _profile(plan_file) -> QualityProfile | None:
    try:
        from lwdsl.profile.store import find_profile
    except ImportError:
        return None
    try:
        return find_profile(plan_file)
    except Exception:  # a profile that cannot be read is no profile: fall back to priors, say so
        return None


def _lex_key(outcome: Outcome, problem: Problem) -> tuple:
    return tuple(v if o.sense == "min" else -v for (_, v), o in zip(outcome.values, problem.objectives))


def scenarios_of(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget, source: str,
                 profile: QualityProfile | None, curve=None) -> list:
    """Every scenario's (label settings, Problem, extra) for this plan (`recover distill`: once per
    step level, `lwdsl.solve.recover`)."""
    allowed = allowance(plan.allow.techniques)
    for device in allowed.offload:
        if device not in target.devices:
            raise fail("E502", f"offload names no device of the target: '{device}'", plan.allow.span)
    requirements = build.plan_requirements(plan, target, source, profile.baseline_perplexity if profile else None)
    objectives = build.objectives_of(plan)
    if isinstance(plan.workload, ast.TrainingWorkload):
        return [training.build_training(plan, inventory, target, allowed, requirements, objectives)]
    found = []
    shared_costs: dict = {}  # layer terms, computed once for every scenario that reads the same ones
    for tp in build.tensor_degrees(allowed, inventory, target):
        for kv in allowed.kv_formats:
            problem, extra = build.build_scenario(plan, inventory, target, allowed, requirements, objectives, tp,
                                                  kv, profile, shared_costs)
            found.append(({"tensor_parallel": tp, "kv_format": kv}, problem, extra))
    if allowed.recover_up_to:
        from lwdsl.cost.recovery import RecoveryCurve
        from lwdsl.solve.recover import recovery_scenarios

        found = recovery_scenarios(found, allowed.recover_up_to, curve or RecoveryCurve())
    return found


def _with_collectives(plan: ast.Plan, target: ResolvedTarget) -> ResolvedTarget:
    """A training plan's local CPU ranks exchange gradients through gloo: their measured collective
    figures (probed once per rank count, then cached) for every data-parallel degree the plan allows."""
    from lwdsl.hardware.probe_collective import local_rank_counts, with_local_collectives

    up_to = allowance(plan.allow.techniques).data_up_to
    counts = [n for n in local_rank_counts(target) if n <= up_to]
    return with_local_collectives(target, counts, span=plan.target.span) if counts else target


def solve_plan(plan_file, time_limit_s: float = 60.0, workers: int = 1, use_profile: bool = True) -> SolveResult:
    """Solve a loaded plan (`lwdsl.plans.PlanFile`); never raises for an unmet plan: the Solution says
    INFEASIBLE with its conflicts. Bad input raises `LwdslError`."""
    started = time.perf_counter()
    plan = plan_file.plan
    inventory = load_inventory(plan.model, plan_file.base_dir)
    target = resolve_target(plan.target)
    if not target.compute_devices():
        raise fail("E411", "the target has no device that computes (only disks)", plan.target.span)
    if isinstance(plan.workload, ast.TrainingWorkload):
        target = _with_collectives(plan, target)
    profile = _profile(plan_file) if use_profile else None
    curve = _recovery_curve(plan_file, inventory) if use_profile else None
    # A CPU whose caches keep part of a small model's weights between decode steps streams them faster
    # (`DeviceSpec.fused_rate`): the rates depend on the bytes the chosen formats read, so the solver's
    # coefficients assume a working set (none at first: beyond the caches) and the plan is solved again
    # with the solution's own until the two agree (the share the caches keep within 2 points).
    def solve_with(quality: QualityProfile | None) -> SolveResult:
        working: dict[str, float] = {}
        for _ in range(WORKING_SET_SOLVES):
            assumed = with_working_set(target, working)
            result = _search(plan_file, inventory, assumed, quality, curve, started, time_limit_s, workers)
            solution = result.solution
            if not solution.layers or isinstance(plan.workload, ast.TrainingWorkload):
                return result
            found = decode_working_set(inventory, {c.name: c for c in solution.layers}, plan.workload,
                                       solution.kv_format, solution.tensor_parallel)
            if all(abs(assumed.device(name).cached_fraction(found.get(name, 0.0))
                       - assumed.device(name).cached_fraction()) < 0.02 for name in assumed.devices):
                return result
            working = found
        return result

    result = solve_with(profile)
    if profile is None or not result.solution.layers or isinstance(plan.workload, ast.TrainingWorkload) \
            or curve is not None or os.environ.get("LWDSL_JOINT", "1") == "0":
        return result
    return _with_measured_quality(plan_file, result, profile, solve_with)


WORKING_SET_SOLVES = 3
JOINT_SOLVES = 3  # solutions measured jointly at most (`_with_measured_quality`)


def _with_measured_quality(plan_file, result: SolveResult, profile: QualityProfile, solve_with) -> SolveResult:
    """The solution's quality measured as it composes (`lwdsl.profile.joint`: its layers' changes at
    once, on the calibration windows of the `eval` text), reported instead of the layers' sum. Where the
    plan bounds quality and the sum over-states the mix (or the mix breaks the bound), the profile is
    rescaled by what the mix measured against its sum and the plan solved again, up to `JOINT_SOLVES`
    measured solutions; the last one whose measured quality holds every `require` line wins."""
    import math

    from lwdsl.profile.joint import measure_choices, scaled

    plan = plan_file.plan
    bounded = any(c.metric.name == "quality" for c in plan.require)
    tried: list[tuple[SolveResult, object]] = []
    nll_factor = kld_factor = 1.0
    while True:
        joint = measure_choices(plan_file, result.solution.layers)
        if joint is None:
            return result
        measured = _measured(result, joint)
        tried.append(measured)
        holds = all(c["holds"] for c in measured.requirements)
        quality = result.solution.predicted.quality  # the sum under the profile as scaled so far
        summed_nll, summed_kld = math.log1p(quality.perplexity_increase) / nll_factor, quality.kld / kld_factor
        if len(tried) >= JOINT_SOLVES or not bounded or summed_nll <= 1e-6 or summed_kld <= 0:
            break
        new_nll = min(4.0, max(0.25, max(0.0, math.log1p(joint.perplexity_increase)) / summed_nll))
        new_kld = min(4.0, max(0.25, joint.kld / summed_kld))
        # worth a second solve: a bound broken as measured, or one the sum kept further off than needed
        if (holds and new_nll >= 0.9 * nll_factor) or abs(new_nll / nll_factor - 1) < 0.1:
            break
        nll_factor, kld_factor = new_nll, new_kld
        following = solve_with(scaled(profile, nll_factor, kld_factor))
        if following.solution.status not in ("OPTIMAL", "FEASIBLE") or following.solution.layers == result.solution.layers:
            break
        result = following
    holding = [m for m in tried if all(c["holds"] for c in m.requirements)]
    return holding[-1] if holding else tried[0]


def _measured(result: SolveResult, joint) -> SolveResult:
    """`result` with its quality as measured jointly, its objectives and requirement checks re-read."""
    solution = result.solution
    quality = solution.predicted.quality
    predicted = solution.predicted.model_copy(update={"quality": quality.model_copy(update={
        "perplexity_increase": joint.perplexity_increase, "kld": joint.kld, "source": "profile"})})
    note = (f"quality measured on the mix itself: {joint.perplexity_increase:+.2%} perplexity, KL {joint.kld:.4f} on "
            f"{joint.tokens} calibration tokens of {joint.source} (its layers' profile figures summed "
            f"{quality.perplexity_increase:+.2%}, KL {quality.kld:.4f})")
    objective = [{"metric": readback.metric_text(o.metric), "sense": o.sense,
                  "value": readback.predicted_value(result.plan, o.metric, predicted)}
                 for o in result.problem.objectives] if result.problem is not None else solution.objective
    solution = solution.model_copy(update={"predicted": predicted, "objective": objective,
                                           "notes": [n for n in solution.notes if not n.startswith("quality measured")] + [note]})
    checks = readback.requirement_checks(result.plan, result.problem, predicted) if result.problem is not None \
        else result.requirements
    return SolveResult(solution, checks, result.scenarios, result.solve_s, result.build_s, result.quality_source,
                       result.problem_size, result.plan, result.problem)


def _search(plan_file, inventory: Inventory, target: ResolvedTarget, profile: QualityProfile | None, curve,
            started: float, time_limit_s: float, workers: int) -> SolveResult:
    """One solve of the plan's scenarios against `target` (see `solve_plan`)."""
    plan = plan_file.plan
    scenarios = scenarios_of(plan, inventory, target, plan_file.text, profile, curve)
    build_s = time.perf_counter() - started
    deadline = started + time_limit_s
    best = None
    compiled_all = []
    status, gap = "OPTIMAL", None
    # the most parallel scenarios first: they are fast to solve, and their optimum then cuts the
    # others off (proven by the LP bound); the winner is still the best key, ties to the canonical order
    order = sorted(range(len(scenarios)), key=lambda i: -scenarios[i][0]["tensor_parallel"])
    for index in order:
        settings, problem, extra = scenarios[index]
        hard = list(range(len(problem.requirements)))
        compiled = compile_problem(problem, hard=hard)
        compiled_all.append(compiled)
        cut = best is not None and bool(problem.objectives) and bool(best[1].values)
        if cut:  # only as good as the best first objective so far: the optimum of a scenario that can
            # match it is unchanged, and one that cannot is proven so by its first stage (one solve, where
            # a separate feasibility probe and a second compile cost two)
            add_cutoff(compiled, problem.objectives[0], best[1].values[0][1])
        outcome = solve_lexicographic(compiled, time_limit_s=max(0.05, deadline - time.perf_counter()),
                                      workers=workers, tie_break=False)
        if cut and outcome.status == "INFEASIBLE":
            continue  # cannot even match the best first objective so far
        if outcome.status in ("OPTIMAL", "FEASIBLE"):
            if outcome.status == "FEASIBLE":
                status, gap = "FEASIBLE", max(gap or 0.0, outcome.gap or 0.0)
            key = (_lex_key(outcome, problem), index)
            if best is None or key < best[4]:
                best = (settings, outcome, problem, extra, key)
        elif outcome.status == "UNKNOWN":
            status = "FEASIBLE" if status != "UNKNOWN" else status
    if best is not None and best[1].status == "OPTIMAL":
        # the tie-break only for the winner: the objectives are already proven, this picks among equals
        settings, _, problem, extra, key = best
        final = solve_lexicographic(compile_problem(problem, hard=list(range(len(problem.requirements)))),
                                    time_limit_s=max(0.05, deadline - time.perf_counter()), workers=workers)
        if final.status == "OPTIMAL" and final.values == best[1].values:
            best = (settings, final, problem, extra, key)
    solve_s = time.perf_counter() - started - build_s
    base = dict(plan_name=plan.name, plan_hash=plan_file.sha256)
    size = {"scenarios": len(scenarios), "units": len(scenarios[0][1].units), "layers": len(scenarios[0][1].layers),
            "variables": sum(len(c.assign) + len(c.place) for c in compiled_all)}
    if best is None:
        problems = [p for _, p, _ in scenarios]
        sets = conflict_sets(problems, workers=workers)
        conflict = [r for group in sets for r in group]
        problem = scenarios[0][1]
        conflicts = [Conflict(line=problem.requirements[c.requirement].line,
                              text=problem.requirements[c.requirement].text,
                              needed=readback.needed_text(plan, problem.requirements[c.requirement], c.needed,
                                                          len(c.members)))
                     for group in sets for c in needed_values(problems, group, workers=workers)]
        notes = [] if conflict else ["no combination fits even without any `require` line or capacity: "
                                     "some unit has no place (no link to an offload device?)"]
        solution = Solution(**base, status="INFEASIBLE" if status == "OPTIMAL" else "UNKNOWN",
                            conflicts=conflicts, notes=notes)
        return SolveResult(solution, scenarios=len(scenarios), solve_s=time.perf_counter() - started - build_s,
                           build_s=build_s, problem_size=size)
    settings, outcome, problem, extra, _ = best
    if isinstance(plan.workload, ast.TrainingWorkload):
        solution, predicted = training.read_training(plan, inventory, target, problem, outcome, base)
    else:
        blocks = {w.module: w.block for w in inventory.weights if not w.is_bias}
        layers = readback.mark_loaded(readback.layer_choices(problem, outcome.assignment, blocks), inventory)
        predicted = evaluate(inventory, target, plan.workload, layers, settings["kv_format"],
                             settings["tensor_parallel"], quality_profile=profile)
        solution = Solution(**base, status=status, gap=gap, layers=layers, kv_format=settings["kv_format"],
                            tensor_parallel=settings["tensor_parallel"], prefill_dtypes=priced_prefill_dtypes(target),
                            pipeline_stages=readback.stages(problem, outcome.assignment, inventory.arch.layers),
                            devices_used=readback.devices_used(predicted, target),
                            predicted=predicted, notes=readback.notes(problem) + (
                                [] if outcome.tie_break_proven else
                                ["every objective is proven optimal; the tie-break among equal solutions hit its "
                                 "deterministic budget (the answer is still reproducible)"]) + (
                                [prior_note(predicted.quality.perplexity_increase)]
                                if predicted.quality.source == "prior" and predicted.quality.perplexity_increase > 0
                                else []))
    if settings.get("recover_steps") is not None:
        solution = _with_recover(solution, plan, inventory, target, settings["recover_steps"], curve)
    objective = [{"metric": readback.metric_text(o.metric), "sense": o.sense,
                  "value": readback.predicted_value(plan, o.metric, solution.predicted)}
                 for o in problem.objectives]
    solution = solution.model_copy(update={"objective": objective})
    checks = readback.requirement_checks(plan, problem, solution.predicted)
    return SolveResult(solution, checks, len(scenarios), solve_s, build_s,
                       solution.predicted.quality.source, size, plan, problem)


def _recovery_curve(plan_file, inventory):
    """The measured recovery curve of this plan's model and text (`lwdsl profile`), else None (prior)."""
    if not allowance(plan_file.plan.allow.techniques).recover_up_to:
        return None
    from lwdsl.profile.recovery import load_curve

    return load_curve(plan_file)


def _with_recover(solution: Solution, plan, inventory, target, steps: int, curve) -> Solution:
    """The solution's quality after `steps` of distillation, and what the distillation costs."""
    import math

    from lwdsl.cost import training as training_cost
    from lwdsl.cost.recovery import RecoveryCurve, recovered_fraction, recovery_time_s
    from lwdsl.solution import RecoverChoice

    curve = curve or RecoveryCurve()
    fraction = recovered_fraction(curve, steps)  # of the log-perplexity increase
    quality = solution.predicted.quality
    keep = 1.0 - fraction
    recovered = quality.model_copy(update={
        "perplexity_increase": math.expm1(keep * math.log1p(quality.perplexity_increase)),
        "kld": (1.0 - recovered_fraction(curve.for_kld(), steps)) * quality.kld})
    workload = ast.TrainingWorkload(batch=1, sequence=DISTILL_SEQUENCE, tokens=DISTILL_SEQUENCE,
                                    optimizer="adamw", precision="fp32")
    step = training_cost.step_figures(inventory, target, workload)
    choice = RecoverChoice(steps=steps, recovered_fraction=fraction,
                           unrecovered_perplexity_increase=quality.perplexity_increase,
                           unrecovered_kld=quality.kld, time_s=recovery_time_s(step.step_s, steps),
                           curve_source=curve.source)
    predicted = solution.predicted.model_copy(update={"quality": recovered})
    note = (f"recover distill: {steps} steps win back {fraction:.0%} of the compression's quality loss "
            f"({curve.source} curve), about {choice.time_s:.0f} s here")
    return solution.model_copy(update={"predicted": predicted, "recover": choice, "notes": solution.notes + [note]})


DISTILL_SEQUENCE = 128  # tokens a distillation step trains on (`lwdsl.apply.distill`)
