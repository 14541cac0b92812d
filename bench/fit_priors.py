"""Fit the quality priors (`lwdsl.cost.quality`) to the profiles measured on real models.

    .venv/bin/python bench/fit_priors.py plans/smollm2_edge.lwp plans/qwen2_coder_edge.lwp plans/gemma3_edge.lwp

For each plan, its stored profile (`lwdsl profile PLAN` first) gives each layer's measured perplexity
change per format. A prior says a format on every linear layer of a model of N linear weights costs
`size_factor(N) * format_ppl(fmt)`, each layer its share by size in log-likelihood; so a profile
implies the whole-model figure `expm1(sum of the profiled layers' log1p(change) * N / profiled
weights)`. Fitted by least squares in logs over every (model, format):
`log(figure / group and zero-point factors) = log(base of the dtype) + exponent * log(reference / N)`,
int4's base held at the published +12% at 7B (`--anchor`): the three models span 100M-500M weights,
too narrow to place 7B by themselves.
Prints the implied figures, the fit, and each figure against the fitted and the current priors.
Prunes are left out (their priors come from published figures; a channel prune is a choice of
channels, not a rounding).
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from lwdsl.cost.quality import ASYMMETRIC_FACTOR

REFERENCE = 6.5e9  # lwdsl.cost.quality.REFERENCE_LINEAR_NUMEL


def implied_figures(plan_path: Path) -> tuple[str, int, dict]:
    """`(model, N, {format: (whole-model figure, profiled share of N, mean group factor)})` from the
    plan's stored profile (the group factor weighted by the layers' sizes: per-channel depends on width)."""
    from lwdsl.cost.quality import _group_factor, prior_numel
    from lwdsl.inventory import load_inventory
    from lwdsl.plans import load_plan
    from lwdsl.profile.keys import plan_keys
    from lwdsl.profile.store import load_profile

    plan_file = load_plan(plan_path)
    keys = plan_keys(plan_file)
    profile = load_profile(*keys) if keys else None  # the calibration texts' mix: a prior knows no text
    if profile is None:
        raise SystemExit(f"{plan_path}: no stored profile; run `lwdsl profile {plan_path}` first")
    inventory = load_inventory(plan_file.plan.model, Path(plan_file.base_dir))
    layers = {w.module: w for w in inventory.linear_layers()}
    total = prior_numel(inventory.weights)
    nats, covered, grouping = defaultdict(float), defaultdict(int), defaultdict(float)
    for entry in profile.entries:
        if entry.prune.kind != "none" or entry.format.dtype == "fp32":
            continue
        weight = layers[entry.layer]
        nats[entry.format] += math.log1p(max(entry.perplexity_increase, -0.99))
        covered[entry.format] += weight.numel
        grouping[entry.format] += weight.numel * _group_factor(entry.format.group, weight.shape[-1])
    figures = {fmt: (math.expm1(nats[fmt] * total / covered[fmt]), covered[fmt] / total,
                     grouping[fmt] / covered[fmt]) for fmt in nats}
    return plan_file.plan.name, total, figures


def fit(rows: list[tuple], anchors: dict[str, float]) -> tuple[dict[str, float], float]:
    """Least squares in logs: `{dtype: base at the reference size}` and the size exponent, with the
    `anchors` (dtype -> published base at the reference size) held fixed. A figure of zero (a format
    that is the source file's own grid, lossless) says nothing about rounding and is left out."""
    dtypes = sorted({fmt.dtype for _m, _n, fmt, _y, _g in rows} - set(anchors))
    design, target = [], []
    for _model, total, fmt, figure, grouping in rows:
        if figure <= 0:
            continue
        factor = grouping * (1.0 if fmt.symmetric else ASYMMETRIC_FACTOR)
        known = math.log(anchors[fmt.dtype]) if fmt.dtype in anchors else 0.0
        design.append([1.0 if fmt.dtype == d else 0.0 for d in dtypes] + [math.log(REFERENCE / total)])
        target.append(math.log(figure / factor) - known)
    solution, *_ = np.linalg.lstsq(np.array(design), np.array(target), rcond=None)
    return {**anchors, **{d: math.exp(v) for d, v in zip(dtypes, solution[:-1])}}, float(solution[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", type=Path)
    parser.add_argument("--anchor", action="append", default=["int4=0.12"],
                        help="DTYPE=FIGURE held at the reference size (default: int4=0.12, AWQ's RTN at 7B)")
    args = parser.parse_args()
    from lwdsl.cost.quality import PER_CHANNEL_PPL, size_factor

    anchors = {d: float(v) for d, v in (a.split("=", 1) for a in args.anchor)}
    rows = []
    for plan in args.plans:
        model, total, figures = implied_figures(plan)
        for fmt, (figure, share, grouping) in sorted(figures.items(), key=lambda kv: kv[0].label()):
            rows.append((model, total, fmt, figure, grouping))
            print(f"{model}: {total / 1e6:.0f}M linear weights; {fmt.label()} on {share:.0%} of them -> "
                  f"whole model {figure:+.3%}")
    bases, exponent = fit(rows, anchors)
    print("\nfit: " + ", ".join(f"{d} {b:.4%} at the reference size" for d, b in bases.items())
          + f"; size exponent {exponent:.2f}")
    print("\n| model | format | implied by the profile | the fit | lwdsl.cost.quality now |")
    print("|---|---|---|---|---|")
    for model, total, fmt, figure, grouping in rows:
        factor = grouping * (1.0 if fmt.symmetric else ASYMMETRIC_FACTOR)
        fitted = bases[fmt.dtype] * factor * (REFERENCE / total) ** exponent
        current = size_factor(total) * PER_CHANNEL_PPL[fmt.dtype] * factor
        if figure <= 0:
            print(f"| {model} | {fmt.label()} | lossless (the source's own grid) | {fitted:+.2%} | {current:+.2%} |")
            continue
        print(f"| {model} | {fmt.label()} | {figure:+.2%} | {fitted:+.2%} ({fitted / figure:.2f}x) | "
              f"{current:+.2%} ({current / figure:.2f}x) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
