"""Time, training and whole-model figures: pinned values, sums of terms, invariants, the real model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwdsl import ast
from lwdsl.cost import breakdown, evaluate, terms, time, training
from lwdsl.cost.evaluate import decode_working_set
from lwdsl.hardware import resolve_target
from lwdsl.hardware.records import DeviceSpec, LinkSpec
from lwdsl.inventory import load_inventory
from lwdsl.solution import LayerChoice, PruneChoice, QuantFormat

GiB = 1 << 30


def q(value: float, kind: str) -> ast.Quantity:
    return ast.Quantity(value=value, kind=kind, text=str(value))


def inventory(arch_id: str):
    """The catalog architecture as lwdsl holds a model it loads from weights: fp32 (the checkpoint's own
    dtype, which `arch:` layers left as they are hold, is tested in test_checkpoint_dtype.py)."""
    inv = load_inventory(ast.ModelBlock(source=f"arch:{arch_id}", scheme="arch", location=arch_id), Path("."))
    return inv.model_copy(update={"weights": tuple(w.model_copy(update={"checkpoint_dtype": None})
                                                   for w in inv.weights)})


def cpu_target(bandwidth: float = 20e9, compute: float = 100e9, with_disk: bool = False):
    devices = [ast.Device(name="cpu0", kind="cpu", memory=q(8 * GiB, "size"), bandwidth=q(bandwidth, "bandwidth"),
                          compute=q(compute, "compute"))]
    links = []
    if with_disk:
        devices.append(ast.Device(name="ssd", kind="disk", memory=q(256 * GiB, "size"), bandwidth=q(2e9, "bandwidth")))
        links.append(ast.Link(a="cpu0", b="ssd", rate=q(4e9, "bandwidth"), latency=q(1e-4, "time")))
    return resolve_target(ast.Target(devices=tuple(devices), links=tuple(links)))


WORKLOAD = ast.InferenceWorkload(batch=1, context=256, generate=32)


def test_roofline_transfer_and_allreduce():
    device = DeviceSpec(name="d", kind="gpu", memory_bytes=GiB, bandwidth_Bps=1e12, rates={"fp32": 1e13})
    assert time.roofline_s(1e13, 1e9, device, "fp32") == 1.0  # compute-bound
    assert time.roofline_s(1e9, 2e12, device, "fp32") == 2.0  # memory-bound
    link = LinkSpec(a="a", b="b", rate_Bps=1e9, latency_s=1e-3)
    assert time.transfer_s(1e9, link) == pytest.approx(1.001)
    assert time.transfer_s(1e9, None) == math.inf  # no link: impossible, not free
    assert time.allreduce_s(1e9, 4, link) == pytest.approx(2 * 3 / 4 * 1.0 + 6e-3)
    assert time.allreduce_s(1e9, 1, link) == 0.0


def test_zero_stages_match_the_zero_paper_figure_1():
    # ZeRO (Rajbhandari et al. 2020), Figure 1: Ψ = 7.5B, N_d = 64, K = 12
    psi, n = 7_500_000_000, 64
    gb = [training.model_states(psi, stage, n).total_bytes / 1e9 for stage in range(4)]
    assert gb == pytest.approx([120.0, 31.40625, 16.640625, 1.875])
    offloaded = training.model_states(psi, 2, n, offload_optimizer=True)
    assert offloaded.optimizer_bytes == 0 and offloaded.offloaded_bytes == psi * 12 // n


def test_training_compute_is_6pd():
    assert training.training_flops(10**9, 10**10) == 6e19
    assert training.training_flops(10**9, 10**10, checkpoint=True) == 8e19
    assert training.training_time_s(6e19, 8, 1e15, mfu=0.5) == pytest.approx(6e19 / 4e15)


@settings(max_examples=60, deadline=None)
@given(params=st.integers(10**6, 10**12), ranks=st.integers(1, 1024), stage=st.integers(0, 2),
       precision=st.sampled_from(["fp32", "bf16"]), optimizer=st.sampled_from(["adamw", "sgd"]))
def test_zero_stage_k_plus_1_never_more_memory(params, ranks, stage, precision, optimizer):
    lower = training.model_states(params, stage, ranks, precision, optimizer).total_bytes
    higher = training.model_states(params, stage + 1, ranks, precision, optimizer).total_bytes
    assert higher <= lower


def test_checkpointing_saves_activation_memory():
    arch = inventory("llama-2-7b").arch
    full = training.activation_bytes(arch, 1, 4096, checkpoint=False)
    kept = training.activation_bytes(arch, 1, 4096, checkpoint=True)
    assert kept < full / 10
    # Korthikanti et al. 2022: s·b·h·(34 + 5·a·s/h) a layer
    assert full == 32 * 4096 * 4096 * (34 + 5 * 32 * 4096 / 4096)


def test_estimate_is_the_sum_of_its_terms():
    inv = inventory("smollm2-135m")
    target = cpu_target()
    result = breakdown(inv, target, WORKLOAD)
    predicted = result.predicted
    assert predicted.latency.prefill_s == pytest.approx(sum(c.prefill_s for c in result.time_by_component.values()))
    assert predicted.latency.request_s == pytest.approx(predicted.latency.prefill_s + 32 * predicted.latency.token_s)
    assert predicted.throughput_tok_s == pytest.approx(1 / predicted.latency.token_s)
    # fp32 weights, tied embedding stored once: 4 bytes a parameter
    assert predicted.memory.by_device["cpu0"].weights_bytes == 4 * 134_515_008
    # per-layer terms are the solver's coefficients: the linear sum is theirs
    total = 0.0
    for weight in inv.linear_layers() + [w for w in inv.weights if w.role == "embedding"]:
        choice = next(c for c in result.layers if c.name == weight.module)
        total += terms.layer_terms(weight, choice, inv, target, WORKLOAD).token_s
    assert result.time_by_component["linear"].token_s == pytest.approx(total)


def test_a_format_that_cannot_apply_is_left_as_it_was_and_said():
    inv = inventory("smollm2-135m")
    target = cpu_target()
    base = breakdown(inv, target, WORKLOAD)
    int4 = [c.model_copy(update={"format": QuantFormat(dtype="int4", group=128)}) for c in base.layers]
    result = breakdown(inv, target, WORKLOAD, int4)
    assert any("group 128 does not divide the input dimension 576" in n for n in result.notes)
    down = [n for n in result.notes if "down_proj" in n]
    assert not down  # down_proj's input is 1536 = 12 · 128: it applies there


def test_tied_head_shares_storage_only_with_the_same_choice():
    inv = inventory("smollm2-135m")
    target = cpu_target()
    base = evaluate(inv, target, WORKLOAD).memory.by_device["cpu0"].weights_bytes
    int8_head = [LayerChoice(name="lm_head", device="cpu0", compute_device="cpu0", format=QuantFormat(dtype="int8"))]
    separate = evaluate(inv, target, WORKLOAD, int8_head).memory.by_device["cpu0"].weights_bytes
    assert separate == base + 49152 * 576 + 49152 * 2


def test_offload_adds_transfer_time_and_moves_bytes():
    inv = inventory("smollm2-135m")
    target = cpu_target(with_disk=True)
    offloaded = [LayerChoice(name=w.module, block=w.block, device="ssd", compute_device="cpu0")
                 for w in inv.linear_layers() if w.block is not None and w.block < 10]
    base = breakdown(inv, target, WORKLOAD)
    moved = breakdown(inv, target, WORKLOAD, offloaded)
    shifted = sum(4 * w.numel for w in inv.linear_layers() if w.block is not None and w.block < 10)
    assert moved.predicted.memory.by_device["ssd"].weights_bytes == shifted
    # disk excluded; the streamer holds two blocks at once where they compute
    in_flight = terms.STREAM_UNITS_IN_FLIGHT * shifted // 10
    assert moved.predicted.memory.total_bytes == base.predicted.memory.total_bytes - shifted + in_flight
    # streamed at the disk's 2 GB/s (slower than the 4 GB/s link), plus latency per transfer; the reads
    # overlap the streamed blocks' own work (their linears at 20 GB/s, attention and overhead), so the
    # disk-bound blocks take their read time: what is added is the read less the work it hides
    reads = shifted / 2e9 + 70 * 1e-4
    hidden = (sum(c.token_s for c in (terms.layer_terms(w, LayerChoice(name=w.module, block=w.block, device="cpu0",
                                                                        compute_device="cpu0"), inv, target, WORKLOAD)
                                         for w in inv.linear_layers() if w.block is not None and w.block < 10))
              + 10 * terms.block_own_terms(inv.arch, "cpu0", target, WORKLOAD, QuantFormat()).token_s)
    assert 0 < moved.time_by_component["transfer"].token_s == pytest.approx(reads - hidden)
    assert moved.predicted.latency.token_s == pytest.approx(base.predicted.latency.token_s + reads - hidden)


def test_quality_prior_is_additive_and_zero_as_loaded():
    inv = inventory("llama-2-7b")
    target = cpu_target()
    assert evaluate(inv, target, WORKLOAD).quality.perplexity_increase == 0.0
    choices = [LayerChoice(name=w.module, block=w.block, device="cpu0", compute_device="cpu0",
                           format=QuantFormat(dtype="int4", group=128)) for w in inv.linear_layers()]
    whole = evaluate(inv, target, WORKLOAD, choices).quality
    assert whole.perplexity_increase == pytest.approx(0.048, rel=1e-6) and whole.source == "prior"
    half = evaluate(inv, target, WORKLOAD, choices[: len(choices) // 2]).quality.perplexity_increase
    assert 0 < half < whole.perplexity_increase


@settings(max_examples=40, deadline=None)
@given(bandwidth=st.floats(1e9, 1e12), factor=st.floats(1.0, 100.0), compute=st.floats(1e10, 1e15),
       dtype=st.sampled_from(["fp32", "int8", "int4"]), context=st.integers(1, 2048))
def test_more_bandwidth_never_more_time(bandwidth, factor, compute, dtype, context):
    inv = inventory("smollm2-135m")
    workload = ast.InferenceWorkload(batch=1, context=context, generate=16)
    choices = [LayerChoice(name=w.module, block=w.block, device="cpu0", compute_device="cpu0",
                           format=QuantFormat(dtype=dtype)) for w in inv.linear_layers()]
    slow = evaluate(inv, cpu_target(bandwidth, compute), workload, choices).latency
    fast = evaluate(inv, cpu_target(bandwidth * factor, compute), workload, choices).latency
    assert fast.token_s <= slow.token_s and fast.prefill_s <= slow.prefill_s


def test_training_plan_figures():
    inv = inventory("llama-3.1-8b")
    devices = tuple(ast.Device(name=f"g{i}", kind="gpu", catalog="h100-sxm") for i in range(8))
    target = resolve_target(ast.Target(devices=devices))
    workload = ast.TrainingWorkload(batch=64, sequence=4096, tokens=10**10, precision="bf16")
    predicted = evaluate(inv, target, workload, zero_stage=3, data_parallel=8, checkpoint=True)
    params = 8_030_261_248
    assert predicted.training.model_states_bytes == 16 * params // 8
    assert predicted.training.flops == 8.0 * params * 10**10
    assert predicted.training.time_s == pytest.approx(predicted.training.flops / (8 * 989.5e12 * 0.4))
    assert set(predicted.memory.by_device) == {f"g{i}" for i in range(8)}
    assert predicted.cost_per_h == pytest.approx(8 * 2.99)


@pytest.mark.model
def test_predicted_fp32_bytes_equal_the_loaded_tensors(smollm2_gguf, smollm2_model):
    model, _ = smollm2_model
    inv = load_inventory(ast.ModelBlock(source=f"gguf:{smollm2_gguf}", scheme="gguf",
                                        location=str(smollm2_gguf)), Path("."))
    predicted = evaluate(inv, cpu_target(), WORKLOAD)
    storages = {p.untyped_storage().data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    assert predicted.memory.by_device["cpu0"].weights_bytes == sum(storages.values())
    for weight in inv.weights:
        if weight.tied_to is None:
            assert tuple(model.get_parameter(weight.name).shape) == weight.shape


def test_a_slow_native_dtype_runs_at_the_activation_rate():
    cpu = DeviceSpec(name="c", kind="cpu", memory_bytes=GiB, bandwidth_Bps=1e10,
                     rates={"fp32": 1e11, "fp16": 2e9, "bf16": 2e11, "int8": 4e11})
    assert terms.fastest_dtype(cpu, QuantFormat(dtype="fp16")) == "fp32"  # upcast beats 2 GFLOP/s
    assert terms.fastest_dtype(cpu, QuantFormat(dtype="bf16")) == "bf16"
    assert terms.fastest_dtype(cpu, QuantFormat(dtype="int8")) == "int8"
    assert terms.fastest_dtype(cpu, QuantFormat(dtype="int4", group=32)) == "fp32"


def test_the_runtime_is_counted_where_a_device_computes():
    base = cpu_target(with_disk=True)
    runtime = 150 * 2**20
    cpu = base.device("cpu0").model_copy(update={"runtime_bytes": runtime})
    with_runtime = base.model_copy(update={"devices": {**base.devices, "cpu0": cpu}})
    inv = inventory("smollm2-135m")
    before = breakdown(inv, base, WORKLOAD).predicted.memory.by_device["cpu0"]
    after = breakdown(inv, with_runtime, WORKLOAD).predicted.memory.by_device["cpu0"]
    assert after.runtime_bytes == runtime and after.total_bytes == before.total_bytes + runtime
    assert "ssd" not in breakdown(inv, with_runtime, WORKLOAD).predicted.memory.by_device  # stores, runs nothing


def fused_cpu(**overrides) -> "ResolvedTarget":
    from lwdsl.hardware.records import ResolvedTarget

    spec = dict(name="cpu0", kind="cpu", memory_bytes=8 * GiB, bandwidth_Bps=20e9, rates={"fp32": 1e11},
                op_overhead_s=4e-6, fused_stream={"fp32": ((512, 10e9), (2048, 20e9)), "int8": ((512, 16e9),),
                                                  "int4": ((512, 8e9), (2048, 16e9))},
                fused_block_s=5e-6, fused_step_s=3e-6)
    spec.update(overrides)
    return ResolvedTarget(name="t", devices={"cpu0": DeviceSpec(**spec)}, links={})


def test_fused_stream_rate_interpolates_in_log_width():
    device = fused_cpu().device("cpu0")
    assert device.fused_rate("int4", 256) == 8e9 and device.fused_rate("int4", 4096) == 16e9
    assert device.fused_rate("int4", 1024) == pytest.approx(12e9)  # halfway in log2 between 512 and 2048
    assert device.fused_rate("nf4", 1024) == 0.0


def test_a_working_set_the_caches_keep_streams_at_the_in_cache_rate():
    """The step's rate by working set says what share of its reads the caches serve: all of them up to
    the curve's knee (the last set within 10% of its fastest rate), none from the next set measured on
    (a cyclic read of more than an LRU cache holds reuses nothing), linear in between. The fused rates
    mix by that share: 1/rate = f/in-cache + (1-f)/beyond."""
    curve = ((32 << 20, 50e9), (64 << 20, 46e9), (128 << 20, 25e9), (256 << 20, 20e9))
    device = fused_cpu(working_set_curve=curve, fused_stream_cached={"int4": ((512, 32e9),)}).device("cpu0")
    assert device.cached_fraction(48 << 20) == 1.0 and device.cached_fraction(64 << 20) == 1.0
    assert device.cached_fraction(96 << 20) == pytest.approx(0.5) and device.cached_fraction(128 << 20) == 0.0
    assert device.cached_fraction(512 << 20) == 0.0
    assert device.cached_fraction(0) == 0.0  # no working set known: beyond the caches
    never_fell = fused_cpu(working_set_curve=((32 << 20, 50e9), (64 << 20, 49e9))).device("cpu0")
    assert never_fell.cached_fraction(60 << 20) == 1.0 and never_fell.cached_fraction(80 << 20) == 0.0
    small = device.model_copy(update={"working_set_bytes": 40 << 20})
    large = device.model_copy(update={"working_set_bytes": 400 << 20})
    assert small.fused_rate("int4", 512) == pytest.approx(32e9) and large.fused_rate("int4", 512) == 8e9
    assert small.fused_rate("int8", 512) == 16e9  # no in-cache figure for this family: as measured beyond
    # the cost model sets the working set from the choices it prices: int4 SmolLM2 (~90 MB with its
    # fp32 embedding-tied head) is read faster per byte than fp32 (~540 MB)
    inv = inventory("smollm2-135m")
    target = fused_cpu(working_set_curve=((256 << 20, 50e9), (1 << 30, 20e9)), fused_stream_cached={
        "int4": ((512, 32e9), (2048, 32e9)), "fp32": ((512, 40e9), (2048, 40e9))})
    int4 = QuantFormat(dtype="int4", group=32)
    choices = [LayerChoice(name=w.module, block=w.block, format=int4 if w.role != "head" else QuantFormat(),
                           device="cpu0", compute_device="cpu0") for w in inv.linear_layers()]
    reads = decode_working_set(inv, {c.name: c for c in choices}, WORKLOAD)
    assert 150e6 < reads["cpu0"] < 200e6  # 106M int4 weights (0.56 B each) + the 113 MB fp32 head + KV
    fast = breakdown(inv, target, WORKLOAD, choices).predicted.latency.token_s
    slow = breakdown(inv, fused_cpu(), WORKLOAD, choices).predicted.latency.token_s
    assert fast < slow


def test_the_int_prefill_matmul_rate_follows_the_models_width():
    """The probe times the int matmul in two block widths; a model's rate is interpolated by its hidden
    size in log2, flat outside them, and without the wide figure it is the narrow block's."""
    device = fused_cpu(prefill_int_matmul=((256, 8e11),), prefill_int_matmul_wide=((256, 1.2e12),),
                       prefill_hiddens=(640, 1280)).device("cpu0")
    assert device.prefill_int_matmul_rate(256, 576) == 8e11 and device.prefill_int_matmul_rate(256, 4096) == 1.2e12
    assert device.prefill_int_matmul_rate(256, 905) == pytest.approx(1e12, rel=1e-3)  # halfway in log2
    assert fused_cpu(prefill_int_matmul=((256, 8e11),)).device("cpu0").prefill_int_matmul_rate(256, 1280) == 8e11


