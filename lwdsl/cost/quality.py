"""Quality priors: the expected perplexity increase and KL divergence of a format or prune level when
no measured profile (`lwdsl profile`) exists. Pure; no torch.

A prior is a whole-model figure (every linear layer in that format) from published round-to-nearest
results on Llama-2-7B / WikiText-2; a layer's share is its fraction of the linear weights (`prior_numel`), so the
model's loss is additive across layers, as the solver needs. Small models lose more than these
figures say; a profile measured on the real weights always wins. Perplexity ratios compose by
multiplication (`lwdsl.cost.evaluate`: each layer's change of the log-likelihood adds), so a layer's
share is taken of `log1p` of the whole-model figure: every layer in a format gives back that figure.
"""
from __future__ import annotations

import math

from lwdsl.solution import PruneChoice, QuantFormat

# Relative perplexity increase with every linear layer stored in the format, one scale per output
# channel, symmetric. fp16/bf16: rounding only (bf16 has 8 mantissa bits). fp8 e4m3 per-channel:
# ~0.3% (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"). int8 per-channel, weights only:
# +0.03%, fitted to three measured profiles (below; W8A8, which quantizes activations too, is nearer
# 0.5%: LLM.int8(), Dettmers et al. 2022; SmoothQuant, Xiao et al. 2023). int4 per-channel RTN:
# 5.47 -> 6.12 = +12% (AWQ, Lin et al. 2024, Table 4); nf4 slightly better than int4 (QLoRA, Dettmers
# et al. 2023, Table 2). int2 RTN: the model breaks (perplexity in the thousands; GPTQ paper, Table 3).
PER_CHANNEL_PPL = {"fp32": 0.0, "fp16": 0.0002, "bf16": 0.001, "fp8": 0.003, "int8": 0.0003,
                   "int4": 0.12, "nf4": 0.10, "int2": 20.0}
# Grouping shrinks the error roughly with log2(group): int4 g128 RTN 5.47 -> 5.73 = +4.8% (AWQ Table 4),
# i.e. 0.4x per-channel at 128; g32 about 0.2x. Linear in log2(group) between 32 (0.2) and 128 (0.4),
# reaching 1.0 at 4096 input channels.
def _group_factor(group: int | None, in_features: int) -> float:
    size = group or in_features
    return min(1.0, max(0.1, 0.2 + 0.1 * (math.log2(max(size, 2)) - 5)))


ASYMMETRIC_FACTOR = 0.8  # a zero point fits skewed rows better (GPTQ/AWQ use asymmetric for that reason)

# Prune priors, whole model, no fine-tuning, per fraction removed: channels ~2.5x the fraction
# (LLM-Pruner, Ma et al. 2023: 20% of Llama-7B, 12.6 -> 19.1 without tuning); heads 2x; unstructured
# magnitude, quadratic: +28% at 50% (Wanda, Sun et al. 2024); 2:4: about +100% (Wanda, Table 3).
def prune_ppl(prune: PruneChoice) -> float:
    if prune.kind == "channels":
        return 2.5 * prune.fraction
    if prune.kind == "heads":
        return 2.0 * prune.fraction
    if prune.kind == "unstructured":
        return 1.1 * prune.fraction ** 2
    if prune.kind == "2:4":
        return 1.0
    return 0.0


def format_ppl(fmt: QuantFormat, in_features: int) -> float:
    """Whole-model relative perplexity increase with every linear layer in `fmt`."""
    base = PER_CHANNEL_PPL[fmt.dtype]
    if fmt.dtype in ("fp32", "fp16", "bf16"):
        return base
    factor = _group_factor(fmt.group, in_features)
    return base * factor * (1.0 if fmt.symmetric else ASYMMETRIC_FACTOR)


