"""lwdsl.apply.native's kernels against exact float64 references of their own numerics.

Each kernel is compared with what it stands for (`reference.py`): the dequantized weight in float64
applied to the activations rounded as that kernel rounds them (int8 per block of 32 for the integer
kernels, float32 or bf16 for the prefill path). The codes of the rounding are reproduced bit for bit
(the same IEEE float32 operations), so all that is left is float32 summation error: a bound of a few
ulps of the sum of the products' magnitudes, whatever the CPU and whichever ISA build runs.
"""
from __future__ import annotations

import math

import pytest
import torch

from lwdsl.apply import kernels, native
from reference import magnitude_bound, native_activations, native_codes, native_weight

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels on this CPU")

SHAPES = [(192, 576), (40, 1536), (9, 96)]  # (out, in): SmolLM2's widths, and a short row


def _weight(out: int, inp: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=generator) / inp ** 0.5


def _activations(rows: int, inp: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(rows, inp, generator=generator)
    x[:, 5] *= 40  # an outlier channel, as real activations have: one block's scale is set by it
    x[0, 32:64] = 0  # an all-zero block: scale 0
    return x


def _packed(family: str, weight: torch.Tensor, variant: str) -> kernels.Packed:
    if family == "int8":
        return kernels.quantize_linear_codes(weight, 8, None, True)
    group, symmetric = {"g32 asym": (32, False), "g64 sym": (64, True), "g128 asym": (128, False)}[variant]
    if weight.shape[1] % group:
        pytest.skip("the width is not a multiple of the group")
    return kernels.quantize_linear_codes(weight, 4, group, symmetric)


def _weight_magnitude(packed: kernels.Packed) -> torch.Tensor:
    """Per weight, |code * scale| + |offset|: the float terms the kernel sums before they cancel."""
    codes = kernels.signed_codes(packed).double()
    size = packed.group or codes.shape[1]
    blocks = codes.reshape(codes.shape[0], -1, size).abs() * packed.scale.double().reshape(codes.shape[0], -1, 1)
    if packed.offset is not None:
        blocks = blocks + packed.offset.double().abs().reshape(codes.shape[0], -1, 1)
    return blocks.reshape(codes.shape)


def _run(family: str, x: torch.Tensor, packed: kernels.Packed) -> torch.Tensor:
    if family == "int8":
        return native.q8_linear(x, packed.codes, packed.scale)
    return native.q4_linear(x, packed.codes, packed.scale, packed.offset, packed.group)


CASES = [("int8", "per channel")] + [("int4", v) for v in ("g32 asym", "g64 sym", "g128 asym")]


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 6])  # decode; prefill rows below DEQUANT_ROWS, in tiles of 4 and a rest
def test_integer_kernels_equal_their_float64_emulation(family, variant, shape, rows):
    assert rows < native.DEQUANT_ROWS
    packed = _packed(family, _weight(*shape, seed=rows), variant)
    x = _activations(rows, shape[1], seed=rows)
    out = _run(family, x, packed).double()
    rounded = native_activations(x)
    exact = rounded @ kernels.dequantize(packed).double().t()
    bound = magnitude_bound(rounded, _weight_magnitude(packed), shape[1] // 32 + 16) + 1e-30
    assert (out - exact).abs().le(bound).all(), ((out - exact).abs() / bound).max()
    # the rounding is the format's: not the float activations' product
    unrounded = x.double() @ kernels.dequantize(packed).double().t()
    assert (exact - unrounded).abs().max() > bound.max()


def test_activation_codes_are_the_documented_rounding():
    """Half a code step at most from the value, 127 at the block's absmax, 0 for a zero block."""
    x = _activations(2, 96, seed=0)
    codes, scale = native_codes(x)
    assert codes.abs().max() == 127 and torch.all(codes[0, 32:64] == 0)
    step = scale.repeat_interleave(32, -1)
    assert torch.all((codes * step - x).abs() <= step / 2 * (1 + 1e-6))


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_is_exact(family, variant, dtype):
    """A prefill's dequantized layer: each weight's float32 value rounded once (and then to the
    nearest bfloat16, ties to even, as torch rounds), bit for bit on every ISA build."""
    packed = _packed(family, _weight(40, 1536, seed=3), variant)
    if family == "int8":
        out = native.q8_dequantize(packed.codes, packed.scale, dtype)
    else:
        out = native.q4_dequantize(packed.codes, packed.scale, packed.offset, packed.group, 1536, dtype)
    assert out.dtype == dtype and torch.equal(out, native_weight(packed).to(dtype))


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("rows", [native.DEQUANT_ROWS, 40])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prefill_path_equals_its_float64_emulation(family, variant, rows, dtype, monkeypatch):
    """From DEQUANT_ROWS rows on a layer is dequantized and multiplied by torch's matmul in the
    precision `native.prefill_dtype()` chose (forced here, both): the float64 product of the same
    rounded operands, within the float32 summation bound (and bf16's output rounding, half an ulp:
    2**-9 of the value, twice that allowed)."""
    monkeypatch.setenv("LWDSL_PREFILL_DTYPE", dtype)
    shape = (192, 576)
    packed = _packed(family, _weight(*shape, seed=rows), variant)
    x = _activations(rows, shape[1], seed=rows)
    out = _run(family, x, packed).double()
    torch_dtype = native.PREFILL_DTYPES[dtype]
    operands = (x.to(torch_dtype).double(), native_weight(packed).to(torch_dtype).double())
    exact = operands[0] @ operands[1].t()
    bound = magnitude_bound(operands[0], operands[1].abs(), shape[1])
    if torch_dtype == torch.bfloat16:
        bound = bound + exact.abs() * 2.0 ** -8
    assert (out - exact).abs().le(bound + 1e-30).all(), ((out - exact).abs() / bound).max()


def test_prefill_dtype_is_the_probes_choice_by_rows(tmp_path, monkeypatch):
    """The probe of THIS CPU chose per prompt length; the nearest measured length decides, the
    environment overrides, and no probe (or another CPU's) means float32."""
    from lwdsl.hardware import probe

    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path))
    monkeypatch.delenv("LWDSL_PREFILL_DTYPE", raising=False)
    native._probed_prefill_dtypes.cache_clear()
    native.carry_prefill_dtypes({})  # no artifact loaded by an earlier test speaks here
    try:
        assert native.prefill_dtype(512) == torch.float32  # nothing measured here
        record = {"version": probe.VERSION, "kind": "cpu", "native": probe._native_build(), "cpu": probe.cpu_identity(),
                  "prefill": {"int_dtype": {"16": "fp32", "64": "fp32", "256": "bf16", "1024": "bf16"},
                              "attention_dtype": {"16": "bf16", "64": "fp32", "256": "fp32", "1024": "fp32"}}}
        probe.write_cache(record)
        native._probed_prefill_dtypes.cache_clear()
        assert native.prefill_dtype(16) == native.prefill_dtype(40) == torch.float32
        assert native.prefill_dtype(200) == native.prefill_dtype(4096) == torch.bfloat16
        # the attention core has its own choice
        assert native.prefill_dtype(16, "attention") == torch.bfloat16
        assert native.prefill_dtype(200, "attention") == native.prefill_dtype(4096, "attention") == torch.float32
        monkeypatch.setenv("LWDSL_PREFILL_DTYPE", "fp32")
        assert native.prefill_dtype(4096) == torch.float32
        monkeypatch.delenv("LWDSL_PREFILL_DTYPE")
        probe.write_cache({**record, "cpu": {**record["cpu"], "model": "another CPU"}})
        native._probed_prefill_dtypes.cache_clear()
        assert native.prefill_dtype(4096) == torch.float32
    finally:
        native._probed_prefill_dtypes.cache_clear()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gradients_through_frozen_int_layers_are_those_of_their_weights(dtype, monkeypatch):
    """A forward that trains (`recover distill`'s student with float parameters around frozen codes)
    takes its input gradient through each int layer's dequantized weight: two layers in a row, each
    dequantized at prefill size, must keep their own weights for the backward (a shared dequantization
    buffer gave the first layer's backward the second layer's weight), also after an inference-mode
    prefill made the buffer."""
    monkeypatch.setenv("LWDSL_PREFILL_DTYPE", dtype)
    generator = torch.Generator().manual_seed(3)
    layers = []
    for out_features, in_features in ((96, 64), (64, 96)):
        codes = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, generator=generator)
        scale = (torch.rand(out_features, in_features // 32, generator=generator) / 32).half()
        offset = (-torch.rand(out_features, in_features // 32, generator=generator) / 8).half()
        layers.append((codes, scale, offset, in_features))
    x = torch.randn(native.DEQUANT_ROWS + 8, 64, generator=generator)
    with torch.inference_mode():  # a prefill first: the reused buffer is an inference tensor now
        native.q4_linear(x, *layers[0][:3], 32)
    leaf = x.clone().requires_grad_(True)
    hidden = native.q4_linear(leaf, *layers[0][:3], 32)
    native.q4_linear(hidden, *layers[1][:3], 32).sum().backward()
    weights = [native.q4_dequantize(c, s, o, 32, k).clone() for c, s, o, k in layers]
    rounded = torch.bfloat16 if dtype == "bf16" else torch.float32
    w0, w1 = (w.to(rounded).double() for w in weights)
    expected = torch.ones(x.shape[0], 64, dtype=torch.float64) @ w1 @ w0  # d(sum)/dx through both layers
    assert torch.allclose(leaf.grad.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rows,positions", [(24, 24), (7, 19)])
def test_prefill_attention_equals_its_float64_emulation(dtype, rows, positions):
    """A prefill's attention core (`native.prefill_attention`, what `LeanLlama` runs) in the precision
    the probe chose (both, forced): the float64 causal attention of the same rounded q, k, v, where the
    queries are the LAST `rows` of `positions` (a prompt chunk after earlier tokens: SDPA's own
    `is_causal` would align them first) and 3 query heads share each kv head. Bound: float32's
    summation error, and in bfloat16 the kernel's own roundings (the probabilities and the output,
    half an ulp each: 2**-9 of the largest |v|, four times that allowed)."""
    generator = torch.Generator().manual_seed(rows)
    q, k, v = (torch.randn(1, heads, n, 32, generator=generator)
               for heads, n in ((6, rows), (2, positions), (2, positions)))
    torch_dtype = native.PREFILL_DTYPES[dtype]
    out = native.prefill_attention(q, k, v, torch_dtype).double()
    q64, k64, v64 = (t.to(torch_dtype).double() for t in (q, k, v))
    k64, v64 = k64.repeat_interleave(3, 1), v64.repeat_interleave(3, 1)
    scores = q64 @ k64.transpose(-1, -2) / math.sqrt(32)
    future = torch.arange(positions)[None] > torch.arange(positions - rows, positions)[:, None]
    exact = scores.masked_fill(future, float("-inf")).softmax(-1) @ v64
    bound = 1e-5 * v64.abs().max() if dtype == "fp32" else 4 * 2.0 ** -9 * v64.abs().max()
    assert out.shape == (1, 6, rows, 32) and out.dtype == torch.float64
    assert (out - exact).abs().max() <= bound, ((out - exact).abs().max(), bound)


def test_a_loaded_artifacts_priced_dtypes_run_where_no_probe_chooses(tmp_path, monkeypatch):
    """An artifact carries the prefill dtypes its solution was priced with: with no current probe of
    this CPU (cleared, re-probing, an older version) they are what runs; a current probe's own choice
    comes first."""
    from lwdsl.hardware import probe

    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path))
    monkeypatch.delenv("LWDSL_PREFILL_DTYPE", raising=False)
    native._probed_prefill_dtypes.cache_clear()
    try:
        native.carry_prefill_dtypes({"int": {"64": "bf16"}, "attention": {64: "bf16"}})
        assert native.prefill_dtype(512) == native.prefill_dtype(512, "attention") == torch.bfloat16
        record = {"version": probe.VERSION, "kind": "cpu", "native": probe._native_build(), "cpu": probe.cpu_identity(),
                  "prefill": {"int_dtype": {"64": "fp32"}}}
        probe.write_cache(record)  # clears the process's cached choices itself
        assert native.prefill_dtype(512) == torch.float32  # the probe's choice
        assert native.prefill_dtype(512, "attention") == torch.bfloat16  # still none of its own: carried
    finally:
        native.carry_prefill_dtypes({})
        native._probed_prefill_dtypes.cache_clear()
