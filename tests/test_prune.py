"""Pruning on the real SmolLM2 weights: matrices really shrink, masks are honest, and each pruned
module's output stays within a bound that follows from what was removed.

The bounds are exact, not tuned: a pruned module's output differs from the original by the sum of
the removed pieces' contributions, and by the triangle inequality the norm of that sum is at most
the sum of their norms, which is what the activation-aware scores are (‖h_j‖·‖d_j‖ for a channel,
‖a_h‖·‖O_h‖ for a head, |w_ij|·‖x_j‖ for a weight, all over the calibration rows).
"""
from __future__ import annotations

import copy

import pytest
import torch

from lwdsl.apply import capture_inputs
from lwdsl.apply.prune import (Sparse24Linear, channel_scores, head_scores, prune_module, prune_mlp_channels,
                               weight_scores)
from lwdsl.apply.registry import ApplyContext
from lwdsl.cost.formats import weight_bytes
from lwdsl.errors import LwdslError
from lwdsl.solution import PruneChoice, QuantFormat

pytestmark = pytest.mark.model
PROMPT = "The capital of France is Paris. Rivers flow to the sea, and the tide comes in twice a day."
SLACK = 1 + 1e-4  # float32 rounding of the two sides of the inequality


@pytest.fixture(scope="module")
def inputs(smollm2_model):
    model, tokenizer = smollm2_model
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    names = ["model.layers.2.mlp.gate_proj", "model.layers.2.self_attn.o_proj", "model.layers.2.mlp.up_proj"]
    return capture_inputs(model, names, ids)


def test_channels_shrink_and_stay_within_the_removed_contribution(smollm2_model, inputs):
    model, _ = smollm2_model
    mlp = copy.deepcopy(model.model.layers[2].mlp)
    x = inputs["model.layers.2.mlp.gate_proj"]
    with torch.no_grad():
        reference = mlp(x)
    scores = channel_scores(mlp, x)
    pruned = prune_module(mlp, PruneChoice(kind="channels", fraction=0.25),
                          ApplyContext(name="mlp", calibration=x))
    assert pruned.gate_proj.weight.shape == (1152, 576) and pruned.up_proj.weight.shape == (1152, 576)
    assert pruned.down_proj.weight.shape == (576, 1152)
    with torch.no_grad():
        error = (pruned(x) - reference).norm()
    removed = torch.sort(scores).values[:1536 - 1152].sum()
    assert error <= removed * SLACK
    assert error < 0.5 * reference.norm()  # and the bound is not vacuous here


def test_wanda_channels_beat_magnitude_on_the_calibration_rows(smollm2_model, inputs):
    model, _ = smollm2_model
    x = inputs["model.layers.2.mlp.gate_proj"]
    with torch.no_grad():
        reference = model.model.layers[2].mlp(x)
    errors = {}
    for label, calibration in (("magnitude", None), ("wanda", x)):
        mlp = prune_module(copy.deepcopy(model.model.layers[2].mlp), PruneChoice(kind="channels", fraction=0.5),
                           ApplyContext(name="mlp", calibration=calibration))
        with torch.no_grad():
            errors[label] = (mlp(x) - reference).norm()
    assert errors["wanda"] < errors["magnitude"]


@pytest.mark.parametrize("heads, kv", [(6, 2), (6, 3)])  # a whole kv group; one query head per group
def test_heads_keep_gqa_and_kept_heads_are_untouched(smollm2_model, inputs, heads, kv):
    model, _ = smollm2_model
    attn = copy.deepcopy(model.model.layers[2].self_attn)
    a = inputs["model.layers.2.self_attn.o_proj"]  # per-head attention outputs, [tokens, 9 * 64]
    scores = head_scores(attn, a)
    pruned = prune_module(attn, PruneChoice(kind="heads", fraction=1 / 3),
                          ApplyContext(name="attn", calibration=a, options={"keep_heads": heads, "keep_kv_heads": kv}))
    assert pruned.q_proj.weight.shape == (heads * 64, 576) and pruned.o_proj.weight.shape == (576, heads * 64)
    assert pruned.k_proj.weight.shape == (kv * 64, 576) and pruned.v_proj.weight.shape == (kv * 64, 576)
    assert pruned.num_key_value_groups == heads // kv
    kept_heads = [h for h in range(9) if any(torch.equal(pruned.q_proj.weight[i * 64:(i + 1) * 64],
                                                         model.model.layers[2].self_attn.q_proj.weight[h * 64:(h + 1) * 64])
                                             for i in range(heads))]
    assert len(kept_heads) == heads
    kept_columns = torch.cat([a[:, h * 64:(h + 1) * 64] for h in kept_heads], dim=1)
    with torch.no_grad():
        reference = model.model.layers[2].self_attn.o_proj(a)
        error = (pruned.o_proj(kept_columns) - reference).norm()
    removed = sum(scores[h] for h in range(9) if h not in kept_heads)
    assert error <= removed * SLACK


