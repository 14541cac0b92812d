"""Hardware: the catalog's figures, resolving a target (overrides, links, errors), the local probe."""
from __future__ import annotations

import json

import pytest

from lwdsl import ast
from lwdsl.errors import LwdslError
from lwdsl.hardware import hardware_entry, hardware_ids, resolve_target
from lwdsl.hardware.catalog import DTYPES
from lwdsl.hardware.probe import local_figures, measure, runtime_threads, write_cache
from lwdsl.hardware.probe_native import PREFILL_ROWS

REQUIRED = ["rtx-3090", "rtx-4060", "rtx-4090", "t4", "l4", "a100-40gb", "a100-80gb", "h100-pcie",
            "h100-sxm", "m2-max", "raspberry-pi-5", "local"]
GiB = 1 << 30


def q(value: float, kind: str, integer: bool = False) -> ast.Quantity:
    return ast.Quantity(value=value, kind=kind, text=str(value), integer=integer)


def test_catalog_has_every_required_id_with_sources():
    assert set(REQUIRED) <= set(hardware_ids())
    for hardware_id in hardware_ids():
        if hardware_id == "local":
            continue
        entry = hardware_entry(hardware_id)
        assert entry["source"] and entry["memory_bytes"] > 0 and entry["bandwidth_Bps"] > 0
        if entry["kind"] == "disk":  # a disk stores and never computes
            assert "rates" not in entry
            continue
        assert set(entry["rates"]) == set(DTYPES)
        assert entry["rates"]["fp16"] >= entry["rates"]["fp32"] or hardware_id == "m2-max"


def test_catalog_figures_match_spec_sheets():
    assert hardware_entry("h100-sxm")["bandwidth_Bps"] == 3.35e12
    assert hardware_entry("h100-sxm")["rates"]["bf16"] == 989.5e12
    assert hardware_entry("rtx-4090")["memory_bytes"] == 24 * GiB
    assert hardware_entry("a100-80gb")["rates"]["int8"] == 624e12


def test_resolve_catalog_overrides_and_links():
    target = ast.Target(
        devices=(
            ast.Device(name="gpu0", kind="gpu", catalog="rtx-4090", memory=q(20 * GiB, "size")),
            ast.Device(name="cpu0", kind="cpu", memory=q(64 * GiB, "size"), bandwidth=q(50e9, "bandwidth"),
                       compute=q(1e12, "compute"), price=q(0.1, "money")),
            ast.Device(name="ssd", kind="disk", memory=q(1e12, "size"), bandwidth=q(2e9, "bandwidth")),
        ),
        links=(ast.Link(a="gpu0", b="cpu0", rate=q(25e9, "bandwidth"), latency=q(5e-6, "time")),),
    )
    resolved = resolve_target(target)
    gpu, cpu, ssd = (resolved.device(n) for n in ("gpu0", "cpu0", "ssd"))
    assert gpu.memory_bytes == 20 * GiB and gpu.bandwidth_Bps == 1008e9 and gpu.price_per_h == 0.40
    assert cpu.rate("fp32") == cpu.rate("bf16") == cpu.rate("int8") == 1e12 and cpu.price_per_h == 0.1
    assert not ssd.computes and ssd.rates == {}
    assert resolved.compute_devices() == ["gpu0", "cpu0"]
    assert resolved.link("cpu0", "gpu0") == resolved.link("gpu0", "cpu0")
    assert resolved.link("gpu0", "cpu0").latency_s == 5e-6 and resolved.link("gpu0", "ssd") is None


def test_integer_compute_override_sets_integer_rates_only():
    device = ast.Device(name="g", kind="gpu", catalog="t4", compute=q(100e12, "compute", integer=True))
    spec = resolve_target(ast.Target(devices=(device,))).device("g")
    assert spec.rate("int8") == spec.rate("int4") == 100e12 and spec.rate("fp16") == 65e12


def test_all_problems_reported_at_once():
    target = ast.Target(
        devices=(ast.Device(name="a", kind="gpu", catalog="rtx-9999"), ast.Device(name="b", kind="cpu")),
        links=(ast.Link(a="a", b="zzz", rate=q(1e9, "bandwidth")),),
    )
    with pytest.raises(LwdslError) as error:
        resolve_target(target)
    assert [d.code for d in error.value.diagnostics] == ["E401", "E402", "E403"]