def test_the_int_prefill_prices_its_activations_conversions_by_bytes():
    """A half-dtype int matmul converts its activations (float32 to bf16 in, back out): the probe
    prices that per byte apart from the matmul's FLOPs, so a wide MLP (more FLOPs a converted value)
    is not charged the synthetic block's conversion share. 0 where float32 runs, or an older probe."""
    device = fused_cpu(prefill_int_matmul=((64, 5e11), (256, 1e12)),
                       prefill_int_convert=((64, 0.0), (256, 1e-10))).device("cpu0")
    assert device.prefill_int_convert_s(256, 4864, 896) == pytest.approx(256 * (4864 + 896) * 6 * 1e-10)
    assert device.prefill_int_convert_s(64, 4864, 896) == 0.0  # float32 chosen at 64 rows
    assert fused_cpu().device("cpu0").prefill_int_convert_s(256, 4864, 896) == 0.0
    inv = inventory("smollm2-135m")
    int8 = QuantFormat(dtype="int8")
    choices = [LayerChoice(name=w.module, block=w.block, format=int8, device="cpu0", compute_device="cpu0")
               for w in inv.linear_layers()]
    prompt = ast.InferenceWorkload(batch=1, context=256, generate=8)
    with_conversions = breakdown(inv, fused_cpu(prefill_int_matmul=((256, 1e12),), dequant_Bps={"int8": 1e10},
                                                prefill_int_convert=((256, 1e-10),)), prompt, choices)
    without = breakdown(inv, fused_cpu(prefill_int_matmul=((256, 1e12),), dequant_Bps={"int8": 1e10}), prompt, choices)
    converted = sum(256 * (w.shape[0] + w.shape[1]) * 6 * 1e-10 for w in inv.linear_layers() if w.role != "head")
    extra = with_conversions.time_by_component["linear"].prefill_s - without.time_by_component["linear"].prefill_s
    assert extra == pytest.approx(converted, rel=0.02)


