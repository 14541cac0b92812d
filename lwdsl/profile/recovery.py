"""The measured recovery curve of `recover distill`: what `cost.recovery` predicts with.

`measure_curve` compresses the plan's model with its strongest allowed compression (every layer at
its deepest allowed prune level and its smallest allowed format), distils it from the original on
the calibrate text (`lwdsl.apply.distill`, through the quantizer where layers are quantized, as
`apply` runs it) and, after N/10, N/5, N/3 and N/2 steps, measures the held-out perplexity and KL to
the original on evaluation windows it never trained on. The recovered fraction at s steps is
1 - L(s) / L(0) with L the log-perplexity increase, log(ppl / ppl_original) (the curve the solver's
perplexity prediction is scaled by), and separately with L the KL (the `kld` curve);
`cost.recovery.fit_curve` fits r(s) = r_max·(1 - exp(-(s/tau)^k)) to each by least squares (again on
every load, from the stored points). Stored under `$LWDSL_CACHE/profiles/recovery-*.json` by model, compression,
step budget and text; `solve` reads it (`load_curve`), else it uses the documented prior.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

from lwdsl.cost.recovery import RecoveryCurve, fit_curve
from lwdsl.profile.store import digest, profiles_root

CURVE_FORMAT = "recovery/v2"  # v2: fitted on the log-perplexity increase, with a KL curve beside it
EVAL_WINDOWS = 4  # held-out windows of 256 tokens the recovery is measured on
FRACTIONS = (0.1, 0.2, 1 / 3, 0.5)  # of N: the step counts measured


def strongest_choices(plan_file) -> list:
    """Every choosable layer at its deepest allowed prune and its smallest allowed format."""
    from lwdsl.cost.evaluate import default_choices
    from lwdsl.cost.formats import format_applies, weight_bytes
    from lwdsl.hardware import resolve_target
    from lwdsl.inventory import load_inventory
    from lwdsl.solve.allowed import allowance

    plan = plan_file.plan
    inventory = load_inventory(plan.model, Path(plan_file.base_dir))
    allowed = allowance(plan.allow.techniques)
    choices = []
    for choice in default_choices(inventory, resolve_target(plan.target, run_probe=False)):
        weight = inventory.weight(choice.name)
        module = allowed.for_module(choice.name)
        if module.kept or not weight.is_linear:
            choices.append(choice)
            continue
        prunes = [p for p in module.prunes if p.kind == "none" or _prunable(p, weight.role)]
        prune = max(prunes, key=lambda p: p.fraction)
        formats = [f for f in module.formats if format_applies(weight.shape, f) is None]
        fmt = min(formats, key=lambda f: weight_bytes(weight.shape, f))
        choices.append(choice.model_copy(update={"format": fmt, "prune": prune}))
    return choices


def _prunable(prune, role: str) -> bool:
    if prune.kind == "channels":
        return role.startswith("mlp_")
    if prune.kind == "heads":
        return role.startswith("attn_")
    return True


def curve_path(plan_file, up_to: int, choices) -> Path | None:
    from lwdsl.profile.keys import model_hash
    from lwdsl.verify.text import calibration_hash

    weights = model_hash(plan_file.plan.model, Path(plan_file.base_dir))
    if weights is None:
        return None
    compression = json.dumps([[c.name, c.format.label(), c.prune.kind, c.prune.fraction] for c in choices])
    text = calibration_hash(plan_file.plan, Path(plan_file.base_dir))
    return profiles_root() / f"recovery-{digest(CURVE_FORMAT, weights, compression, str(up_to), text)}.json"


def _up_to(plan_file) -> int:
    from lwdsl.solve.allowed import allowance

    return allowance(plan_file.plan.allow.techniques).recover_up_to


def load_curve(plan_file) -> RecoveryCurve | None:
    """The stored measured curve for this plan, or None."""
    up_to = _up_to(plan_file)
    if not up_to:
        return None
    try:
        path = curve_path(plan_file, up_to, strongest_choices(plan_file))
    except Exception:  # a model that cannot be read has no curve; the prior stands
        return None
    if path is None or not path.is_file():
        return None
    return _fitted(json.loads(path.read_text())["curve"])


def _fitted(stored: dict) -> RecoveryCurve:
    """The curve of a stored measurement, fitted again from its points (the points are the measurement;
    a better fit applies to curves measured before it)."""
    curve = RecoveryCurve.model_validate(stored)
    if not curve.points:
        return curve
    kld = curve.kld
    refit = fit_curve(list(curve.points), curve.measure)
    if kld is not None and kld.points:
        kld = fit_curve(list(kld.points), "kld")
    return refit.model_copy(update={"kld": kld})


def measure_curve(plan_file, force: bool = False, progress=None) -> tuple[RecoveryCurve, Path]:
    """Measure, fit and store the plan's recovery curve (or find it stored)."""
    from lwdsl.apply import DriverContext, apply_solution
    from lwdsl.apply.distill import distill
    from lwdsl.models.load import load_model
    from lwdsl.solution import Solution
    from lwdsl.verify.quality import compare_quality
    from lwdsl.verify.text import plan_texts

    up_to = _up_to(plan_file)
    choices = strongest_choices(plan_file)
    path = curve_path(plan_file, up_to, choices)
    if path is not None and path.is_file() and not force:
        return _fitted(json.loads(path.read_text())["curve"]), path
    plan, base_dir = plan_file.plan, Path(plan_file.base_dir)
    teacher, tokenizer = load_model(plan.model, base_dir)
    counts = sorted({max(1, int(round(f * up_to))) for f in FRACTIONS})
    texts = plan_texts(plan, base_dir, tokenizer, eval_tokens=EVAL_WINDOWS * 256,
                       calibration_tokens=max(1024, 128 * counts[-1]))
    student = copy.deepcopy(teacher)
    kinds = {d.name: d.kind for d in plan.target.devices}
    solution = Solution(plan_name=plan.name, plan_hash=plan_file.sha256, status="OPTIMAL", layers=choices)
    calibration = texts.calibration.ids[:4].reshape(1, -1)
    student = apply_solution(student, solution, DriverContext(device_kinds=kinds, calibration_ids=calibration))
    held_out = texts.evaluation.ids[:EVAL_WINDOWS]

    def losses() -> tuple[float, float]:
        quality = compare_quality(teacher, student, held_out)
        return math.log1p(quality.perplexity_increase), quality.kld

    start = losses()
    log_ppl_points, kld_points, done = [(0, 0.0)], [(0, 0.0)], 0
    for count in counts:
        distill(student, teacher, texts.calibration.ids, count - done, start_step=done, keep_training=True)
        done = count
        log_ppl, kld = losses()
        log_ppl_points.append((count, 1.0 - log_ppl / start[0] if start[0] > 0 else 0.0))
        kld_points.append((count, 1.0 - kld / start[1] if start[1] > 0 else 0.0))
        if progress:
            progress(f"recovery after {count} steps: held-out perplexity {math.expm1(log_ppl):+.1%} "
                     f"(from {math.expm1(start[0]):+.1%}), KL {kld:.4f} (from {start[1]:.4f})")
    curve = fit_curve(log_ppl_points).model_copy(update={"kld": fit_curve(kld_points, "kld")})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".recovery.", suffix=".partial")
        with os.fdopen(fd, "w") as handle:
            json.dump({"curve": curve.model_dump(mode="json"),
                       "start": {"log_ppl_increase": start[0], "kld": start[1]}}, handle)
        os.replace(partial, path)
    return curve, path