def test_local_reads_the_cache_and_refuses_to_guess(tmp_path):
    cache = tmp_path / "probe.json"
    local = ast.Target(devices=(ast.Device(name="me", kind="cpu", catalog="local"),))
    with pytest.raises(LwdslError) as error:
        resolve_target(local, probe_cache=cache, run_probe=False)
    assert error.value.diagnostics[0].code == "E405"
    cache.write_text(json.dumps({"cpu": {"kind": "cpu", "memory_bytes": 8 * GiB, "bandwidth_Bps": 1e10,
                                         "rates": {"fp32": 1e11}, "source": "test"}}))
    spec = resolve_target(local, probe_cache=cache, run_probe=False).device("me")
    assert spec.bandwidth_Bps == 1e10 and spec.rate("bf16") == 1e11 and spec.source == "test"
    assert spec.runtime_bytes == 0  # a cache from before the runtime figure: counted 0
    cache.write_text(json.dumps({"cpu": {"kind": "cpu", "memory_bytes": 8 * GiB, "bandwidth_Bps": 1e10,
                                         "rates": {"fp32": 1e11}, "runtime_bytes": 150 * 2**20}}))
    assert resolve_target(local, probe_cache=cache, run_probe=False).device("me").runtime_bytes == 150 * 2**20


def test_probe_measures_this_machine(tmp_path):
    import torch

    torch.set_num_threads(1)  # as the suite's model fixtures run: the probe measures at a fresh process's threads
    figures = measure("cpu", budget_s=0.05)
    assert figures["threads"] == runtime_threads() and torch.get_num_threads() == 1
    assert 1e8 < figures["bandwidth_Bps"] < 1e13 and 1e8 < figures["copy_Bps"] < 1e13
    assert 1e8 < figures["rates"]["fp32"] < 1e14 and figures["memory_bytes"] > GiB
    # transformers + lwdsl's executor above the torch floor: tens to hundreds of MiB, never nothing
    assert 10 * 2**20 < figures["runtime_bytes"] < 2 * GiB
    efficiency = [figures["row_efficiency"][row] for row in sorted(figures["row_efficiency"])]
    assert efficiency == sorted(efficiency) and 0 < efficiency[0] and efficiency[-1] <= 1.0
    path = write_cache(figures, tmp_path / "p.json")
    assert local_figures("cpu", cache_file=path, run_probe=False)["bandwidth_Bps"] == figures["bandwidth_Bps"]
    # what a prefill runs, at every measured prompt length (where the native int kernels are built)
    from lwdsl.apply import native
    from lwdsl.hardware import probe

    prefill = figures["prefill"]
    assert (prefill is None) == (not native.available())
    if prefill is None:
        return
    # the fused step within and beyond the caches, and its rate by working set (what the caches keep)
    from lwdsl.hardware.probe_native import WORKING_SET_BYTES

    fused = figures["fused"]
    for key in ("stream_Bps", "stream_cached_Bps"):
        assert set(fused[key]) == {"fp32", "int8", "int4", "int8g"}
        assert all(1e8 < rate < 1e13 for table in fused[key].values() for rate in table.values())
    assert sorted(fused["working_set_Bps"]) == list(WORKING_SET_BYTES)
    assert all(1e8 < rate < 1e13 for rate in fused["working_set_Bps"].values())
    for table in ("matmul_flops", "attention_flops", "elementwise_Bps"):
        assert sorted(prefill[table]) == list(PREFILL_ROWS) and all(1e7 < v < 1e14 for v in prefill[table].values())
    assert set(prefill["dequant_Bps"]) == {"int4", "int8"} and all(v > 1e8 for v in prefill["dequant_Bps"].values())
    # the int layers' matmul timed in float32 and bfloat16; the faster by rows is what runs
    assert sorted(prefill["int_dtype"]) == list(PREFILL_ROWS)
    for rows, chosen in prefill["int_dtype"].items():
        rates = prefill["int_matmul_flops_by_dtype"][rows]
        assert set(rates) == {"fp32", "bf16"} and prefill["int_matmul_flops"][rows] >= rates[chosen] * 0.999
        # a bf16 matmul's activation conversions are timed apart (priced by bytes); none for float32
        assert (prefill["int_convert_s_per_byte"][rows] > 0) == (chosen == "bf16")
    # the int matmul of the wider block too, by the same rows
    assert sorted(prefill["int_matmul_flops_wide"]) == list(PREFILL_ROWS) and prefill["wide_hidden"] > prefill["hidden"]
    # the attention core the same way; its float32 rate stays apart (a training step's attention)
    for rows, chosen in prefill["attention_dtype"].items():
        rates = prefill["attention_flops_by_dtype"][rows]
        assert set(rates) == {"fp32", "bf16"} and prefill["attention_run_flops"][rows] == rates[chosen]
        assert prefill["attention_flops"][rows] == rates["fp32"]
    assert figures["cpu"] == probe.cpu_identity() and figures["native_isa"] == native.loaded_level()
    # the eager step of every layout decoded eagerly, measured on a tiny model of it: a block costs
    # tens of microseconds or more (its norms, rotations, cache appends, ~100 ops), never nothing
    from lwdsl.runtime.generate import UNFUSED_LAYOUTS

    assert set(figures["eager"]) == set(UNFUSED_LAYOUTS)
    assert all(1e-5 < f["block_s"] < 1e-2 and 0 <= f["step_s"] < 1e-1 for f in figures["eager"].values())
    local = ast.Target(devices=(ast.Device(name="me", kind="cpu", catalog="local"),))
    resolved = resolve_target(local, probe_cache=path, run_probe=False).device("me")
    assert resolved.eager_steps["gpt2"] == (figures["eager"]["gpt2"]["block_s"], figures["eager"]["gpt2"]["step_s"])
    # Gemma 3's fused block, measured on its own synthetic block: more than a Llama block's
    assert resolved.fused_layout_block_s["gemma3_text"] == fused["layout_block_s"]["gemma3_text"] > 0


