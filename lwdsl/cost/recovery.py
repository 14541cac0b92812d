"""Recovery by distillation after compression (`recover distill up to N steps`). Pure; no torch.

Quality: after `s` steps of distillation from the original model, the compressed model keeps a
fraction `1 - r(s)` of the quality loss compression caused (its perplexity increase and KL), with

    r(s) = r_max · (1 - exp(-(s / tau)^k))

the saturating curve of a loss that decays toward a floor; k = 1 is a plain exponential, k < 1 a
stretched one (Kohlrausch), fast at first with a long slow tail, which is how distillation recovers
here: fitted to 30-150 steps of SmolLM2 pruned 25%, the plain exponential saturated at 0.70 and
predicted 0.70 at 300 steps where 0.84 was measured; the stretched fit (k 0.43) predicts 0.80.
`r_max`, `tau` and `k` are fitted by
`lwdsl.profile.recovery` on a short distillation of the plan's model with its strongest allowed
compression (the measured recovered fraction at a few step counts, least squares over a grid of tau
and k, with r_max in closed form). The fraction is measured on the held-out **log-perplexity** increase
(`log(ppl_compressed / ppl_original)`), the quantity the perplexity prediction scales; the KL to the
original recovers less per step (distillation first fixes the likely tokens, the tails' divergence
lingers), so it has its own fitted curve (`kld`) that scales the predicted KL. Without a measured curve, the prior below (documented, not measured here)
stands and `source` says `prior`. Because the fraction multiplies the compression's whole loss, a
solver scenario with a fixed step count keeps its quality terms linear: each is scaled by `1 - r(s)`.

Time: each step is one optimizer step of the trainer (`training.step_figures`: forward and backward of
the student) plus one forward of the teacher (a third of the student's compute).
"""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

# Prior: half of a compression's loss recovered, most of it within 100 steps (LLM-Pruner, Ma et al.
# 2023, Table 1: LoRA recovery after 20% pruning of LLaMA-7B wins back about half of the perplexity
# increase). Replaced by a measured curve whenever `lwdsl profile` ran for the plan.
PRIOR_R_MAX = 0.5
PRIOR_TAU_STEPS = 100.0
SHAPES = tuple(round(1.0 - 0.025 * i, 3) for i in range(31))  # k from 1 (tried first) down to 0.25
LEVELS = (0.0, 0.25, 0.5, 1.0)  # the step counts the solver may choose, as fractions of N


class RecoveryCurve(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    r_max: float = PRIOR_R_MAX
    tau_steps: float = PRIOR_TAU_STEPS
    shape: float = 1.0  # k: 1 a plain exponential, below 1 a stretched one (a longer tail)
    source: str = "prior"  # "prior" or "profile"
    points: tuple[tuple[int, float], ...] = ()  # the measured (steps, recovered fraction) it was fitted to
    measure: str = "log_ppl"  # what the fraction is of: the log-perplexity increase, or "kld"
    kld: RecoveryCurve | None = None  # the KL's own curve (None: the KL recovers as this curve says)

    def for_kld(self) -> RecoveryCurve:
        """The curve that scales the predicted KL."""
        return self.kld or self


RecoveryCurve.model_rebuild()


def recovered_fraction(curve: RecoveryCurve, steps: int) -> float:
    """r(s): the fraction of the compression's quality loss that `steps` steps of distillation win back."""
    if steps <= 0:
        return 0.0
    return max(0.0, min(1.0, curve.r_max * (1.0 - math.exp(-(steps / max(curve.tau_steps, 1e-9)) ** curve.shape))))


def step_levels(up_to: int) -> tuple[int, ...]:
    """The step counts a solver scenario may fix: 0, N/4, N/2, N (distinct, ascending)."""
    return tuple(sorted({int(round(f * up_to)) for f in LEVELS}))


def fit_curve(points: list[tuple[int, float]], measure: str = "log_ppl") -> RecoveryCurve:
    """Least-squares fit of r(s) = r_max·(1 - exp(-(s/tau)^k)) to measured (steps, recovered fraction):
    tau over a log grid, k over SHAPES (only k = 1 with fewer than 3 measured points: two points fix two
    parameters), r_max in closed form for each (tau, k) (the model is linear in r_max)."""
    usable = [(s, r) for s, r in points if s > 0]
    if not usable:
        return RecoveryCurve(measure=measure)
    best = None
    longest = max(s for s, _ in usable)
    for shape in (SHAPES if len(usable) >= 3 else (1.0,)):
        for k in range(121):
            tau = longest * 10 ** (-2 + 3 * k / 120)  # 1% .. 10x the longest measured run
            basis = [1.0 - math.exp(-(s / tau) ** shape) for s, _ in usable]
            r_max = sum(b * r for b, (_, r) in zip(basis, usable)) / sum(b * b for b in basis)
            r_max = max(0.0, min(1.0, r_max))
            error = sum((r_max * b - r) ** 2 for b, (_, r) in zip(basis, usable))
            if best is None or error < best[0] - 1e-12:
                best = (error, r_max, tau, shape)
    return RecoveryCurve(r_max=best[1], tau_steps=best[2], shape=best[3], source="profile", measure=measure,
                         points=tuple((int(s), float(r)) for s, r in points))


def recovery_time_s(step_s: float, steps: int) -> float:
    """Seconds of `steps` distillation steps, each a trainer step (`step_s`) plus a teacher forward
    (a third of a forward-and-backward)."""
    return steps * step_s * (1.0 + 1.0 / 3.0)
