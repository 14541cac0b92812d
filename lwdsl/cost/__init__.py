"""The cost model: pure functions (no torch) from inventory × hardware × choices to bytes and seconds.

- `formats`: bytes of a weight per storage format and prune choice; whether a format applies.
- `memory`: KV cache, activations and workspace.
- `time`: roofline, link transfers, all-reduce.
- `terms`: per-layer / per-block terms (the solver's linear coefficients).
- `evaluate`: whole-model figures as the sums of those terms; `training`: ZeRO states, 6·P·D.
- `quality`: priors of perplexity / KLD per format and prune level.
"""
from __future__ import annotations

from lwdsl.cost.evaluate import Breakdown, breakdown, default_choices, evaluate, training_breakdown

__all__ = ["Breakdown", "breakdown", "default_choices", "evaluate", "training_breakdown"]