def test_a_layout_transformers_cannot_build_is_not_measured_eagerly():
    import torch

    from lwdsl.hardware.probe_eager import eager_step

    assert eager_step(torch, "no-such-layout") is None


def test_a_probe_of_other_native_kernels_is_measured_again(tmp_path, monkeypatch):
    """The fused step's rates belong to the kernels measured: after a change to the native sources
    the cached record is stale (as an older record version is), and only then."""
    from lwdsl.hardware import probe

    record = {"version": probe.VERSION, "kind": "cpu", "native": probe._native_build(), "bandwidth_Bps": 1e10,
              "cpu": probe.cpu_identity()}
    path = write_cache(record, tmp_path / "p.json")
    monkeypatch.setattr(probe, "measure", lambda kind: {**record, "bandwidth_Bps": 2e10})
    assert local_figures("cpu", cache_file=path)["bandwidth_Bps"] == 1e10  # current: read, not measured
    write_cache({**record, "native": "0123456789abcdef"}, path)
    assert local_figures("cpu", cache_file=path)["bandwidth_Bps"] == 2e10  # other kernels: measured again
    write_cache({**record, "version": probe.VERSION - 1}, path)
    assert local_figures("cpu", cache_file=path)["bandwidth_Bps"] == 2e10


@pytest.mark.parametrize("other", [{"model": "Some Other CPU"}, {"cores": 1024}, {"isa": ["avx2", "fma"]},
                                   {"amx": "the other"}])
def test_a_probe_of_another_cpu_is_measured_again(tmp_path, monkeypatch, other):
    """A cache carried to another machine (a copied home folder, a migrated VM, an image) is not
    trusted: the CPU's model, ISA flags, core count and AMX grant are part of the record's key."""
    from lwdsl.hardware import probe

    here = probe.cpu_identity()
    assert here["model"] and here["cores"] >= 1 and isinstance(here["isa"], list)
    if "amx" in other:  # the grant this machine does not have (an AMX machine is not the same as one without)
        other = {"amx": not here["amx"]}
    record = {"version": probe.VERSION, "kind": "cpu", "native": probe._native_build(), "bandwidth_Bps": 1e10,
              "cpu": here, "prefill": {"int_dtype": {"64": "bf16"}}}
    path = write_cache(record, tmp_path / "p.json")
    monkeypatch.setattr(probe, "measure", lambda kind: {**record, "bandwidth_Bps": 2e10})
    assert local_figures("cpu", cache_file=path)["bandwidth_Bps"] == 1e10
    assert probe.cached_prefill_dtype(path) == {64: "bf16"}
    write_cache({**record, "cpu": {**here, **other}}, path)
    assert probe.cached_prefill_dtype(path) == {}  # another CPU's choice is not this one's
    assert local_figures("cpu", cache_file=path)["bandwidth_Bps"] == 2e10