# The figures above are for a ~7B model. Smaller models lose more to the same rounding (fewer, denser
# weights carry each feature): int4 per-channel RTN costs OPT-6.7B +11% but OPT-125M +35% and BLOOM-560M
# +15% (GPTQ, Frantar et al. 2023, Tables 3-4). So the whole-model figure is scaled by
# (reference linear weights / this model's) ** SIZE_EXPONENT, at most MAX_SIZE_FACTOR, with this model's
# linear weights counted by `prior_numel` (a tied head not again: it is the embedding's matrix).
# Fitted (bench/fit_priors.py, least squares in logs, int4 anchored at AWQ's +12% at 7B) to the profiles
# measured on SmolLM2-135M, Qwen2.5-Coder-0.5B and Gemma-3-270M, calibrated on code and prose: exponent
# 0.68-0.69, int8 per channel +0.026-0.03% at 7B (weight-only int8 is far below LLM.int8's W8A8 figure);
# with the values below every (model, format) lands within 0.72x-1.39x of its profile (docs/BENCHMARKS.md,
# "Across models").
# Prunes scale much less with size: SmolLM2's profile put a 12.5% / 25% channel prune at 1.4x / 1.9x
# the published 7B figure where the rounding law would say 16x (PRUNE_SIZE_EXPONENT, one model: a
# rough figure). A prior stays a prior: PRIOR_UNCERTAINTY is the factor it is good to either way; a
# profile measured on the real weights replaces it.
REFERENCE_LINEAR_NUMEL = 6.5e9  # Llama-2-7B's linear weights (its untied head included)
SIZE_EXPONENT = 0.68
MAX_SIZE_FACTOR = 40.0
PRUNE_SIZE_EXPONENT = 0.15
PRIOR_UNCERTAINTY = 2.0  # a prior's perplexity change is good to about this factor either way


def prior_numel(weights) -> int:
    """The linear weights a prior's size law and layer shares count: every matrix a format can be
    chosen for, except a head tied to the embedding (the same matrix, counted once as the embedding,
    which is a lookup). Gemma-3-270M: 100M (its 168M tied head left out); Qwen2.5-Coder: 494M."""
    return sum(w.numel for w in weights if w.is_linear and w.tied_to is None)


def size_factor(total_linear_numel: int, exponent: float = SIZE_EXPONENT) -> float:
    """How much more than the ~7B reference figure a model of this many linear weights loses (>= 1)."""
    if total_linear_numel <= 0:
        return 1.0
    return min(MAX_SIZE_FACTOR, max(1.0, (REFERENCE_LINEAR_NUMEL / total_linear_numel) ** exponent))


def layer_quality(numel: int, total_linear_numel: int, in_features: int, fmt: QuantFormat,
                  prune: PruneChoice) -> tuple[float, float]:
    """(relative perplexity increase, KLD in nats) this layer adds: its share of the whole-model prior
    (scaled for the model's size, `size_factor`), taken in log-likelihood (`log1p`), so that the layers
    compose back to the whole-model figure.

    KLD ≈ ln(1 + Δppl): the mean increase in cross-entropy, which the KL divergence to the original
    bounds from above for small changes (Gibbs' inequality), used as the prior's KLD.
    """
    share = numel / total_linear_numel if total_linear_numel else 0.0
    whole = (size_factor(total_linear_numel) * format_ppl(fmt, in_features)
             + size_factor(total_linear_numel, PRUNE_SIZE_EXPONENT) * prune_ppl(prune))
    nats = share * math.log1p(whole)
    return math.expm1(nats), nats


def prior_note(perplexity_increase: float) -> str:
    """What a prior-based quality figure is good for, said with its range."""
    low, high = perplexity_increase / PRIOR_UNCERTAINTY, perplexity_increase * PRIOR_UNCERTAINTY
    return (f"quality from priors (published round-to-nearest figures scaled for a model of this size): good to "
            f"about {PRIOR_UNCERTAINTY:g}x either way, +{low:.1%} to +{high:.1%}; `lwdsl profile` measures it")