def test_a_fused_decode_step_costs_its_bytes_at_the_measured_rates():
    """SmolLM2 (hidden 576, MLP 1536) all int8 on a CPU with the fused step: each linear's bytes at the
    int8 rate (one measured width: flat), the probe's fixed seconds per block and step, 4 eager ops."""
    inv = inventory("smollm2-135m")
    target = fused_cpu()
    int8 = QuantFormat(dtype="int8")
    choices = [LayerChoice(name=w.module, block=w.block, format=int8, device="cpu0", compute_device="cpu0")
               for w in inv.linear_layers()]
    parts = breakdown(inv, target, WORKLOAD, choices)
    linear_bytes = sum(math.ceil(w.shape[0] * w.shape[1] + 2 * w.shape[0]) for w in inv.linear_layers())
    embedding_row = parts.time_by_component["linear"].token_s - linear_bytes / 16e9
    assert 0 <= embedding_row < 1e-6  # one row of the fp32 embedding, at the roofline
    overhead = parts.time_by_component["overhead"].token_s
    assert overhead == pytest.approx(30 * 5e-6 + 3e-6 + 4 * 4e-6)
    # one layer nf4: the executor runs every step eagerly, and so does the prediction
    eager = breakdown(inv, target, WORKLOAD, choices[:-1] + [choices[-1].model_copy(
        update={"format": QuantFormat(dtype="nf4", group=64)})])
    assert eager.time_by_component["overhead"].token_s == pytest.approx((30 * 55 + 27) * 4e-6)
    # nor with an int8 KV cache, a batch of 2, or on a device the probe gave no fused figures
    assert breakdown(inv, target, WORKLOAD, choices, kv_format=int8).time_by_component["overhead"].token_s > 1e-3
    batch2 = WORKLOAD.model_copy(update={"batch": 2})
    assert breakdown(inv, target, batch2, choices).time_by_component["overhead"].token_s > 1e-3
    plain = fused_cpu(fused_stream={})
    assert breakdown(inv, plain, WORKLOAD, choices).time_by_component["overhead"].token_s > 1e-3


