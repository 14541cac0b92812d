"""The collectives of a training step (`cost.train_collectives`) on measured gloo figures
(`hardware.probe_collective`): the cost grows with bytes and ranks, ZeRO-3 moves more than ZeRO-0,
DDP's buckets are DDP's, and one real 2-rank gloo probe (small sizes) fits, caches and is read back."""
from __future__ import annotations

from pathlib import Path

import pytest

from lwdsl.cost.train_collectives import ddp_buckets, fsdp_units, step_collectives
from lwdsl.cost.training import step_figures
from lwdsl.errors import LwdslError, Span
from lwdsl.hardware.probe_collective import fit, local_collectives, measure_collectives, rates_of, record_kind
from lwdsl.hardware.records import CallRate, CollectiveRates
from lwdsl.inventory import load_inventory
from lwdsl.parse import parse_text

PLAN = """plan t {{
  model "arch:{arch}"
  target {{
    device r0 cpu {{ memory 64 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
    device r1 cpu {{ memory 64 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
    device r2 cpu {{ memory 64 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
    device r3 cpu {{ memory 64 GiB; bandwidth 20 GB/s; compute 100 GFLOPS }}
  }}
  workload training {{ batch 4; sequence 64; tokens 1024; optimizer adamw; precision fp32 }}
}}
"""


def _inventory(arch: str):
    plan = parse_text(PLAN.format(arch=arch))
    return plan, load_inventory(plan.model, Path("."))


def _rates(scale: float = 1.0, ranks: int = 2) -> CollectiveRates:
    """The figures measured on the session's 2-core machine (0.67 / 0.51 / 1.42 / 1.94 GB/s, ~1 ms), scaled."""
    return CollectiveRates(ranks=ranks, threads=1, all_gather=CallRate(Bps=0.67e9 * scale, latency_s=1e-3),
                           reduce_scatter=CallRate(Bps=0.51e9 * scale, latency_s=1e-3),
                           all_reduce=CallRate(Bps=1.42e9 * scale, latency_s=1e-3),
                           clone=CallRate(Bps=1.94e9 * scale))


def test_ddp_buckets_follow_ddp_caps():
    mib = 1 << 20
    # reverse order: 0.5 + 0.75 MiB closes the 1 MiB first bucket, then 25 MiB buckets
    assert ddp_buckets([30 * mib, 10 * mib, 20 * mib, 3 * mib // 4, mib // 2]) == [5 * mib // 4, 30 * mib, 30 * mib]
    assert ddp_buckets([]) == []
    assert sum(ddp_buckets([7, 9, 11])) == 27


def test_cost_grows_with_bytes_and_ranks_and_stage():
    _, small = _inventory("smollm2-135m")
    _, large = _inventory("llama-2-7b")
    for stage in range(4):
        assert step_collectives(large, _rates(), stage).total_s > step_collectives(small, _rates(), stage).total_s
        assert step_collectives(small, _rates(0.5), stage).total_s > step_collectives(small, _rates(), stage).total_s
        accumulated = step_collectives(small, _rates(), stage, accumulate=2).total_s
        assert accumulated >= step_collectives(small, _rates(), stage).total_s
    seconds = [step_collectives(small, _rates(), stage).total_s for stage in range(4)]
    assert seconds[3] > seconds[2] > seconds[0] and seconds[1] > seconds[0]
    # FSDP2 units: one a block plus the root, together every trained parameter once
    units = fsdp_units(small)
    assert len(units) == small.arch.layers + 1 and sum(units) == 4 * small.params()
    for n in (5e5, 5e6, 5e7):
        assert _rates().all_gather.seconds(2 * n) > _rates().all_gather.seconds(n)


def test_step_time_uses_the_measured_figures_and_grows_with_ranks():
    from lwdsl.hardware import resolve_target

    plan, inventory = _inventory("smollm2-135m")
    target = resolve_target(plan.target)
    # no measured collectives (catalog-like devices): ring collectives at the shared memory bandwidth
    by_ranks = [step_figures(inventory, target, plan.workload, 3, n).collective_s for n in (1, 2, 4)]
    assert by_ranks[0] == 0.0 and 0 < by_ranks[1] < by_ranks[2]
    # marked local, with measured figures for 2 ranks: they price the collectives, added to compute
    local = target.model_copy(update={
        "devices": {k: v.model_copy(update={"catalog": "local"}) for k, v in target.devices.items()},
        "collectives": {2: _rates()}})
    for stage in (0, 3):
        figures = step_figures(inventory, local, plan.workload, stage, 2)
        assert figures.collective_s == pytest.approx(step_collectives(inventory, _rates(), stage).total_s)
        assert figures.step_s == pytest.approx(figures.compute_s + figures.optimizer_s + figures.collective_s)
    assert step_figures(inventory, local, plan.workload, 3, 2).step_s > step_figures(inventory, local, plan.workload, 0, 2).step_s


def test_fit_recovers_rate_and_start_up():
    points = {b: 2e-3 + b / 1e9 for b in (1 << 20, 4 << 20, 16 << 20)}
    fitted = fit(points)
    assert fitted["Bps"] == pytest.approx(1e9) and fitted["latency_s"] == pytest.approx(2e-3)
    noisy = fit({1 << 20: 1e-3, 4 << 20: 1e-3, 16 << 20: 16e-3})  # negative intercept: through the origin
    assert noisy["latency_s"] == 0.0 and noisy["Bps"] > 0


def test_real_two_rank_gloo_probe_is_cached_and_read_back(tmp_path, monkeypatch):
    record = measure_collectives(2, threads=1, sizes=(64 << 10, 256 << 10), repeats=2)
    assert record["kind"] == record_kind(2, 1) == "collective:gloo:2x1"
    for op in ("all_gather", "reduce_scatter", "all_reduce", "clone"):
        assert set(record["points"][op]) == {str(64 << 10), str(256 << 10)}
        assert all(s > 0 for s in record["points"][op].values())
        assert record["fit"][op]["Bps"] > 0 and record["fit"][op]["latency_s"] >= 0
    assert len(record["train_matmul"]) == 3 and all(v > 0 for v in record["train_matmul"].values())
    _, inventory = _inventory("smollm2-135m")
    rates = rates_of(record)
    assert rates.train_matmul_rate(64) > 0
    assert step_collectives(inventory, rates, 3).total_s > step_collectives(inventory, rates, 0).total_s

    from lwdsl.hardware import probe, probe_collective

    cache = tmp_path / "probe.json"
    probe.write_cache(record, cache)
    monkeypatch.setattr(probe_collective, "measure_collectives", lambda *a, **k: pytest.fail("measured again"))
    assert local_collectives(2, threads=1, cache_file=cache)["fit"] == record["fit"]
    with pytest.raises(LwdslError) as missing:
        local_collectives(4, threads=1, cache_file=cache, run_probe=False, span=Span(line=3, column=3))
    assert missing.value.diagnostics[0].code == "E405" and missing.value.diagnostics[0].span.line == 3


def test_too_few_ranks_is_bad_input(capsys):
    from lwdsl.cli import main

    with pytest.raises(LwdslError):
        measure_collectives(1)
    assert main(["probe", "--ranks", "1"]) == 2
    assert "at least 2 ranks" in capsys.readouterr().err
