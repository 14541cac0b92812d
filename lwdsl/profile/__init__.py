"""`lwdsl profile`: the measured quality cost of every allowed option on every layer, alone.

    >>> run = profile(load_plan("plans/smollm2_edge.lwp"))     # doctest: +SKIP
    >>> run.profile.entries[0]                                  # doctest: +SKIP
    ProfileEntry(layer='model.layers.0.self_attn.q_proj', format=..., kld=4.5e-07, ...)

The solver reads the stored result through `find_profile(plan_file)` (lwdsl.profile.store).
How the losses are measured: `lwdsl.profile.sensitivity`; what a delta is: `lwdsl.profile.deltas`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from lwdsl.errors import fail
from lwdsl.profile.store import find_profile, load_profile, save_profile
from lwdsl.solution import ProfileEntry, QualityProfile

__all__ = ["ProfileRun", "find_profile", "profile", "save_profile"]


@dataclass(frozen=True)
class ProfileRun:
    profile: QualityProfile
    path: Path
    seconds: float
    cached: bool  # found in the store, nothing measured
    options: int  # (layer, option) pairs


def profile(plan_file, force: bool = False, progress: bool = False,
            calibration_tokens: int | None = None) -> ProfileRun:
    """Measure (or find) the quality profile of a plan's allowed options on its model's weights."""
    from lwdsl.inventory import load_inventory
    from lwdsl.profile import keys
    from lwdsl.profile.options import layer_options

    started = time.perf_counter()
    plan, base_dir = plan_file.plan, Path(plan_file.base_dir)
    if plan.model.scheme in ("arch", "config"):
        raise fail("E730", f"model {plan.model.source!r} has no weights to profile", plan.model.span,
                   hint="`solve` uses quality priors for models without weights")
    options = layer_options(plan, load_inventory(plan.model, base_dir))
    if not options:
        raise fail("E731", "nothing to profile: `allow` permits no weight format or prune level",
                   plan.allow.span, hint="add e.g. `quantize weights int8` to `allow`")
    model_hash = keys.model_hash(plan.model, base_dir)
    option_hash = keys.option_hash(options)
    from lwdsl.verify.text import calibration_hash

    text_hash = calibration_hash(plan, base_dir, calibration_tokens)
    count = sum(len(v) for v in options.values())
    if not force:
        stored = load_profile(model_hash, option_hash, text_hash)
        if stored is not None:
            from lwdsl.profile.store import profile_path

            return ProfileRun(stored, profile_path(model_hash, option_hash, text_hash),
                              time.perf_counter() - started, True, count)
    measured = _measure(plan, base_dir, options, model_hash, calibration_tokens, progress)
    path = save_profile(measured, option_hash)
    return ProfileRun(measured, path, time.perf_counter() - started, False, count)


def _measure(plan, base_dir: Path, options, model_hash: str, calibration_tokens: int | None,
             progress: bool) -> QualityProfile:
    import torch

    from lwdsl.models.load import load_model
    from lwdsl.profile.deltas import option_delta, prune_scores
    from lwdsl.profile.keys import SAMPLES
    from lwdsl.profile.sensitivity import estimate_losses
    from lwdsl.verify.text import plan_texts

    model, tokenizer = load_model(plan.model, base_dir)
    calibration = plan_texts(plan, base_dir, tokenizer, calibration_tokens=calibration_tokens).calibration
    scores = prune_scores(model, options, calibration.ids)
    batches = -(-calibration.ids.shape[0] // 2)
    with _progress(progress, batches * (len(options) + 1)) as advance:
        estimate = estimate_losses(model, options, lambda name, option: option_delta(model, name, option, scores),
                                   calibration.ids, samples=SAMPLES, batch_windows=2,
                                   on_layer=lambda _name: advance())
    losses = _calibrate_additivity(model, estimate.losses, calibration.ids, scores)
    losses = _refine(model, losses, calibration.ids, scores)
    # Perplexity from the KL, not from the signed first-order term of the real tokens' likelihood:
    # that term fits the calibration windows' noise and did not carry over to the evaluation windows
    # (the default plan: +10% predicted from it, +68% measured; the KL route predicts +43%).
    entries = [ProfileEntry(layer=name, format=fmt, prune=prune, kld=loss.kld,
                            perplexity_increase=math.expm1(loss.kld))
               for name, layer_losses in losses.items() for (fmt, prune), loss in layer_losses.items()]
    del model
    torch.set_grad_enabled(True)
    return QualityProfile(model_hash=model_hash, text_hash=calibration.text_hash,
                          baseline_perplexity=estimate.baseline_perplexity, entries=entries)


REFINE_KLD = 0.05  # nats: above this the second-order estimate leaves its accurate range
REFINE_MAX = 4  # exact full-model measurements at most (each is one forward over the calibration text)


def _refine(model, losses: dict, windows, scores: dict) -> dict:
    """Measure the few largest estimated losses exactly, and carry each correction to the same
    layer's options that share the measured prune level (their loss is dominated by it)."""
    from lwdsl.profile.deltas import dense_delta
    from lwdsl.profile.sensitivity import LayerLoss, exact_losses

    candidates = sorted(((loss.kld, name, option) for name, layer_losses in losses.items()
                         for option, loss in layer_losses.items()
                         if loss.kld > REFINE_KLD and (option[0].dtype == "fp32" or option[1].kind == "none")),
                        key=lambda c: (-c[0], c[1], str(c[2])))[:REFINE_MAX]
    if not candidates:
        return losses
    exact = exact_losses(model, [(name, dense_delta(model, name, option, scores)) for _, name, option in candidates],
                         windows)
    refined = {name: dict(layer_losses) for name, layer_losses in losses.items()}
    for (estimated_kld, name, (fmt, prune)), measured in zip(candidates, exact):
        ratio = measured.kld / estimated_kld
        for option, loss in losses[name].items():
            if option == (fmt, prune):
                refined[name][option] = measured
            elif prune.kind != "none" and option[1] == prune:
                refined[name][option] = LayerLoss(kld=loss.kld * ratio, nll_change=loss.nll_change * ratio)
    return refined