def test_an_eager_step_costs_its_measured_overhead_and_its_bytes_at_the_steps_rates():
    """GPT-2 decodes eagerly (the Hugging Face forward): what a block and a step cost besides their
    weights is the probe's tiny-model figure where it has one (else counted ops at the probe's seconds
    per op), and a batch-1 row of an int8 or fp32 matrix streams at the fused step's measured rate
    (the eager int layers run the step's row kernels) - not at the streaming-read bandwidth."""
    inv = inventory("gpt2")
    blocks = inv.arch.layers
    int8 = QuantFormat(dtype="int8")
    choices = [LayerChoice(name=w.module, block=w.block, format=int8 if w.role != "head" else QuantFormat(),
                           device="cpu0", compute_device="cpu0") for w in inv.linear_layers()]
    counted = breakdown(inv, fused_cpu(), WORKLOAD, choices)
    decode_ops, _prefill, fixed_ops = terms.EAGER_OPS["gpt2"]
    assert counted.time_by_component["overhead"].token_s == pytest.approx((blocks * decode_ops + fixed_ops) * 4e-6)
    measured = breakdown(inv, fused_cpu(eager_steps={"gpt2": (3e-4, 5e-4)}), WORKLOAD, choices)
    assert measured.time_by_component["overhead"].token_s == pytest.approx(blocks * 3e-4 + 5e-4)
    # int8 rows at 16 GB/s, the fp32 head (tied: 50k x 768) at the fp32 rate for its width
    head = next(w for w in inv.linear_layers() if w.role == "head")
    int8_bytes = sum(w.shape[0] * w.shape[1] + 2 * w.shape[0] for w in inv.linear_layers() if w.role != "head")
    fp32_rate = fused_cpu().device("cpu0").fused_rate("fp32", head.shape[1])
    expected = int8_bytes / 16e9 + head.shape[0] * head.shape[1] * 4 / fp32_rate
    assert measured.time_by_component["linear"].token_s == pytest.approx(expected, rel=1e-3)
    # a batch of 2 runs the per-row GEMM kernels: priced at the roofline (20 GB/s here) again
    batch2 = WORKLOAD.model_copy(update={"batch": 2})
    roofline = (int8_bytes + head.shape[0] * head.shape[1] * 4) / 20e9
    assert breakdown(inv, fused_cpu(), batch2, choices).time_by_component["linear"].token_s == pytest.approx(roofline, rel=0.01)


