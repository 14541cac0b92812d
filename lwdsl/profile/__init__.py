"""`lwdsl profile`: the measured quality cost of every allowed option on every layer, alone.

    >>> run = profile(load_plan("plans/smollm2_edge.lwp"))     # doctest: +SKIP
    >>> run.profile.entries[0]                                  # doctest: +SKIP
    ProfileEntry(layer='model.layers.0.self_attn.q_proj', format=..., kld=4.5e-07, ...)

The solver reads the stored result through `find_profile(plan_file)` (lwdsl.profile.store).
How the losses are estimated: `lwdsl.profile.sensitivity`; what a delta is: `lwdsl.profile.deltas`;
how the estimates are scaled to what the whole model measures: `lwdsl.profile.calibrate`.
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


BATCH_WINDOWS = 4  # calibration windows per estimate pass: 1024 tokens (the default calibration) at once
# The pass holds several vocabulary-wide tensors a token (logits, log-probabilities, their gradients,
# the head's recorded output gradients): past this many vocabulary values a pass takes fewer windows
# (Qwen2.5's 152k vocabulary: one window, where four needed over 7 GB).
LOGIT_VALUES_PER_PASS = 52_000_000


def batch_windows(vocab: int, window_tokens: int = 256) -> int:
    """Calibration windows per estimate pass for a vocabulary this large (1 to BATCH_WINDOWS)."""
    return max(1, min(BATCH_WINDOWS, LOGIT_VALUES_PER_PASS // max(1, vocab * window_tokens)))


def _measure(plan, base_dir: Path, options, model_hash: str, calibration_tokens: int | None,
             progress: bool) -> QualityProfile:
    import torch

    from lwdsl.models.load import load_model
    from lwdsl.profile.calibrate import apply_scales, measure_scales
    from lwdsl.profile.deltas import option_delta, prune_scores
    from lwdsl.profile.keys import SAMPLES
    from lwdsl.profile.sensitivity import estimate_losses
    from lwdsl.verify.text import plan_texts

    model, tokenizer = load_model(plan.model, base_dir)
    calibration = plan_texts(plan, base_dir, tokenizer, calibration_tokens=calibration_tokens).calibration
    windows = calibration.ids
    half = windows.shape[0] // 2
    folds = (slice(0, half), slice(half, None)) if half else ()
    # what `lwdsl apply` selects with (every window), and what each half alone selects (cross-fitting)
    scores, *fold_scores = (prune_scores(model, options, windows, folds) if folds
                            else [prune_scores(model, options, windows)])
    per_pass = batch_windows(model.config.vocab_size, windows.shape[1])
    batches = -(-windows.shape[0] // per_pass)
    with _progress(progress, batches * (len(options) + 1)) as advance:
        # Few batches: each option's delta is made once per batch. The real tokens' gradient is not
        # taken: perplexity comes from the measured scales below.
        estimate = estimate_losses(model, options, lambda name, option: option_delta(model, name, option, scores),
                                   windows, samples=SAMPLES, batch_windows=per_pass,
                                   on_layer=lambda _name: advance(), first_order=False)
    blocks = model.config.num_hidden_layers
    # The scales are measured on each calibration text alone (the same runs, each on its own windows):
    # one model loses more on prose than on code (Qwen2.5-Coder int4 g32: +9% on the docs, +16% on
    # prose), so a plan checked on one of them is predicted with its own figures; the mix is their
    # window-weighted mean.
    by_text = {}
    for source, rows in _windows_by_source(calibration.sources or (calibration.source,) * windows.shape[0]):
        own_folds = _folds_within(rows, folds)
        runner = _joint_runner(model, windows[rows], scores, own_folds, fold_scores if own_folds else [],
                               estimate.reference[rows])
        scales = measure_scales(options, estimate.losses, runner, blocks)
        by_text[source] = (len(rows), _finite(apply_scales(options, estimate.losses, scales, blocks), runner))
    total = sum(count for count, _losses in by_text.values())
    # Perplexity from the measured NLL change per nat of KL: the real tokens' likelihood moves by
    # less than the KL (int4 on SmolLM2: 0.54-0.85 nats per nat), and by how much is measured above.
    entries = []
    for name, layer_options in options.items():
        for option in layer_options:
            own = {source: losses[name][option] for source, (_count, losses) in by_text.items()}
            kld = sum(by_text[s][0] * loss.kld for s, loss in own.items()) / total
            nll = sum(by_text[s][0] * loss.nll_change for s, loss in own.items()) / total
            entries.append(ProfileEntry(
                layer=name, format=option[0], prune=option[1], kld=kld, perplexity_increase=math.expm1(nll),
                by_text={s: (loss.kld, math.expm1(loss.nll_change)) for s, loss in own.items()} if len(own) > 1 else {}))
    del model
    torch.set_grad_enabled(True)
    return QualityProfile(model_hash=model_hash, text_hash=calibration.text_hash,
                          baseline_perplexity=estimate.baseline_perplexity, entries=entries)


def _windows_by_source(sources) -> list[tuple[str, "torch.Tensor"]]:
    """`[(source, window indices)]` in first-appearance order."""
    import torch

    order: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        order.setdefault(source, []).append(i)
    return [(source, torch.tensor(rows, dtype=torch.long)) for source, rows in order.items()]


def _folds_within(rows, folds) -> tuple:
    """The cross-fitting halves (`folds`, over every window) as positions among `rows`; () when a half
    has none of them (a prune is then measured on the windows it was chosen on)."""
    import torch

    inside = []
    for fold in folds:
        stop = fold.stop if fold.stop is not None else 1 << 30
        inside.append(torch.nonzero((rows >= (fold.start or 0)) & (rows < stop)).squeeze(-1))
    return tuple(inside) if inside and all(part.numel() for part in inside) else ()


def _finite(losses: dict, runner) -> dict:
    """Every loss a number: an estimate that came out NaN or infinite (seen on Qwen2.5's down_proj in
    blocks 2-3, where outlier activations run to the thousands) is measured exactly instead, that layer
    alone with that option; should that fail too, it takes the largest finite loss of its option on any
    layer (a pessimistic stand-in, never an optimistic one)."""
    from lwdsl.profile.sensitivity import LayerLoss

    def ok(loss) -> bool:
        return math.isfinite(loss.kld) and math.isfinite(loss.nll_change)

    for name, layer_losses in losses.items():
        for option, loss in list(layer_losses.items()):
            if ok(loss):
                continue
            exact = runner([(option, [name])])[0]
            if exact is not None and ok(exact):
                layer_losses[option] = exact
                continue
            others = [other[option] for other in losses.values() if option in other and ok(other[option])]
            layer_losses[option] = LayerLoss(kld=max((o.kld for o in others), default=0.0),
                                             nll_change=max((o.nll_change for o in others), default=0.0))
    return losses


def _joint_runner(model, windows, scores, folds, fold_scores, reference):
    """`run(jobs)` for `measure_scales`: each (kind, layers) job applied jointly and measured exactly.

    Formats are measured on every calibration window. A prune's channels and heads are chosen on the
    calibration text, and a selection scores best on the text it was chosen on (a 25% channel prune
    of SmolLM2 lost 1.3-1.8x more KL on held-out text than on its own), so prunes are cross-fitted:
    chosen on one half of the windows and measured on the other, both ways, and averaged.
    `reference` is the original's log-probabilities on `windows`, kept from the estimate's pass."""
    from lwdsl.profile.deltas import dense_delta
    from lwdsl.profile.sensitivity import LayerLoss, joint_losses

    def groups(jobs, chosen):
        return [[(name, lambda name=name, kind=kind: dense_delta(model, name, kind, chosen)) for name in names]
                for kind, names in jobs]

    def run(jobs):
        results: list = [None] * len(jobs)
        formats = [i for i, (kind, _names) in enumerate(jobs) if kind[1].kind == "none"]
        prunes = [i for i in range(len(jobs)) if i not in formats]
        if formats or not folds:
            every = formats if folds else list(range(len(jobs)))
            for i, loss in zip(every, joint_losses(model, groups([jobs[i] for i in every], scores), windows,
                                                   reference=reference)):
                results[i] = loss
        if prunes and folds:
            sums = [[0.0, 0.0] for _ in prunes]
            for chosen, measured_on in zip(fold_scores, reversed(folds)):  # chosen on one half, measured on the other
                measured = joint_losses(model, groups([jobs[i] for i in prunes], chosen), windows[measured_on],
                                        reference=reference[measured_on])
                for total, loss in zip(sums, measured):
                    share = windows[measured_on].shape[0] / windows.shape[0]
                    total[0] += loss.kld * share
                    total[1] += loss.nll_change * share
            for i, (kld, nll) in zip(prunes, sums):
                results[i] = LayerLoss(kld=kld, nll_change=nll)
        return results

    return run


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