def test_heads_that_break_gqa_fail_loudly(smollm2_model):
    model, _ = smollm2_model
    attn = copy.deepcopy(model.model.layers[0].self_attn)
    with pytest.raises(LwdslError) as caught:
        prune_module(attn, PruneChoice(kind="heads", fraction=0.25),
                     ApplyContext(name="model.layers.0.self_attn", options={"keep_heads": 7, "keep_kv_heads": 3}))
    assert caught.value.diagnostics[0].code == "E612"


def test_unstructured_mask_is_exact_and_stored_dense(smollm2_model, inputs):
    model, _ = smollm2_model
    linear = copy.deepcopy(model.model.layers[2].mlp.up_proj)
    x = inputs["model.layers.2.mlp.up_proj"]
    scores = weight_scores(linear, x)
    with torch.no_grad():
        reference = linear(x)
    masked = prune_module(linear, PruneChoice(kind="unstructured", fraction=0.5), ApplyContext(name="up", calibration=x))
    assert ((masked.weight == 0).sum(1) >= 288).all()
    removed = torch.where(masked.weight == 0, scores, torch.zeros_like(scores)).sum(1)  # per output row
    with torch.no_grad():
        error = (masked(x) - reference).norm(dim=0)
    assert (error <= removed * SLACK + 1e-6).all()
    dense = masked.weight.numel() * 4
    assert dense == weight_bytes((1536, 576), QuantFormat(), PruneChoice(kind="unstructured", fraction=0.5), "mlp_up")


@pytest.mark.parametrize("fmt", [QuantFormat(), QuantFormat(dtype="int8")])
def test_two_four_keeps_two_of_four_and_counts_its_bytes(smollm2_model, fmt):
    from lwdsl.apply.quantize import quantize_module

    model, _ = smollm2_model
    original = model.model.layers[1].mlp.gate_proj
    sparse = prune_module(copy.deepcopy(original), PruneChoice(kind="2:4", fraction=0.5), ApplyContext(name="gate"))
    assert isinstance(sparse, Sparse24Linear)
    dense = sparse.dense_weight()
    assert ((dense.reshape(1536, -1, 4) != 0).sum(-1) <= 2).all()
    kept = dense != 0
    assert torch.equal(dense[kept], original.weight[kept])  # the kept values are the original ones
    blocks = original.weight.abs().reshape(1536, -1, 4)
    kept_min = torch.where(kept.reshape(1536, -1, 4), blocks, torch.inf).amin(-1)
    dropped_max = torch.where(kept.reshape(1536, -1, 4), -torch.inf, blocks).amax(-1)
    assert (kept_min >= dropped_max).all()  # the two largest of each four
    if fmt.dtype != "fp32":  # the plain dequantising kernel, so the only error is the rounding
        sparse.values = quantize_module(sparse.values, fmt, ApplyContext(name="gate.values",
                                                                         options={"kernel": "dequant_fp32"}))
    assert sparse.weight_bytes() == weight_bytes((1536, 576), fmt, PruneChoice(kind="2:4", fraction=0.5), "mlp_gate")
    x = torch.randn(4, 576)
    with torch.no_grad():
        error = (sparse(x) - x @ dense.t()).abs()
    # int8 per row: each kept weight is off by at most half a step (row absmax / 127), so an output
    # is off by at most half a step times the sum of |x| over the kept positions; fp32: rounding only
    step = dense.abs().amax(1) / 127 if fmt.dtype == "int8" else torch.zeros(1536)
    bound = (x.abs() @ kept.float().t()) * step / 2 * 1.01 + 1e-4
    assert (error <= bound).all()


def test_pruned_variants_helper_for_the_decode_benchmark(smollm2_model, inputs):
    model, _ = smollm2_model
    variant = torch.nn.Module()  # two real blocks in the model's layout are enough here
    variant.model = torch.nn.Module()
    variant.model.layers = copy.deepcopy(model.model.layers[2:4])
    x = inputs["model.layers.2.mlp.gate_proj"]
    kept = prune_mlp_channels(variant, 0.25, calibration={0: x})
    assert kept == {"model.layers.0.mlp": 1152, "model.layers.1.mlp": 1152}
    with torch.no_grad():  # the calibrated block keeps its best channels: same bound as above
        reference = model.model.layers[2].mlp(x)
        assert (variant.model.layers[0].mlp(x) - reference).norm() < 0.5 * reference.norm()
