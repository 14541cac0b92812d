"""lwdsl.runtime.fused: the whole decode step in one native call, against the torch step it replaces.

Both paths run the same weights, and each is compared with an exact reference of its own numerics
(`reference.py`: the dequantized weights in float64 on activations rounded as the path rounds them),
never one approximation's argmax with another's. fp32: the same float products in another summation
order, within float rounding of the float64 forward. int8 / int4: both round the activations to int8
per block of 32 before the integer products (native.c and native_step.c alike); a value within float
rounding of a rounding boundary can land on the other code in one path, and flips cascade through the
blocks: each path is within a bounded multiple of the format's own activation-rounding effect of the
emulation (`reference.FLIP_FRACTION`); the per-kernel float32 bounds are in test_kernels.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lwdsl.apply import native
from lwdsl.apply.quantize import quantize_linears
from lwdsl.runtime.fused import Fused, describe
from lwdsl.runtime.generate import LeanGemma, LeanLlama, decode
from lwdsl.solution import QuantFormat
from reference import (assert_greedy_within_ties, assert_near_own_numerics, emulation, float32_activations,
                       last_logits)

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(not native.available(), reason="no C compiler or no AVX2/FMA/F16C")]

PROMPT = "The capital of France is a city where"
VARIANTS = {
    "fp32": [],
    "int8": [(QuantFormat(dtype="int8"), ())],
    "int4 g32 asym + int8 head": [(QuantFormat(dtype="int4", group=32, symmetric=False), ("lm_head",)),
                                  (QuantFormat(dtype="int8"), ())],
    "int4 g64 sym": [(QuantFormat(dtype="int4", group=64), ())],
    "int8 g32 (Q8_0's layout)": [(QuantFormat(dtype="int8", group=32), ())],
}


@pytest.fixture(scope="module")
def prompt_ids(smollm2_model):
    return smollm2_model[1](PROMPT, return_tensors="pt").input_ids


def _variant(model, name):
    model = copy.deepcopy(model)
    for fmt, skip in VARIANTS[name]:
        quantize_linears(model, fmt, skip=skip)
    return model


@pytest.fixture(scope="module")
def emulations(smollm2_model, prompt_ids):
    """Per variant: float64 logits after the prompt and one token, with the activations rounded as
    the native kernels round them, and with them unrounded (the format's activation effect)."""
    ids = torch.cat([prompt_ids, torch.tensor([[1327]])], dim=1)
    assert prompt_ids.shape[1] < native.DEQUANT_ROWS  # the prompt runs the integer kernels too
    found = {}
    for name in VARIANTS:
        model = _variant(smollm2_model[0], name)
        found[name] = (last_logits(emulation(model), ids),
                       last_logits(emulation(model, decode=float32_activations), ids))
    return found


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_step_matches_the_torch_step(smollm2_model, prompt_ids, emulations, name, threads):
    model = _variant(smollm2_model[0], name)
    runner = LeanLlama(model, 64)
    runner.fused = describe(model, runner.cache, runner.tables, runner.kinds, 64, runner.head_dim, threads=threads)
    assert isinstance(runner.fused, Fused), runner.fused
    with torch.inference_mode():
        runner.forward(prompt_ids, 0)
        token, position = torch.tensor([[1327]]), prompt_ids.shape[1]
        fused = runner.forward(token, position)
        keys = runner.cache.keys[7][:, :, position].clone()
        runner.fused, described = "off", runner.fused
        reference = runner.forward(token, position)
    written = runner.cache.keys[7][:, :, position]  # the step's own keys, into the cache
    assert (keys - written).norm() < (1e-4 if name == "fp32" else 0.02) * written.norm()
    own, unrounded = emulations[name]
    for logits in (fused[0], reference[0]):
        if name == "fp32":  # float32 sums of the same products: float rounding of the float64 forward
            assert (logits.double() - own).abs().max() < 1e-3 * own.abs().max()
        else:
            assert_near_own_numerics(logits, own, unrounded)
    assert described.vocab == reference.shape[-1]


def test_fused_greedy_decode_gives_the_torch_tokens(smollm2_model, prompt_ids, monkeypatch):
    model = smollm2_model[0]
    fused = decode(model, prompt_ids, 12, stop_at_eos=False).token_ids
    monkeypatch.setenv("LWDSL_FUSED", "0")
    assert LeanLlama(model, 8).fused == "disabled by LWDSL_FUSED=0"
    eager = decode(model, prompt_ids, 12, stop_at_eos=False).token_ids
    # both float32 paths choose the float64 forward's tokens, but for near ties within float rounding
    reference = emulation(model)
    for tokens in (fused, eager):
        assert_greedy_within_ties(tokens, prompt_ids, reference, margin=1e-3 * 30)  # logits here are < 30


def test_models_outside_the_fused_step_say_why_and_still_decode(smollm2_model, prompt_ids):
    base = smollm2_model[0]
    nf4 = copy.deepcopy(base)
    quantize_linears(nf4, QuantFormat(dtype="nf4", group=64), skip=("lm_head",))
    assert "nf4" in LeanLlama(nf4, 8).fused
    int8_kv = LeanLlama(base, 8, QuantFormat(dtype="int8"))
    assert "KV cache" in int8_kv.fused
    hooked = copy.deepcopy(base)
    hooked.model.layers[4].mlp.up_proj.register_forward_pre_hook(lambda module, args: None)
    assert "layers.4.up has hooks" in LeanLlama(hooked, 8).fused
    block_hooked = copy.deepcopy(base)  # as `place_pipeline` moves a block's inputs
    block_hooked.model.layers[7].register_forward_pre_hook(lambda module, args: None)
    assert "layers.7 has hooks" in LeanLlama(block_hooked, 8).fused
    assert len(decode(nf4, prompt_ids, 3, stop_at_eos=False).token_ids) == 3


def test_the_fused_step_points_at_the_modules_own_weights(smollm2_model):
    """Nothing copied: the description holds the modules' tensors, so resident memory is unchanged."""
    model = _variant(smollm2_model[0], "int8")
    runner = LeanLlama(model, 16)
    up = model.model.layers[0].mlp.up_proj
    assert runner.fused.model.block[0].up.weight == up._packed.codes.data_ptr()
    assert runner.fused.model.head.weight == model.lm_head._packed.codes.data_ptr()


def test_the_cost_model_prices_what_the_executor_runs():
    """The pure cost model cannot import the executor (no torch): its copies of the executor's
    thresholds must be the executor's."""
    from lwdsl.cost import terms
    from lwdsl.runtime.generate import LEAN_MODEL_TYPES

    assert terms.DEQUANT_ROWS == native.DEQUANT_ROWS
    assert terms.FUSED_MODEL_TYPES == LEAN_MODEL_TYPES


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("fmt", [None, QuantFormat(dtype="int8"), QuantFormat(dtype="int4", group=32)])
def test_small_models_of_each_layout_step_as_torch_does(family, fmt):
    """Random small models (head_dim 16, GQA 4:2, Qwen2's q/k/v biases, an untied head): greedy
    tokens of the fused loop equal the torch loop's, over positions where rounding cannot flip them."""
    import transformers

    torch.manual_seed(0)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[family]
    config = config_class(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=200, max_position_embeddings=128,
                          tie_word_embeddings=False)
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "mistral": transformers.MistralForCausalLM}[family]
    model = model_class(config).eval().requires_grad_(False)
    if fmt is not None:
        quantize_linears(model, fmt)
    _steps_match_torch(model, [3, 17, 42, 99, 7, 150], 6, 200, 1e-4 if fmt is None else 0.05)