def test_gemma3_decodes_fused_at_its_own_blocks_fixed_cost():
    """Gemma 3 runs the fused step (`LeanGemma`): its blocks' fixed cost is the probe's Gemma-shaped
    block where measured (two more barriers and six more norms than a Llama block), else the Llama
    block's; its prefill's elementwise ops are its own count (`time.ELEMENTWISE_VALUES`: o_proj's output
    is normed, added to the residual and normed again, 2 + 3 + 2 values)."""
    inv = inventory("gemma-3-270m")
    blocks = inv.arch.layers
    int8 = QuantFormat(dtype="int8")
    choices = [LayerChoice(name=w.module, block=w.block, format=int8 if w.role != "head" else QuantFormat(),
                           device="cpu0", compute_device="cpu0") for w in inv.linear_layers()]
    step = 3e-6 + terms.FUSED_EAGER_OPS * 4e-6
    llama_like = breakdown(inv, fused_cpu(), WORKLOAD, choices)
    assert llama_like.time_by_component["overhead"].token_s == pytest.approx(blocks * 5e-6 + step)
    own = breakdown(inv, fused_cpu(fused_layout_block_s={"gemma3_text": 9e-6}), WORKLOAD, choices)
    assert own.time_by_component["overhead"].token_s == pytest.approx(blocks * 9e-6 + step)
    device, rows = fused_cpu().device("cpu0"), WORKLOAD.batch * WORKLOAD.context
    assert terms.elementwise_prefill_s("attn_o", (inv.arch.hidden, 1024), inv.arch, device, WORKLOAD) == \
        pytest.approx(rows * 7 * inv.arch.hidden * 4 / device.elementwise_Bps(rows))


