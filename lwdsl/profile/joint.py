"""A solution's quality measured as it composes: every chosen layer's change applied at once to the
model, on the calibration windows of the plan's `eval` text (held out from what `check` evaluates).

The profile's figures are per layer and add up (in log-likelihood), with scales fitted on whole-model
runs of one format everywhere. A mix composes differently: Gemma-3-270M's int8 / int4 g32 / g128 mix on
the Python docs was priced +11.8% from its layers where the mix itself measured +8.0% on the same
windows (and +6.5% on the evaluation's): int4 everywhere compounds more than int4 on a third of the
layers, and the whole-model scales carry that compounding into every layer. `solve` therefore measures
the solution it found (`lwdsl.solve.search`), rescales the profile by what the mix measured against its
sum, solves again where that moves the answer, and reports the measured figure.

Results are cached by the model, the calibration text and the choices (`~/.cache/lwdsl/profiles/joint`).

    >>> joint = measure_choices(plan_file, solution.layers)       # doctest: +SKIP
    >>> joint.perplexity_increase                                  # doctest: +SKIP
    0.0803
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lwdsl.solution import LayerChoice, PruneChoice, QualityProfile, QuantFormat

VERSION = 1


@dataclass(frozen=True)
class JointQuality:
    perplexity_increase: float
    kld: float
    tokens: int  # predicted positions scored
    source: str  # the calibration text the windows came from


def _changed(layers: list[LayerChoice]) -> list[tuple[str, tuple[QuantFormat, PruneChoice]]]:
    """The layers whose weights the solution changes, with what (kept and float32 layers change nothing)."""
    return sorted((c.name, (c.format, c.prune)) for c in layers
                  if not c.kept and (c.format.dtype != "fp32" or c.prune.kind != "none"))


def _cache_path(plan_file, changed, eval_source: str) -> Path | None:
    from lwdsl.profile.keys import model_hash
    from lwdsl.profile.store import digest, profiles_root
    from lwdsl.verify.text import calibration_hash

    plan, base_dir = plan_file.plan, Path(plan_file.base_dir)
    model = model_hash(plan.model, base_dir)
    if model is None:
        return None
    choices = ";".join(f"{name}={fmt.model_dump_json()}|{prune.model_dump_json()}" for name, (fmt, prune) in changed)
    key = digest(str(VERSION), model, calibration_hash(plan, base_dir), eval_source, choices)
    return profiles_root() / "joint" / f"{key}.json"


def measure_choices(plan_file, layers: list[LayerChoice]) -> JointQuality | None:
    """The perplexity change and KL of `layers` applied together, on the calibration windows of the
    plan's `eval` text (all calibration windows when calibration does not read it); None for a model
    without weights. Prunes are cross-fitted as the profile does: channels chosen on one half of the
    windows, measured on the other, both ways."""
    plan = plan_file.plan
    if plan.model.scheme in ("arch", "config"):
        return None
    eval_source = plan.model.eval.source if plan.model.eval else "text:python-docs"
    changed = _changed(layers)
    if not changed:
        return JointQuality(0.0, 0.0, 0, eval_source)
    path = _cache_path(plan_file, changed, eval_source)
    if path is not None and path.exists():
        try:
            return JointQuality(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            pass
    result = _measure(plan_file, changed, eval_source)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".joint-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(result), handle)
        os.replace(partial, path)
    return result


def _measure(plan_file, changed, eval_source: str) -> JointQuality:
    import torch

    from lwdsl.models.load import load_model
    from lwdsl.profile.deltas import dense_delta, prune_scores
    from lwdsl.profile.sensitivity import joint_losses, reference_log_probs
    from lwdsl.verify.text import plan_texts

    plan, base_dir = plan_file.plan, Path(plan_file.base_dir)
    model, tokenizer = load_model(plan.model, base_dir)
    calibration = plan_texts(plan, base_dir, tokenizer).calibration
    sources = calibration.sources or (calibration.source,) * calibration.ids.shape[0]
    rows = [i for i, source in enumerate(sources) if source == eval_source] or list(range(len(sources)))
    windows = calibration.ids[torch.tensor(rows, dtype=torch.long)]
    options = {name: [option] for name, option in changed}
    prunes = any(prune.kind != "none" for _name, (_fmt, prune) in changed)
    half = windows.shape[0] // 2
    with torch.no_grad():
        if not prunes or not half:
            scores = prune_scores(model, options, windows) if prunes else None
            measured = [(1.0, scores, slice(None))]
        else:
            folds = (slice(0, half), slice(half, None))
            _all, *by_fold = prune_scores(model, options, windows, folds)
            measured = [(windows[fold].shape[0] / windows.shape[0], chosen, fold)
                        for chosen, fold in zip(by_fold, reversed(folds))]  # chosen on one half, measured on the other
        kld = nll = 0.0
        for share, scores, fold in measured:
            group = [(name, lambda name=name, option=option, scores=scores: dense_delta(model, name, option, scores))
                     for name, option in changed]
            part = windows[fold]
            loss = joint_losses(model, [group], part, reference=reference_log_probs(model, part))[0]
            kld += share * loss.kld
            nll += share * loss.nll_change
    del model
    return JointQuality(math.expm1(nll), kld, int(windows[:, 1:].numel()), eval_source)


def scaled(profile: QualityProfile, nll_factor: float, kld_factor: float) -> QualityProfile:
    """The profile with every layer's log-likelihood change and KL multiplied: what a measured mix says
    its layers' sum over- or under-states."""
    entries = [entry.model_copy(update={"kld": entry.kld * kld_factor,
                                        "perplexity_increase": math.expm1(math.log1p(entry.perplexity_increase) * nll_factor)})
               for entry in profile.entries]
    return profile.model_copy(update={"entries": entries})
