"""How per-layer quality losses compose into the whole model's: the profile's measured scales,
perplexity ratios multiplied (cost model) and added as logarithms (solver), and, on the real SmolLM2,
a profile's prediction held against the measured model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from lwdsl import ast
from lwdsl.cost import evaluate
from lwdsl.cost.quality import MAX_SIZE_FACTOR, PRUNE_SIZE_EXPONENT, format_ppl, layer_quality, prune_ppl, size_factor
from lwdsl.hardware import resolve_target
from lwdsl.inventory import load_inventory
from lwdsl.profile.calibrate import apply_scales, group_of, kind_of, measure_scales
from lwdsl.profile.sensitivity import LayerLoss
from lwdsl.solution import LayerChoice, ProfileEntry, PruneChoice, QualityProfile, QuantFormat
from lwdsl.solve.build import from_units, to_units

INT8, INT4 = QuantFormat(dtype="int8"), QuantFormat(dtype="int4", group=64)
NONE, C25 = PruneChoice(), PruneChoice(kind="channels", fraction=0.25)
FP32 = QuantFormat()


def test_kinds_and_groups():
    assert kind_of((INT4, NONE)) == (INT4, NONE) and kind_of((FP32, C25)) == (FP32, C25)
    assert kind_of((INT4, C25)) is None  # a combination takes its parts' scales
    assert [group_of(f"model.layers.{b}.mlp.down_proj", 30) for b in (0, 9, 10, 19, 20, 29)] == [0, 0, 1, 1, 2, 2]
    assert group_of("lm_head", 30) == 2


def test_scales_reproduce_the_joint_runs_they_were_measured_from():
    """Two layers per depth third; the runner plays the whole model with made-up joint figures. A
    uniform plan's scaled sum must give back the joint run of all its layers (compounding included),
    and each prefix of groups its own run."""
    names = [f"model.layers.{b}.mlp.down_proj" for b in range(6)]
    options = {n: [(INT4, NONE), (FP32, C25), (INT4, C25)] for n in names}
    estimates = {n: {(INT4, NONE): LayerLoss(0.1, 0.1), (FP32, C25): LayerLoss(0.02, 0.02),
                     (INT4, C25): LayerLoss(0.13, 0.13)} for n in names}
    joint = {((INT4, NONE), 2): LayerLoss(0.15, 0.09), ((INT4, NONE), 4): LayerLoss(0.35, 0.25),
             ((INT4, NONE), 6): LayerLoss(0.7, 0.55), ((FP32, C25), 2): LayerLoss(0.05, 0.02),
             ((FP32, C25), 4): LayerLoss(0.08, 0.03), ((FP32, C25), 6): LayerLoss(0.12, 0.07)}
    jobs_seen = []

    def run(jobs):
        jobs_seen.extend(jobs)
        return [joint[(kind, len(members))] for kind, members in jobs]

    scales = measure_scales(options, estimates, run, blocks=6)
    assert len(jobs_seen) == 6  # each kind: first third, first two thirds, all
    losses = apply_scales(options, estimates, scales, blocks=6)
    for (kind, count), measured in joint.items():
        assert sum(losses[n][kind].kld for n in names[:count]) == pytest.approx(measured.kld)
    # NLL per nat of KL, pooled per family and group: formats in the first third 0.09 / 0.15
    assert scales[((INT4, NONE), 0)].beta == pytest.approx(0.6)
    # the last third: the differences of the last two runs (0.30 / 0.35; prunes 0.04 / 0.04)
    assert scales[((INT4, NONE), 2)].beta == pytest.approx(0.30 / 0.35)
    assert scales[((FP32, C25), 2)].beta == pytest.approx(1.0)
    # the combination: its parts (0.1 format, 0.02 prune) weigh their kinds' scales
    combined = losses[names[0]][(INT4, C25)].kld
    expected = 0.13 * (0.1 / 0.12 * scales[((INT4, NONE), 0)].kappa + 0.02 / 0.12 * scales[((FP32, C25), 0)].kappa)
    assert combined == pytest.approx(expected)


def test_smaller_kinds_take_the_leaders_depth_profile_rescaled_to_their_own_run():
    names = [f"model.layers.{b}.mlp.down_proj" for b in (0, 1)]  # of 2 blocks: groups 0 and 1
    options = {n: [(INT8, NONE), (INT4, NONE)] for n in names}
    estimates = {n: {(INT8, NONE): LayerLoss(0.001, 0.001), (INT4, NONE): LayerLoss(0.1, 0.1)} for n in names}
    joint = {((INT4, NONE), 1): LayerLoss(0.12, 0.06), ((INT4, NONE), 2): LayerLoss(0.3, 0.2),
             ((INT8, NONE), 2): LayerLoss(0.006, 0.001)}
    seen = []
    scales = measure_scales(options, estimates, lambda jobs: seen.extend(jobs) or
                            [joint[(k, len(m))] for k, m in jobs], blocks=2)
    assert sorted((str(k[0].dtype), len(m)) for k, m in seen) == [("int4", 1), ("int4", 2), ("int8", 2)]
    assert [scales[((INT4, NONE), g)].kappa for g in (0, 1)] == pytest.approx([1.2, 1.8])
    assert [scales[((INT8, NONE), g)].kappa for g in (0, 1)] == pytest.approx([2.4, 3.6])  # 0.006 in all
    assert scales[((INT8, NONE), 1)].beta == scales[((INT4, NONE), 1)].beta == pytest.approx(0.14 / 0.18)


def test_solver_units_add_log_ratios_and_come_back():
    for value in (0.0, 0.05, 0.5, 3.0):
        assert from_units("quality:perplexity", to_units("quality:perplexity", value)) == pytest.approx(value)
    # two layers of +10% each: +21%, as the cost model composes them
    assert from_units("quality:perplexity", 2 * to_units("quality:perplexity", 0.1)) == pytest.approx(0.21)
    assert to_units("memory", 2048.0) == 2.0  # other metrics: plain scales


def test_prior_shares_compose_back_to_the_whole_model_figure():
    shares = [layer_quality(n, 100, 4096, QuantFormat(dtype="int4"), C25)[0] for n in (50, 30, 20)]
    whole = (size_factor(100) * format_ppl(QuantFormat(dtype="int4"), 4096)
             + size_factor(100, PRUNE_SIZE_EXPONENT) * prune_ppl(C25))
    assert math.prod(1 + s for s in shares) - 1 == pytest.approx(whole)


def test_priors_grow_for_small_models():
    assert size_factor(6_500_000_000) == 1.0 and size_factor(70_000_000_000) == 1.0  # 7B figures, no less
    # the fit to three real models' profiles (bench/fit_priors.py): Qwen2.5-Coder-0.5B's 494M linear
    # weights lose ~5.8x the 7B figure to rounding, a 100M-weight model ~17x, prunes far less
    assert 5 < size_factor(494_000_000) < size_factor(100_000_000) < 18 < size_factor(1) == MAX_SIZE_FACTOR
    assert 1 < size_factor(100_000_000, PRUNE_SIZE_EXPONENT) < 2
    int8 = QuantFormat(dtype="int8")  # weight-only int8: +0.1% to +0.3% measured on the three (per channel)
    assert 0.001 < size_factor(494_000_000) * format_ppl(int8, 896) < 0.003


def test_prior_numel_counts_a_tied_head_once():
    from lwdsl.cost.quality import prior_numel

    tied = load_inventory(ast.ModelBlock(source="arch:gemma-3-270m", scheme="arch", location="gemma-3-270m"), Path("."))
    blocks = sum(w.numel for w in tied.linear_layers() if w.block is not None)
    assert prior_numel(tied.weights) == blocks  # the tied head is the embedding's matrix, a lookup
    assert tied.weight("lm_head").tied_to is not None


def test_evaluate_multiplies_the_profile_ratios():
    model = ast.ModelBlock(source="arch:smollm2-135m", scheme="arch", location="smollm2-135m")
    inventory = load_inventory(model, Path("."))
    device = ast.Device(name="cpu0", kind="cpu", memory=ast.Quantity(value=8 * 2**30, kind="size", text="8 GiB"),
                        bandwidth=ast.Quantity(value=20e9, kind="bandwidth", text="20 GB/s"),
                        compute=ast.Quantity(value=1e11, kind="compute", text="100 GFLOPS"))
    target = resolve_target(ast.Target(devices=(device,)))
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    profile = QualityProfile(model_hash="m", text_hash="t", baseline_perplexity=18.0, entries=[
        ProfileEntry(layer=n, format=INT4, kld=0.2, perplexity_increase=0.2) for n in names])
    choices = [LayerChoice(name=n, block=i, format=INT4, device="cpu0", compute_device="cpu0")
               for i, n in enumerate(names)]
    quality = evaluate(inventory, target, ast.InferenceWorkload(batch=1, context=256, generate=8), choices,
                       quality_profile=profile).quality
    assert quality.perplexity_increase == pytest.approx(0.44) and quality.kld == pytest.approx(0.4)


@pytest.mark.model
def test_calibrated_estimates_predict_a_plan_they_never_ran_on_smollm2(smollm2_model):
    """int4 g64 on the MLPs of every other block, a mix the calibration never ran: estimated on one
    calibration window, scaled by the joint runs (first third, first two, all MLPs) on that window,
    then held against the whole model measured on two evaluation windows. The KL sum must land within
    25%, the perplexity (NLL per nat measured, ratios multiplied) within 25% and nearer than
    `expm1(KL)`, which over-predicts: the real tokens' NLL rises by less than the KL."""
    import torch

    from lwdsl.profile.deltas import dense_delta, option_delta
    from lwdsl.profile.sensitivity import estimate_losses, joint_losses
    from lwdsl.verify.text import read_text, tokenize_windows

    model, tokenizer = smollm2_model
    windows = tokenize_windows(read_text("text:python-docs", Path(".")), tokenizer, 6)
    calibration, evaluation = windows[1:2], windows[2::2]
    blocks = model.config.num_hidden_layers
    names = [f"model.layers.{b}.mlp.{p}" for b in range(blocks)
             for p in ("gate_proj", "up_proj", "down_proj")]
    options = {n: [(INT4, NONE)] for n in names}
    estimate = estimate_losses(model, options, lambda n, o: option_delta(model, n, o), calibration,
                               first_order=False)

    def run(jobs):
        return joint_losses(model, [[(n, dense_delta(model, n, kind)) for n in members]
                                    for kind, members in jobs], calibration)

    losses = apply_scales(options, estimate.losses, measure_scales(options, estimate.losses, run, blocks), blocks)
    chosen = [n for n in names if int(n.split(".")[2]) % 2 == 0]
    predicted_kld = sum(losses[n][(INT4, NONE)].kld for n in chosen)
    predicted_ppl = math.expm1(sum(losses[n][(INT4, NONE)].nll_change for n in chosen))
    measured = joint_losses(model, [[(n, dense_delta(model, n, (INT4, NONE))) for n in chosen]], evaluation)[0]
    measured_ppl = math.expm1(measured.nll_change)
    assert abs(predicted_kld / measured.kld - 1) < 0.25, (predicted_kld, measured.kld)
    assert abs(predicted_ppl / measured_ppl - 1) < 0.25, (predicted_ppl, measured_ppl)
    assert abs(predicted_ppl - measured_ppl) < abs(math.expm1(predicted_kld) - measured_ppl)
    assert torch.is_grad_enabled()  # left as found