def test_a_prefill_runs_its_matmuls_at_the_probes_rate_for_its_rows():
    """SmolLM2 as loaded (fp32) on a CPU whose probe measured the float matmul at 50 GFLOP/s over 16
    rows and 100 over 1024: each linear's prefill is its FLOPs at the rate for the prompt's 256 rows
    (log-interpolated), so halving the measured rates doubles every matmul's time; the head multiplies
    the last position only (the executor slices it before the head)."""
    inv = inventory("smollm2-135m")
    table = ((16, 5e10), (1024, 1e11))
    target = fused_cpu(bandwidth_Bps=1e15, prefill_matmul=table)  # memory never the bound here
    halved = fused_cpu(bandwidth_Bps=1e15, prefill_matmul=tuple((rows, rate / 2) for rows, rate in table))
    device = target.device("cpu0")
    assert device.prefill_matmul_rate("fp32", 256) == pytest.approx(5e10 + 5e10 * 4 / 6)
    for weight in inv.linear_layers():
        choice = LayerChoice(name=weight.module, block=weight.block, device="cpu0", compute_device="cpu0")
        rows = 1 if weight.role == "head" else 256
        matmul = time.linear_flops(rows, weight.shape) / device.prefill_matmul_rate("fp32", rows)
        elementwise = terms.elementwise_prefill_s(weight.role, weight.shape, inv.arch, device, WORKLOAD)
        assert terms.layer_terms(weight, choice, inv, target, WORKLOAD).prefill_s == pytest.approx(
            matmul + elementwise, rel=1e-6)
        assert terms.layer_terms(weight, choice, inv, halved, WORKLOAD).prefill_s == pytest.approx(
            2 * matmul + elementwise, rel=1e-6)


