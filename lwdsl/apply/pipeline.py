"""A plan applied end to end: its model loaded, its solution (given, or solved now) applied by the
driver, the artifact written. `lwdsl apply` and the `lwdsl.apply(...)` facade both come here.

    folder = apply_plan("plans/smollm2_edge.lwp", "out/edge")
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lwdsl.errors import ExitCode, fail
from lwdsl.solution import Solution


def resolve_solution(plan_file, solution: Solution | None = None, time_limit_s: float = 60.0) -> Solution:
    """The solution to apply: the one given, or the solver's; E645 (exit 1) when there is none."""
    if solution is None:
        from lwdsl.solve.search import solve_plan

        solution = solve_plan(plan_file, time_limit_s=time_limit_s).solution
    if solution.status not in ("OPTIMAL", "FEASIBLE"):
        raise fail("E645", f"the solution is {solution.status}: there is nothing to apply",
                   hint="`lwdsl solve PLAN` explains which requirements conflict", exit_code=ExitCode.UNMET)
    return solution


def apply_plan(plan, output, solution: Solution | None = None, calibrate: bool = True,
               progress: Callable[[str], None] | None = None, time_limit_s: float = 60.0) -> Path:
    """Apply `plan` (a path or a loaded `PlanFile`) and write the artifact to `output`; its folder.

    Prunes are scored on the plan's calibration text unless `calibrate` is False (magnitude then).
    The source model is only read: the driver works on the copy loaded here.
    """
    from lwdsl.apply import DriverContext, apply_solution
    from lwdsl.artifact import file_sha256, save_artifact
    from lwdsl.models.load import load_model, source_path
    from lwdsl.plans import PlanFile, load_plan

    plan_file = plan if isinstance(plan, PlanFile) else load_plan(plan)
    solution = resolve_solution(plan_file, solution, time_limit_s)
    block, base_dir = plan_file.plan.model, Path(plan_file.base_dir)
    model, tokenizer = load_model(block, base_dir)
    _note(progress, "model loaded")
    calibration = None
    if calibrate and any(c.prune.kind != "none" for c in solution.layers):
        from lwdsl.verify.text import plan_texts

        calibration = plan_texts(plan_file.plan, base_dir, tokenizer).calibration.ids
    kinds = {device.name: device.kind for device in plan_file.plan.target.devices}
    model = apply_solution(model, solution, DriverContext(device_kinds=kinds, calibration_ids=calibration,
                                                          progress=progress))
    if solution.recover is not None and solution.recover.steps > 0:
        model = _recover(plan_file, model, tokenizer, solution.recover.steps, progress)
    source = source_path(block, base_dir)
    return save_artifact(model, tokenizer, output, solution=solution, plan_hash=plan_file.sha256,
                         source_model=block.source, source_hash=file_sha256(source) if source.is_file() else "",
                         device_kinds=kinds, progress=progress)


def _recover(plan_file, model, tokenizer, steps: int, progress):
    """`recover distill`: the compressed model learns from the original on the calibrate text."""
    from lwdsl.apply.distill import distill
    from lwdsl.models.load import load_model
    from lwdsl.verify.text import plan_texts

    teacher, _ = load_model(plan_file.plan.model, Path(plan_file.base_dir))
    windows = plan_texts(plan_file.plan, Path(plan_file.base_dir), tokenizer,
                         calibration_tokens=max(1024, 128 * steps)).calibration.ids
    distill(model, teacher, windows, steps,
            on_step=(lambda s, kl: _note(progress, f"distill step {s}/{steps}: KL {kl:.4f}")) if progress else None)
    del teacher
    if hasattr(model, "_lwdsl_distill_optimizer"):
        del model._lwdsl_distill_optimizer  # its states are not part of the artifact
    return model


def _note(progress, what: str) -> None:
    if progress is not None:
        progress(what)
