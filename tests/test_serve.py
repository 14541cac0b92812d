"""lwdsl.runtime.serve, the GPU serving executor, run on the CPU against the eager model (real SmolLM2):
SDPA attention over the static cache, chunked against whole prefill, decode steps, every weight
format's kernel (the same torch kernels as on CUDA where torch has them on both: int8pack, tinygemm
int4 with its bf16 scales and zeros), the int8 KV cache, and the loop's choice of executor."""
from __future__ import annotations

import copy

import pytest
import torch

from lwdsl.apply.quantize import quantize_linears
from lwdsl.runtime.generate import decode
from lwdsl.runtime.serve import Serve, cache_tokens, prefill_chunk_tokens, runner, serves
from lwdsl.runtime.serve.linears import KERNELS, Fp8Linear, kernel_for, serve_linear
from lwdsl.solution import QuantFormat

pytestmark = pytest.mark.model
PROMPT = "The capital of France is a city that has been the home of kings"
BLOCKS = 4  # quantized variants: four blocks are every case of the table


@pytest.fixture(scope="module")
def ids(smollm2_model):
    return smollm2_model[1](PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def eager(smollm2_model, ids):
    """The eager (Hugging Face) logits of every prompt position."""
    with torch.no_grad():
        return smollm2_model[0](ids).logits[0]


def _small(model, fmt: QuantFormat | None = None):
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:BLOCKS]
    small.config.num_hidden_layers = BLOCKS
    if fmt is not None:
        quantize_linears(small, fmt, skip=("lm_head",), kernel="dequant_fp32")
    return small


def _dequantized(model):
    """The model with every stored weight rebuilt as an exact float32 `nn.Linear` (the eager
    reference: the CPU's own quantized kernels may round activations)."""
    exact = copy.deepcopy(model)
    for layer in exact.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, module in list(owner.named_children()):
                if hasattr(module, "dequantized_weight"):
                    linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                    linear.weight.data = module.dequantized_weight().float()
                    if module.bias is not None:
                        linear.bias.data = module.bias.detach().float()
                    setattr(owner, name, linear)
    return exact


def _serve_logits(model, ids, **options) -> torch.Tensor:
    """Prefill all but the last token, then one decode step; logits of both."""
    with torch.inference_mode():
        executor = Serve(model, 1, ids.shape[1] + 4, **options)
        before = executor.forward(ids[:, :-1], 0)
        after = executor.forward(ids[:, -1:], ids.shape[1] - 1)
    return torch.stack([before[0], after[0]])


