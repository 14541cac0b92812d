"""`lwdsl.cost.gpu`: what the GPU executor costs (SDPA, static cache, graphed decode, kernel families,
NCCL), and that a CPU keeps its own terms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lwdsl.ast import InferenceWorkload
from lwdsl.cost import gpu, memory, terms
from lwdsl.hardware import resolve_target
from lwdsl.hardware.records import DeviceSpec, LinkSpec
from lwdsl.inventory.configs import arch_from_config
from lwdsl.parse import parse_text
from lwdsl.solution import QuantFormat

ROOT = Path(__file__).resolve().parents[1]
ARCHS = json.loads((ROOT / "lwdsl" / "data" / "architectures.json").read_text())


def arch(name: str):
    return arch_from_config(ARCHS[name]["config"])


def target(catalog: str, n: int = 1, kind: str = "gpu"):
    devices = "\n".join(f'device g{i} {kind} "{catalog}"' for i in range(n))
    links = "\n".join(f"link g{a} <-> g{b} 450 GB/s latency 2 us" for a in range(n) for b in range(a + 1, n))
    plan = parse_text(f'plan t {{ model "arch:llama-3.1-8b"\n target {{\n{devices}\n{links}\n}} }}')
    return resolve_target(plan.target)


def device(catalog: str, kind: str = "gpu") -> DeviceSpec:
    return target(catalog, kind=kind).device("g0")


def test_every_gpu_runs_the_graphed_executor_and_a_cpu_does_not():
    assert gpu.graphed(device("h100-sxm")) and gpu.graphed(device("rtx-4090"))
    assert not gpu.graphed(device("raspberry-pi-5", "cpu"))
    assert gpu.activation_of(device("h100-sxm"), "fp32") == "bf16"
    assert gpu.activation_of(device("raspberry-pi-5", "cpu"), "fp32") == "fp32"


def test_kernel_families_follow_the_card():
    assert gpu.kernel_family(QuantFormat(dtype="fp8"), device("h100-sxm")) == "fp8_scaled_mm"
    assert gpu.kernel_family(QuantFormat(dtype="fp8"), device("a100-80gb")) == "dequantize"  # no fp8 units
    assert gpu.kernel_family(QuantFormat(dtype="int4", group=128), device("a100-80gb")) == "int4_tinygemm"
    assert gpu.held_format(QuantFormat()) == QuantFormat(dtype="bf16")
    assert gpu.half_dtype(device("t4")) == "fp16" and gpu.half_dtype(device("a100-80gb")) == "bf16"
    for family in gpu.figures()["families"].values():  # fractions of a peak, each with its source
        assert 0 < family["bandwidth"] <= 1 and 0 < family["compute"] <= 1 and family["source"]


def test_decode_is_bound_by_weight_reads_and_prefill_by_compute():
    h100 = device("h100-sxm")
    shape = (14336, 4096)
    nbytes = shape[0] * shape[1] * 2
    one = gpu.linear_s(shape, nbytes, QuantFormat(dtype="bf16"), 1, h100)
    eight = gpu.linear_s(shape, nbytes, QuantFormat(dtype="bf16"), 8, h100)
    assert one == pytest.approx(eight, rel=0.01)  # small batches cost the weight read
    assert one == pytest.approx(nbytes / (h100.bandwidth_Bps * 0.80) + 2e-6, rel=0.01)
    prefill = gpu.linear_s(shape, nbytes, QuantFormat(dtype="bf16"), 4096, h100, decode=False)
    flops = 2 * 4096 * shape[0] * shape[1]
    assert prefill == pytest.approx(flops / (989.5e12 * 0.70 * 4096 / (4096 + 64)), rel=0.01)


def test_attention_makes_no_n2_scores_and_shards_by_degree():
    llama = arch("llama-3.1-70b")
    whole = gpu.activation_bytes(llama, 16, 4096, 512, 1)
    assert whole < memory.activation_bytes(llama, 16, 4096, 512, "bf16") / 10  # eager: n² scores
    assert gpu.activation_bytes(llama, 16, 4096, 512, 8) <= gpu.figures()["prefill_workspace_bytes"] + 4 * 16 * llama.vocab
    # per shard: the chunk holds more positions, so a prefill reads the weights fewer times
    assert gpu.prefill_chunks(llama, 16, 4096, 512, 8) < gpu.prefill_chunks(llama, 16, 4096, 512, 1)
    assert gpu.prefill_chunk_tokens(llama, 1, 100, 0, 1) == 100  # a short prompt goes whole


def test_nccl_latency_dominates_a_decode_all_reduce():
    link = LinkSpec(a="a", b="b", rate_Bps=450e9, latency_s=1e-6)
    small = gpu.allreduce_s(8192 * 2, 8, link)
    assert small == pytest.approx(5e-6 + 6e-6 + 2 * 7 / 8 * 8192 * 2 / 450e9)
    assert gpu.allreduce_s(8192 * 2, 1, link) == 0.0
    assert gpu.allreduce_s(8192 * 2, 2, None) == float("inf")


def test_a_graphed_step_pays_one_launch_not_eager_ops():
    h100 = target("h100-sxm")
    llama = arch("llama-3.1-8b")
    per_block = terms.overhead_terms(llama, "g0", h100)
    fixed = terms.overhead_terms(llama, "g0", h100, per_block=False)
    step = llama.layers * per_block.token_s + fixed.token_s
    assert step < 1.5e-3  # eager: 55 ops · 5 us · 32 blocks = 8.8 ms
    assert fixed.token_s >= gpu.figures()["graph_launch_s"]


def test_the_static_cache_is_preallocated_in_half_precision():
    h100 = target("h100-sxm")
    llama = arch("llama-3.1-8b")
    workload = InferenceWorkload(batch=4, context=1000, generate=24)
    t = terms.attention_terms(llama, "g0", h100, workload, QuantFormat())
    assert t.weight_bytes == 4 * 1024 * memory.kv_bytes_per_token_layer(llama, QuantFormat(dtype="bf16"))
    assert gpu.cache_positions(1025) == 1088  # rounded up to 64 positions, as the executor allocates


def test_a_cpu_keeps_its_eager_terms():
    pi = target("raspberry-pi-5", kind="cpu")
    llama = arch("llama-3.1-8b")
    t = terms.overhead_terms(llama, "g0", pi)
    decode_ops = terms.EAGER_OPS["llama"][0]
    assert t.token_s == pytest.approx(decode_ops * pi.device("g0").op_overhead_s)
