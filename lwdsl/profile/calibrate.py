"""From per-layer estimates to what the whole model does: scales measured on the real model.

The estimate (`lwdsl.profile.sensitivity`) is per layer, position-local and second order; what
`check` measures is the whole model's KL and perplexity on held-out text. Measured on SmolLM2, three
things separate them, and each is measured here rather than assumed:

- **KL scale**: the summed estimates of one option on many layers fall short of the joint KL
  (cross-position terms, compounding across layers), by a factor that depends on the option and on
  where the layers sit (int4 on the first half of the blocks: 0.93x the summed estimate; on the
  second half: 1.29x).
- **Perplexity per nat of KL**: the real tokens' negative log-likelihood rises by less than the KL
  (the perturbed model is flatter, and the original is over-confident on this text): 0.54 nats per
  nat of KL for int4 in the first half of the blocks, 0.85 in the second half; 0.3-0.7 for pruning.
- **Held-out prunes**: which channels or heads go is chosen on the calibration text, so the loss on
  that same text is optimistic (on SmolLM2 the held-out KL of a 25% channel prune was 1.3-1.8x the
  in-sample one).

So, per option *kind* (a format alone, or a prune level alone) and per depth *group* (the first,
middle and last third of the blocks), the whole model is run with the kind on every layer of the
first group that has it, then of the first two, then of all (`measure_scales`; the runner in
`lwdsl.profile` measures formats on every calibration window and cross-fits prunes: chosen on one
half of the windows, measured on the other). A group's figures are the difference of consecutive
runs, so a uniform plan's sum is the measured joint figure, compounding included. Each layer's
estimate is then scaled by its kind and group: `kld = kappa * estimate`, `nll = beta * kappa *
estimate`, with `beta` (nats of NLL per nat of KL) pooled over the kinds of one family (formats,
prunes) per group, so that the near-lossless kinds, whose NLL change is below the text's noise,
take the family's figure. Only the family's largest kind is run group by group; the others are run
once, on all their layers, and take its profile over depth. An option that combines a format and a
prune level takes the two kinds' scales in proportion to its parts' estimates.

    >>> scales = measure_scales(options, estimates, run_jobs, blocks=30)         # doctest: +SKIP
    >>> calibrated = apply_scales(options, estimates, scales, blocks=30)         # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lwdsl.profile.sensitivity import LayerLoss
from lwdsl.solution import PruneChoice, QuantFormat

SCALE_RANGE = (0.25, 4.0)  # a KL scale outside this says the estimate is broken, not biased
BETA_RANGE = (0.0, 1.5)  # nats of NLL per nat of KL


@dataclass(frozen=True)
class Scale:
    kappa: float  # measured joint KL / summed estimates
    beta: float  # measured NLL change / measured KL (pooled over the family)


def kind_of(option) -> tuple[QuantFormat, PruneChoice] | None:
    """The single-technique kind an option is measured as: itself if it is a format alone or a
    prune level alone, None for a combination."""
    fmt, prune = option
    if (fmt.dtype == "fp32") != (prune.kind == "none"):
        return option
    return None


def _family(kind) -> str:
    return "prune" if kind[1].kind != "none" else "format"


GROUPS = 3  # depth groups of blocks, each with its own scales (first, middle, last third)


def group_of(name: str, blocks: int) -> int:
    """The depth group of a layer: its block's third (0, 1, 2); layers outside the blocks: the last."""
    parts = name.split(".")
    for here, after in zip(parts, parts[1:]):
        if here == "layers" and after.isdigit():
            return min(GROUPS - 1, int(after) * GROUPS // max(blocks, 1))
    return GROUPS - 1


def measure_scales(options: dict[str, list], estimates: dict[str, dict],
                   run: Callable[[list], list[LayerLoss]], blocks: int) -> dict:
    """`{(kind, group): Scale}` from whole-model runs: each kind on every layer that has it, and the
    family's largest kind (formats; prunes) also on the first group, then the first two, ... Each
    group's figures are the difference of consecutive runs, so they add up to the whole run (the
    compounding with the groups before it is counted in the later group). The family's other kinds
    take the largest one's profile over depth, rescaled to their own whole run.

    `run([(kind, layer names), ...])` measures each job jointly (the kind applied to all its layers
    at once, as the executor would, on text its prune selection did not see) and returns one
    `LayerLoss` per job."""
    kinds: dict = {}
    for name, layer_options in options.items():
        for option in layer_options:
            if kind_of(option) is not None:
                kinds.setdefault(option, []).append(name)
    by_group = {kind: [sum(estimates[n][kind].kld for n in names if group_of(n, blocks) == g) for g in range(GROUPS)]
                for kind, names in kinds.items()}
    leaders = {}
    for kind in sorted(kinds, key=lambda k: (-sum(by_group[k]), str(k))):
        leaders.setdefault(_family(kind), kind)
    jobs: list = []
    cuts: dict = {}  # kind -> [(group, job)]: runs over the groups up to and including `group`
    for kind, names in kinds.items():
        present = sorted({group_of(n, blocks) for n in names})
        cuts[kind] = []
        for last in (present if leaders[_family(kind)] == kind else present[-1:]):
            cuts[kind].append((last, len(jobs)))
            jobs.append((kind, [n for n in names if group_of(n, blocks) <= last]))
    measured = run(jobs) if jobs else []
    raw: dict = {}  # (kind, group) -> (estimate sum, kld, nll)
    for kind in kinds:
        before = LayerLoss(kld=0.0, nll_change=0.0)
        for group, job in cuts[kind]:
            here = measured[job]
            estimated = by_group[kind][group] if len(cuts[kind]) > 1 else sum(by_group[kind])
            raw[(kind, group if len(cuts[kind]) > 1 else None)] = (estimated, here.kld - before.kld,
                                                                    here.nll_change - before.nll_change)
            before = here
    beta: dict = {}
    for family in ("format", "prune"):
        pooled = [v for (k, g), v in raw.items() if _family(k) == family]
        for group in range(GROUPS):
            rows = [v for (k, g), v in raw.items() if _family(k) == family and g == group] or pooled
            kld, nll = sum(r[1] for r in rows), sum(r[2] for r in rows)
            beta[(family, group)] = _clamp(nll / kld, BETA_RANGE) if kld > 0 else 1.0
    kappa: dict = {}
    for (kind, group), (estimated, kld, _nll) in raw.items():
        if group is not None:
            kappa[(kind, group)] = _clamp(kld / estimated, SCALE_RANGE) if estimated > 0 and kld > 0 else 1.0
    scales = {}
    for (kind, group), (estimated, kld, _nll) in raw.items():
        if group is not None:
            scales[(kind, group)] = Scale(kappa=kappa[(kind, group)], beta=beta[(_family(kind), group)])
            continue
        leader = leaders[_family(kind)]
        profile = [kappa.get((leader, g), 1.0) for g in range(GROUPS)]  # the leader's depth profile
        weighted = sum(p * e for p, e in zip(profile, by_group[kind]))
        level = kld / weighted if weighted > 0 and kld > 0 else 1.0
        for g in range(GROUPS):
            scales[(kind, g)] = Scale(kappa=_clamp(level * profile[g], SCALE_RANGE), beta=beta[(_family(kind), g)])
    return scales


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def apply_scales(options: dict[str, list], estimates: dict[str, dict], scales: dict,
                 blocks: int) -> dict[str, dict]:
    """`losses[layer][option]`: each estimate scaled by its kind's (or its parts') measured scale."""
    result: dict[str, dict] = {}
    for name, layer_options in options.items():
        group = group_of(name, blocks)
        result[name] = {}
        for option in layer_options:
            estimate = estimates[name][option].kld
            fmt, prune = option
            if kind_of(option) is not None:
                parts = [(1.0, scales.get((option, group)))]
            else:  # a format on a pruned layer: the parts in proportion to their own estimates
                as_format, as_prune = (fmt, PruneChoice()), (QuantFormat(), prune)
                own = [max(estimates[name].get(k, LayerLoss(0.0, 0.0)).kld, 0.0) for k in (as_format, as_prune)]
                total = sum(own) or 1.0
                parts = [(own[0] / total, scales.get((as_format, group))),
                         (own[1] / total, scales.get((as_prune, group)))]
            kappa = sum(w * (s.kappa if s else 1.0) for w, s in parts)
            nll = sum(w * (s.kappa * s.beta if s else 1.0) for w, s in parts)
            result[name][option] = LayerLoss(kld=estimate * kappa, nll_change=estimate * nll)
    return result