def test_prefill_and_decode_give_the_eager_logits(smollm2_model, ids, eager):
    served = _serve_logits(copy.deepcopy(smollm2_model[0]), ids)
    assert torch.allclose(served, eager[-2:], atol=2e-4, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_prefill_equals_whole_prefill(smollm2_model, ids, eager, chunk):
    model = copy.deepcopy(smollm2_model[0])
    with torch.inference_mode():
        executor = Serve(model, 1, ids.shape[1], prefill_chunk=chunk)
        last = executor.forward(ids, 0)
        whole = Serve(model, 1, ids.shape[1], prefill_chunk=ids.shape[1]).forward(ids, 0)
    assert executor.chunk == chunk
    assert torch.allclose(last[0], whole[0], atol=5e-5, rtol=0)
    assert torch.allclose(last[0], eager[-1], atol=2e-4, rtol=0)


def test_bf16_activations_stay_close(smollm2_model, ids, eager):
    served = _serve_logits(copy.deepcopy(smollm2_model[0]), ids, activation=torch.bfloat16)
    # bf16 keeps 8 significant bits: logits of ~20 move by a few tenths, the ranking at the top stays
    assert (served - eager[-2:]).abs().max() < 1.0
    assert torch.equal(served.argmax(-1), eager[-2:].argmax(-1))


@pytest.mark.parametrize("fmt, kernel, tolerance", [
    (QuantFormat(dtype="int8"), "int8pack", 2e-3),
    (QuantFormat(dtype="int4", group=32, symmetric=False), "int4_tinygemm", 0.5),
    (QuantFormat(dtype="int4", group=64), "int4_tinygemm", 0.5),
    (QuantFormat(dtype="bf16"), "float", 0.5),  # computes in bf16, activations included
    (QuantFormat(dtype="nf4", group=64), "dequant", 2e-3),
    (QuantFormat(dtype="fp8"), "dequant", 2e-3),
])
def test_each_format_on_its_kernel_gives_the_eager_logits(smollm2_model, ids, fmt, kernel, tolerance):
    """Each stored format against the same quantized model run eagerly (its weights dequantized exactly).
    tinygemm computes in bf16 (activations, scale and zero: `DEVIATIONS`); its layout is checked
    exactly layer by layer below."""
    model = _small(smollm2_model[0], fmt)
    with torch.no_grad():
        reference = _dequantized(model)(ids).logits[0, -2:]
    served_model = copy.deepcopy(model)
    served = _serve_logits(served_model, ids)
    assert served_model.model.layers[0].mlp.down_proj.kernel == kernel
    assert torch.allclose(served, reference, atol=tolerance, rtol=0), (served - reference).abs().max()


def test_int4_scales_and_zeros_are_the_stored_formula_in_bf16():
    from lwdsl.apply.kernels import dequantize, quantize_linear_codes, unpack_bits
    from lwdsl.runtime.serve.linears import tinygemm_scales_and_zeros

    weight = torch.randn(16, 128)
    for symmetric in (True, False):
        packed = quantize_linear_codes(weight, 4, 32, symmetric)
        pairs = tinygemm_scales_and_zeros(packed.scale, packed.offset).float()  # [groups, out, 2]
        codes = unpack_bits(packed.codes, 4).float().reshape(16, 4, 32)
        rebuilt = (codes - 8) * pairs[..., 0].t()[..., None] + pairs[..., 1].t()[..., None]
        exact = dequantize(packed).reshape(16, 4, 32)
        step = packed.scale.float().reshape(16, 4, 1)
        assert ((rebuilt - exact).abs() <= step * 16 * 2 ** -8 + 1e-6).all()


@pytest.mark.parametrize("group, symmetric", [(32, False), (64, True), (128, False), (256, True)])
def test_int4_layout_is_exact_layer_by_layer(group, symmetric):
    """tinygemm's packed weight computes exactly the stored codes with the bf16 scales and zeros: on
    bf16 inputs, the product equals the rebuilt weight's within float32 accumulation."""
    from lwdsl.apply.kernels import unpack_bits
    from lwdsl.apply.quantize import QuantizedLinear
    from lwdsl.runtime.serve.linears import tinygemm_scales_and_zeros

    linear = torch.nn.Linear(512, 96, bias=False)
    module = QuantizedLinear.from_linear(linear, QuantFormat(dtype="int4", group=group, symmetric=symmetric))
    layer = serve_linear(module, torch.device("cpu"), torch.float32)
    assert layer.kernel == "int4_tinygemm"
    packed = module.packed()
    pairs = tinygemm_scales_and_zeros(packed.scale, packed.offset).float()
    codes = unpack_bits(packed.codes, 4).float().reshape(96, -1, group)
    rebuilt = ((codes - 8) * pairs[..., 0].t()[..., None] + pairs[..., 1].t()[..., None]).reshape(96, 512)
    x = torch.randn(5, 512).bfloat16().float()
    expected = x @ rebuilt.t()
    assert torch.allclose(layer(x), expected, atol=0.02 * expected.abs().max().item(), rtol=0)


def test_fp8_rowwise_kernel_computes_the_stored_values():
    """The sm90 kernel's arithmetic (torch._scaled_mm runs on this CPU too): stored e4m3 weights and
    per-row scales, activations rounded to e4m3 per row."""
    from lwdsl.apply.quantize import QuantizedLinear

    linear = torch.nn.Linear(64, 32, bias=True)
    module = QuantizedLinear.from_linear(linear, QuantFormat(dtype="fp8"))
    layer = Fp8Linear(module.packed().codes, module.packed().scale, linear.bias)
    x = torch.randn(3, 64)
    expected = module(x)
    assert torch.allclose(layer(x), expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def test_kernel_table_is_ordered_data_with_a_catch_all():
    from lwdsl.apply.quantize import CastLinear, QuantizedLinear

    assert KERNELS[-1].name == "dequant" and KERNELS[-1].takes(None, torch.device("cpu"))
    linear = torch.nn.Linear(64, 32)
    cpu = torch.device("cpu")
    assert kernel_for(linear, cpu).name == "float"
    assert kernel_for(CastLinear(linear.weight, QuantFormat(dtype="fp16"), None), cpu).name == "float"
    assert kernel_for(QuantizedLinear.from_linear(linear, QuantFormat(dtype="int4", group=16)), cpu).name == "dequant"
    assert kernel_for(QuantizedLinear.from_linear(linear, QuantFormat(dtype="fp8")), cpu).name == "dequant"
    layer = serve_linear(linear, cpu, torch.float32)
    assert serve_linear(layer, cpu, torch.float32) is layer  # converting twice changes nothing


def test_int8_kv_cache_rounds_as_the_lean_loop_does(smollm2_model, ids):
    model = _small(smollm2_model[0])
    kv = QuantFormat(dtype="int8")
    lean = decode(model, ids, 6, kv_format=kv, stop_at_eos=False)
    served = copy.deepcopy(model)
    with torch.inference_mode():
        executor = Serve(served, 1, ids.shape[1] + 6, kv)
        assert executor.cache.kv_cache_bytes() == 2 * BLOCKS * 3 * executor.positions * (64 + 2)
    import os
    os.environ["LWDSL_EXECUTOR"] = "serve"
    try:
        result = decode(served, ids, 6, kv_format=kv, stop_at_eos=False)
    finally:
        del os.environ["LWDSL_EXECUTOR"]
    assert result.token_ids == lean.token_ids


def test_the_loop_chooses_the_executor_and_reuses_it(smollm2_model, ids, monkeypatch):
    model = copy.deepcopy(smollm2_model[0])
    assert not serves(model)  # a CPU model keeps the fused step
    expected = decode(smollm2_model[0], ids, 8, stop_at_eos=False).token_ids  # (the shared model: not served)
    monkeypatch.setenv("LWDSL_EXECUTOR", "serve")
    assert serves(model)
    result = decode(model, ids, 8, stop_at_eos=False)
    assert result.token_ids == expected and result.step.startswith("eager serving step on cpu")
    first = runner(model, 1, ids.shape[1] + 8)
    assert runner(model, 1, ids.shape[1] + 9) is first  # the same rounded cache: reused
    assert runner(model, 2, ids.shape[1] + 8) is not first


def test_batched_rows_decode_independently(smollm2_model, ids):
    model = _small(smollm2_model[0])
    other = smollm2_model[1]("A completely different sentence about dogs", return_tensors="pt").input_ids
    length = min(ids.shape[1], other.shape[1])
    batch = torch.cat([ids[:, :length], other[:, :length]])
    with torch.inference_mode():
        together = Serve(copy.deepcopy(model), 2, length + 1).forward(batch, 0)
        alone = [Serve(copy.deepcopy(model), 1, length + 1).forward(row[None], 0)[0] for row in batch]
    assert torch.allclose(together, torch.stack(alone), atol=1e-4, rtol=0)


def test_chunk_rule():
    assert cache_tokens(8192 + 512) == 8704 and cache_tokens(1) == 64 and cache_tokens(65) == 128 \
        and cache_tokens(2176) == 2176
    llama8b = dict(batch=1, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                   activation_bytes=2, cache_tokens=8704)
    chunk = prefill_chunk_tokens(8192, **llama8b)
    assert chunk % 64 == 0 and 1024 <= chunk < 8192
    assert prefill_chunk_tokens(100, **llama8b) == 100  # a short prompt is one chunk
    assert prefill_chunk_tokens(8192, **{**llama8b, "batch": 64}) == 64  # never below one multiple


def test_a_batch_is_timed_through_the_executor(smollm2_model, ids, monkeypatch):
    from lwdsl.verify.latency import time_one_run

    monkeypatch.setenv("LWDSL_EXECUTOR", "serve")
    model = _small(smollm2_model[0])
    run = time_one_run(model, torch.cat([ids, ids]), generate=4)
    assert len(run.step_s) == 3 and run.prefill_s > 0 and run.decode_step.startswith("eager serving step")


def test_models_with_streamed_blocks_keep_the_lean_loop(smollm2_model, monkeypatch):
    monkeypatch.setenv("LWDSL_EXECUTOR", "serve")
    model = _small(smollm2_model[0])
    model.__dict__["lwdsl_streamer"] = object()
    assert not serves(model)


@pytest.mark.parametrize("kv", ["fp16", "bf16"])
def test_half_kv_caches_attend_in_their_own_dtype(smollm2_model, ids, eager, kv):
    model = copy.deepcopy(smollm2_model[0])
    served = _serve_logits(model, ids, kv_format=QuantFormat(dtype=kv))
    assert model.__dict__.get("lwdsl_serve") is None  # built directly, not kept
    assert (served - eager[-2:]).abs().max() < 1.0 and torch.equal(served.argmax(-1), eager[-2:].argmax(-1))