def test_probe_show_names_the_cpu_it_measured(tmp_path, monkeypatch, capsys):
    from lwdsl.cli import main
    from lwdsl.hardware import probe

    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path))
    assert main(["probe", "--show"]) == 0
    assert "nothing cached" in capsys.readouterr().out
    write_cache({"version": probe.VERSION, "kind": "cpu", "name": "x86_64", "memory_bytes": 16 * GiB,
                 "bandwidth_Bps": 2.5e10, "copy_Bps": 2e10, "rates": {"fp32": 1e11}, "op_overhead_s": 4e-6,
                 "threads": 2, "measured_at": "2026-01-01T00:00:00+00:00", "source": "measured",
                 "native": probe._native_build(), "native_isa": "avx2",
                 "cpu": {**probe.cpu_identity(), "model": "Elsewhere CPU"}})
    assert main(["probe", "--show"]) == 0
    out = capsys.readouterr().out
    assert "Elsewhere CPU" in out and "another CPU" in out and "avx2" in out


def test_isa_levels_follow_the_cpu_flags_and_the_switch():
    from lwdsl.apply import native

    avx2 = {"avx2", "fma", "f16c"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    assert native.level(set(), forced="") is None  # no AVX2 (or not x86): torch's kernels
    assert native.level({"avx2", "fma"}, forced="") is None  # no F16C
    assert native.level(avx2, forced="") == "avx2"
    assert native.level(avx512 - {"avx512_vnni"}, forced="") == "avx2"
    assert native.level(avx512, forced="") == "avx512"
    assert native.level(avx512, forced="avx2") == "avx2"  # LWDSL_NATIVE_ISA=avx2
    assert native.level(avx2, forced="avx512") == "avx2"  # never above what the CPU has
    assert native.library_path("avx2") != native.library_path("avx512")


def test_probe_command_prints_the_cached_device_block(tmp_path, monkeypatch, capsys):
    from lwdsl.cli import main

    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path))
    write_cache({"kind": "cpu", "name": "x86_64", "memory_bytes": 16 * GiB, "bandwidth_Bps": 2.5e10,
                 "copy_Bps": 2e10, "rates": {"fp32": 1e11, "int8": 4e11}, "op_overhead_s": 4e-6, "threads": 1,
                 "measured_at": "2026-01-01T00:00:00+00:00", "source": "measured"})
    assert (tmp_path / "probe.json").is_file()
    assert main(["probe", "--cached"]) == 0
    out = capsys.readouterr().out
    assert 'device local0 cpu "local" {' in out and "bandwidth 25.0 GB/s" in out and "compute 100.0 GFLOPS" in out
    assert main(["probe", "--cached", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["op_overhead_s"] == 4e-6


def test_row_efficiency_interpolates_in_log_row_length(tmp_path):
    cache = tmp_path / "probe.json"
    cache.write_text(json.dumps({"cpu": {"kind": "cpu", "memory_bytes": GiB, "bandwidth_Bps": 1e10,
                                         "rates": {"fp32": 1e11}, "row_efficiency": {"1024": 0.5, "4096": 0.9}}}))
    local = ast.Target(devices=(ast.Device(name="me", kind="cpu", catalog="local"),))
    spec = resolve_target(local, probe_cache=cache, run_probe=False).device("me")
    assert spec.row_efficiency == ((1024, 0.5), (4096, 0.9))
    assert spec.stream_efficiency(512) == 0.5 and spec.stream_efficiency(1 << 20) == 0.9
    assert spec.stream_efficiency(2048) == pytest.approx(0.7)  # halfway in log2
    overridden = ast.Target(devices=(ast.Device(name="me", kind="cpu", catalog="local",
                                                bandwidth=q(5e9, "bandwidth")),))
    assert resolve_target(overridden, probe_cache=cache, run_probe=False).device("me").stream_efficiency(512) == 1.0


def test_the_probes_prefill_figures_resolve_unless_the_plan_writes_its_own(tmp_path):
    """The probe's prefill tables (JSON keys are strings) become sorted (rows, figure) pairs; a written
    compute rate drops the matmul and attention rates and the dequantization speed, a written bandwidth
    the elementwise bytes/s: the user's figure then prices them."""
    cache = tmp_path / "probe.json"
    prefill = {"matmul_flops": {"256": 1.5e11, "16": 5e10}, "attention_flops": {"256": 1e11},
               "elementwise_Bps": {"256": 2e10}, "dequant_Bps": {"int4": 2e10, "int8": 1.5e10}}
    cache.write_text(json.dumps({"cpu": {"kind": "cpu", "memory_bytes": GiB, "bandwidth_Bps": 1e10,
                                         "rates": {"fp32": 2e11}, "prefill": prefill}}))
    local = ast.Target(devices=(ast.Device(name="me", kind="cpu", catalog="local"),))
    spec = resolve_target(local, probe_cache=cache, run_probe=False).device("me")
    assert spec.prefill_matmul == ((16, 5e10), (256, 1.5e11)) and spec.dequant_Bps == {"int4": 2e10, "int8": 1.5e10}
    assert spec.prefill_matmul_rate("fp32", 64) == pytest.approx(1e11)  # halfway in log2(rows)
    assert spec.prefill_matmul_rate("bf16", 64) == 2e11  # measured for fp32 only: the peak otherwise
    assert spec.prefill_attention_rate("fp32", 4096) == 1e11 and spec.elementwise_Bps(16) == 2e10
    written = ast.Target(devices=(ast.Device(name="me", kind="cpu", catalog="local", compute=q(1e12, "compute"),
                                             bandwidth=q(5e10, "bandwidth")),))
    spec = resolve_target(written, probe_cache=cache, run_probe=False).device("me")
    assert spec.prefill_matmul == () and spec.prefill_attention == () and spec.dequant_Bps == {}
    assert spec.prefill_matmul_rate("fp32", 64) == 1e12 and spec.elementwise_Bps(256) == 5e10


def test_a_local_disk_is_measured_the_way_offload_reads_it(tmp_path, monkeypatch, capsys):
    """`device ssd disk "local"`: `lwdsl probe --kind disk` times reads past the page cache of a file
    it writes under $LWDSL_CACHE (and removes), and the plan's disk gets that rate and the free space."""
    from lwdsl.cli import main
    from lwdsl.hardware import disk

    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(disk, "FILE_BYTES", 16 << 20)
    assert main(["probe", "--kind", "disk"]) == 0
    out = capsys.readouterr().out
    assert 'device disk0 disk "local" {' in out and "compute" not in out
    assert list(tmp_path.iterdir()) == [tmp_path / "probe.json"]  # the timed file is gone
    figures = json.loads((tmp_path / "probe.json").read_text())["disk"]
    assert 1e7 < figures["bandwidth_Bps"] < 1e12 and figures["memory_bytes"] > 0
    assert len(figures["passes_Bps"]) == disk.PASSES
    target = ast.Target(devices=(ast.Device(name="cpu0", kind="cpu", memory=q(8 * GiB, "size"),
                                            bandwidth=q(2e10, "bandwidth"), compute=q(1e11, "compute")),
                                 ast.Device(name="ssd", kind="disk", catalog="local")),
                        links=(ast.Link(a="cpu0", b="ssd", rate=q(8e9, "bandwidth")),))
    spec = resolve_target(target, probe_cache=tmp_path / "probe.json", run_probe=False).device("ssd")
    assert spec.bandwidth_Bps == figures["bandwidth_Bps"] and not spec.computes


def test_a_solution_records_the_prefill_dtypes_it_was_priced_with(tmp_path, monkeypatch):
    """A target priced from this CPU's probe carries the probe's prefill dtypes into the solution (the
    artifact's executor runs them); written figures price no probed prefill, and carry none."""
    from lwdsl.apply import native
    from lwdsl.hardware import probe
    from lwdsl.parse import parse_text
    from lwdsl.solve.search import priced_prefill_dtypes

    monkeypatch.setenv("LWDSL_CACHE", str(tmp_path))
    record = {"version": probe.VERSION, "kind": "cpu", "native": probe._native_build(), "cpu": probe.cpu_identity(),
              "bandwidth_Bps": 1e10, "memory_bytes": 8 << 30, "rates": {"fp32": 1e11},
              "prefill": {"int_dtype": {"64": "bf16"}, "attention_dtype": {"64": "fp32"},
                          "int_matmul_flops": {"64": 2e11}, "attention_run_flops": {"64": 5e10}}}
    probe.write_cache(record)
    plan = 'plan p {{ model "arch:llama-1b" target t {{ device cpu0 cpu {device} }} ' \
           'workload inference {{ batch 1 context 64 generate 8 }} minimize latency token }}'
    try:
        local = resolve_target(parse_text(plan.format(device='"local"')).target)
        assert priced_prefill_dtypes(local) == {"int": {64: "bf16"}, "attention": {64: "fp32"}}
        written = resolve_target(parse_text(plan.format(
            device="{ memory 8 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }")).target)
        assert priced_prefill_dtypes(written) == {}
    finally:
        native._probed_prefill_dtypes.cache_clear()