def test_an_int_layers_prefill_adds_its_dequantization_and_a_block_its_elementwise_bytes():
    """int4 (group 32) layers run a 256-token prefill as the native kernels do: the transient float32
    matrix written at the probe's dequantization rate, then the float matmul at the measured rate.
    A block's elementwise ops move `time.lean_elementwise_values` values a token at the measured
    bytes/s (attributed to the linears whose outputs they consume); attention runs at its own rate."""
    inv = inventory("smollm2-135m")
    arch = inv.arch
    target = fused_cpu(bandwidth_Bps=1e15, prefill_matmul=((256, 1e11),), dequant_Bps={"int4": 2e10},
                       prefill_elementwise=((256, 1e10),), prefill_attention=((256, 5e10),))
    device = target.device("cpu0")
    int4 = QuantFormat(dtype="int4", group=32)
    block = [w for w in inv.linear_layers() if w.block == 0]
    for weight in block:
        choice = LayerChoice(name=weight.module, block=0, format=int4, device="cpu0", compute_device="cpu0")
        elementwise = terms.elementwise_prefill_s(weight.role, weight.shape, arch, device, WORKLOAD)
        expected = time.linear_flops(256, weight.shape) / 1e11 + weight.numel * 4 / 2e10 + elementwise
        assert terms.layer_terms(weight, choice, inv, target, WORKLOAD).prefill_s == pytest.approx(expected, rel=1e-6)
    values = time.lean_elementwise_values(arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim,
                                          arch.intermediate)
    assert sum(terms.elementwise_prefill_s(w.role, w.shape, arch, device, WORKLOAD) for w in block) == \
        pytest.approx(256 * values * 4 / 1e10)
    attention = terms.attention_terms(arch, "cpu0", target, WORKLOAD, QuantFormat())
    assert attention.prefill_s == pytest.approx(time.attention_flops(1, arch.heads, arch.head_dim, 256, 256) / 5e10)
    # without a measured dequantization rate (another machine's figures, a written compute) it is free
    plain = fused_cpu(bandwidth_Bps=1e15, prefill_matmul=((256, 1e11),))
    weight = block[0]
    choice = LayerChoice(name=weight.module, block=0, format=int4, device="cpu0", compute_device="cpu0")
    assert terms.layer_terms(weight, choice, inv, plain, WORKLOAD).prefill_s == pytest.approx(
        time.linear_flops(256, weight.shape) / 1e11 + terms.elementwise_prefill_s(
            weight.role, weight.shape, arch, plain.device("cpu0"), WORKLOAD), rel=1e-6)