def _tiny_gemma3(window: int = 8):
    """A random Gemma 3 (two sliding-window layers around a global one, non-trivial norm weights)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=window, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = transformers.Gemma3ForCausalLM(config).eval().requires_grad_(False)
    for name, parameter in model.named_parameters():
        if "norm" in name:  # Gemma's norms scale by (1 + w): w = 0 would hide a missing 1
            parameter.normal_(0, 0.3)
    return model


def test_gemma3_lean_and_fused_steps_are_the_hugging_face_forward():
    """Gemma 3 past its sliding window (8): the lean loop's prefill, a prefill placed after earlier
    positions, and each fused step (the window a ring in the cache) against the Hugging Face forward
    over the whole sequence, in float32 (float rounding apart, the same numbers)."""
    model = _tiny_gemma3()
    ids = torch.randint(0, 300, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        theirs = model(ids).logits[0]
        runner = LeanGemma(model, 32)
        assert isinstance(runner.fused, Fused), runner.fused
        assert [k.shape[2] for k in runner.cache.keys] == [8, 32, 8]  # a sliding layer keeps its window
        scale = theirs.abs().max()
        assert (runner.forward(ids, 0, every_position=True)[0] - theirs).abs().max() < 1e-5 * scale
        runner = LeanGemma(model, 32)
        runner.forward(ids[:, :5], 0)
        for position in range(5, 21):
            fused = runner.forward(ids[:, position:position + 1], position)[0]
            assert (fused - theirs[position]).abs().max() < 1e-5 * scale, position
        later = LeanGemma(model, 32)
        later.forward(ids[:, :6], 0)
        chunk = later.forward(ids[:, 6:], 6, every_position=True)[0]
        assert (chunk - theirs[6:]).abs().max() < 1e-5 * scale


@pytest.mark.parametrize("fmt", [QuantFormat(dtype="int8"), QuantFormat(dtype="int4", group=32)])
def test_gemma3_fused_integer_steps_are_the_torch_steps(fmt):
    model = _tiny_gemma3(window=4)
    quantize_linears(model, fmt)
    _steps_match_torch(model, [3, 17, 42, 99, 7, 150], 6, 300, 0.05, LeanGemma)


def _steps_match_torch(model, prompt: list[int], steps: int, vocab: int, tolerance: float,
                       runner_class=LeanLlama) -> None:
    """After `prompt`, each of `steps` decode steps' logits from the fused step equal the torch
    step's at the same position (same cache) within `tolerance` of the largest logit."""
    runner = runner_class(model, len(prompt) + steps + 8)
    assert isinstance(runner.fused, Fused), runner.fused
    with torch.inference_mode():
        runner.forward(torch.tensor([prompt]), 0)
        for position in range(len(prompt), len(prompt) + steps):
            token = torch.tensor([[position * 11 % vocab]])
            fused = runner.forward(token, position)
            runner.fused, described = "off", runner.fused
            reference = runner.forward(token, position)
            runner.fused = described
            assert (fused - reference).abs().max() <= tolerance * reference.abs().max() + 1e-5


@pytest.mark.parametrize("fmt", [QuantFormat(dtype="int4", group=32, symmetric=False),
                                 QuantFormat(dtype="int4", group=64, symmetric=False),
                                 QuantFormat(dtype="int4", group=128)])
def test_int4_rows_of_every_group_and_an_odd_block_count(fmt):
    """int4 rows are read two blocks at a time: widths of 8 (hidden 256) and 19 blocks (608, the last
    block without a partner), groups of 1, 2 and 4 blocks, each row against the torch step."""
    import transformers

    torch.manual_seed(1)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=608, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval().requires_grad_(False)
    quantize_linears(model, fmt)
    _steps_match_torch(model, [5, 17, 42], 5, 300, 0.05)
