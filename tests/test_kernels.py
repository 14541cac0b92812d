"""lwdsl.apply.kernels: bit packing, the stored <-> kernel layouts, and every candidate kernel's result."""
from __future__ import annotations

import pytest
import torch

from lwdsl.apply import kernels
from lwdsl.cost.formats import stored_bytes as cost_stored_bytes
from lwdsl.solution import QuantFormat

torch.manual_seed(0)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_bits_round_trips_and_uses_every_bit(bits):
    codes = torch.randint(0, 2 ** bits, (7, 64), dtype=torch.uint8)
    packed = kernels.pack_bits(codes, bits)
    assert packed.shape == (7, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(kernels.unpack_bits(packed, bits), codes)


def test_low_nibble_holds_the_even_index():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert kernels.pack_bits(codes, 4).tolist() == [[0x21, 0x43]]


@pytest.mark.parametrize("shape", [(64, 64), (192, 576), (96, 1536)])
def test_int4pack_layout_is_inverted_exactly(shape):
    packed = kernels.quantize_linear_codes(torch.randn(shape), 4, 32, False)
    runtime = kernels.CANDIDATES["int4"]["int4pack_bf16"][0](packed)
    recovered = kernels.stored_codes("int4pack_bf16", runtime, packed, shape)
    assert torch.equal(recovered, packed.codes)


def test_fbgemm_prepack_gives_back_the_same_int8_codes():
    packed = kernels.quantize_linear_codes(torch.randn(96, 128), 8, None, True)
    runtime = kernels.CANDIDATES["int8"]["fbgemm_dynamic"][0](packed)
    assert torch.equal(kernels.stored_codes("fbgemm_dynamic", runtime, packed, (96, 128)), packed.codes)


# Tolerances against the dequantised reference (same codes, fp32 matmul): bf16 activations and
# scales carry an 8-bit mantissa, a relative rounding of at most 2**-9 per value, so the output of a
# sum of many such products stays within a few 2**-9; the int8 W8A8 fbgemm path also rounds the
# activations to 7 bits (reduce_range), half a step of 1/127 of the absmax, about 2% on random input;
# lwdsl's native kernels round activations to int8 per block of 32 (half a step of absmax/127, ~0.5%).
KERNEL_TOLERANCE = {"native_q8": 0.02, "native_q4": 0.02, "native_q8g": 0.02, "int8pack_f32": 1e-5, "int8pack_bf16": 8 * 2 ** -9, "fbgemm_dynamic": 0.05,
                    "dequant_fp32": 1e-6, "int4pack_f32": 1e-5, "int4pack_bf16": 8 * 2 ** -9}


@pytest.mark.parametrize("family,kernel", [(f, k) for f, table in kernels.CANDIDATES.items() for k in table])
@pytest.mark.parametrize("rows", [1, 17])
def test_every_candidate_matches_the_dequantised_weight(family, kernel, rows):
    weight = torch.randn(192, 576) / 24
    packed = kernels.QUANTIZERS[family](weight)
    x = torch.randn(rows, 576)
    reference = x @ kernels.dequantize(packed).t()
    prepare, run = kernels.CANDIDATES[family][kernel]
    output = run(x, prepare(packed)).float()
    assert output.shape == reference.shape
    relative = ((output - reference).norm() / reference.norm()).item()
    assert relative < KERNEL_TOLERANCE[kernel]


def test_dispatch_names_existing_kernels_for_both_phases():
    for (family, phase), names in kernels.DISPATCH.items():
        assert phase in ("decode", "prefill")
        kernel_name, (prepare, run) = kernels.kernel_for(family, phase, 576)
        assert kernel_name in names and callable(prepare) and callable(run)
        assert all(name in kernels.CANDIDATES.get(family, {"dequant_fp32": 0}) for name in names)
    # an input width the native kernels cannot block by 32 falls back to torch's
    assert kernels.kernel_for("int8", "decode", 100)[0] == "int8pack_bf16"


def test_native_kernels_build_here():
    from lwdsl.apply import native

    if native.level() is None:
        pytest.skip("this CPU has no AVX2/FMA/F16C: torch's kernels run everything")
    assert native.available(), "a C compiler is expected on this machine"
    # the build for the highest level this CPU has (or LWDSL_NATIVE_ISA's) is the one loaded
    assert native.loaded_level() == native.level()


@pytest.mark.parametrize("bits,group,symmetric,dtype", [
    (8, None, True, "int8"), (4, 32, True, "int4"), (4, 64, False, "int4"), (2, 32, False, "int2"),
    (8, 64, True, "int8")])
def test_stored_bytes_are_the_cost_models(bits, group, symmetric, dtype):
    packed = kernels.quantize_linear_codes(torch.randn(96, 576), bits, group, symmetric)
    fmt = QuantFormat(dtype=dtype, group=group, symmetric=symmetric)
    assert kernels.stored_bytes(packed) == cost_stored_bytes((96, 576), fmt)


def test_symmetric_int4_codes_use_the_full_signed_range_and_exact_scales():
    weight = torch.tensor(list(range(-7, 8)) * 2 + [0.0, 7.0]).repeat(4, 1)  # on the grid: exact
    packed = kernels.quantize_linear_codes(weight, 4, 32, True)
    assert torch.equal(kernels.dequantize(packed), weight)
    assert kernels.signed_codes(packed).min() >= -8 and kernels.signed_codes(packed).max() <= 7


def test_nf4_levels_are_sorted_and_span_minus_one_to_one():
    levels = kernels.NF4_LEVELS
    assert levels[0] == -1 and levels[-1] == 1 and torch.all(levels[1:] > levels[:-1])


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (8, 32, True), (8, 64, True),
                                                  (4, 32, False), (4, 64, True), (4, 128, False)])
@pytest.mark.parametrize("features", [256, 608, 640])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_single_rows_are_their_own_numerics_within_float32(bits, group, symmetric, features, threads):
    """A decode row (`lwdsl_linear_row`, the fused step's row kernels at this CPU's level: 512-bit
    pairs of blocks where it has AVX-512 VNNI) against the float64 computation it stands for: the
    dequantized weight on the activation rounded to int8 per block of 32, within float32 summation
    error. 608 inputs: 19 blocks, the last without a partner; 302 rows: four at a time, two left."""
    if group and features % group:
        pytest.skip(f"{features} inputs are not groups of {group}")
    from reference import magnitude_bound, native_activations, native_weight

    from lwdsl.apply import native

    if not native.available():
        pytest.skip("no native kernels on this CPU")
    generator = torch.Generator().manual_seed(features + bits)
    weight = torch.randn(302, features, generator=generator) / 16
    x = torch.randn(1, features, generator=generator) * 3
    packed = kernels.quantize_linear_codes(weight, bits, group, symmetric)
    exact = native_weight(packed).double()
    rounded = native_activations(x)
    reference = rounded @ exact.t()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if bits == 4:
            output = native.q4_linear(x, packed.codes, packed.scale, packed.offset, group)
        elif group is None:
            output = native.q8_linear(x, packed.codes, packed.scale)
        else:
            output = native.q8g_linear(x, packed.codes, packed.scale, group)
    finally:
        torch.set_num_threads(before)
    bound = magnitude_bound(rounded, exact.abs(), features // 16 + 16)
    error = (output.double() - reference).abs()
    assert (error <= bound).all(), (error / bound).max().item()
    assert (error <= 1e-4 * reference.abs().max()).all()