JOINT_FACTOR_RANGE = (0.5, 4.0)


def _calibrate_additivity(model, losses: dict, windows, scores: dict) -> dict:
    """Scale the estimates by one whole-model measurement of a mixed configuration.

    The solver adds per-layer losses; the estimate is per layer and position-local. Both
    approximations are checked at once: every layer takes its upper-quartile-loss option (a mix as
    aggressive as the solver's own picks under a quality bound), the whole model
    runs once with all of them (exact KL), and the ratio to the sum of their estimates scales every
    estimate. On SmolLM2 the sum of estimates came out 1.3x-1.8x below the measured KL without this.
    """
    from lwdsl.profile.deltas import dense_delta
    from lwdsl.profile.sensitivity import LayerLoss, exact_losses

    chosen = {}
    for name, layer_losses in losses.items():
        ranked = sorted(layer_losses.items(), key=lambda item: (item[1].kld, str(item[0])))
        chosen[name] = ranked[(3 * len(ranked)) // 4]
    estimated = sum(loss.kld for _option, loss in chosen.values())
    if estimated <= 0:
        return losses
    deltas = [(name, dense_delta(model, name, option, scores)) for name, (option, _loss) in chosen.items()]
    measured = exact_losses(model, deltas, windows, together=True)[0]
    factor = min(max(measured.kld / estimated, JOINT_FACTOR_RANGE[0]), JOINT_FACTOR_RANGE[1])
    return {name: {option: LayerLoss(kld=loss.kld * factor, nll_change=loss.nll_change * factor)
                   for option, loss in layer_losses.items()} for name, layer_losses in losses.items()}


class _progress:
    """A rich progress bar over (batches x layers) steps, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("profiling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), transient=False)
        self.bar.start()
        task = self.bar.add_task("profile", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
