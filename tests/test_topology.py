"""Routed traffic (issue 17): the fastest path over links and switches, a ring all-reduce priced on
the paths that join its members, impossible only when no path exists."""
from __future__ import annotations

import math

import pytest

from lwdsl.hardware.records import DeviceSpec, LinkSpec, ResolvedTarget, SwitchSpec
from lwdsl.hardware.resolve import resolve_target
from lwdsl.hardware.topology import ring_link, route_table
from lwdsl.parse import parse_text
from lwdsl.groups import expand_plan

GB = 1e9


def _device(name: str, kind: str = "gpu") -> DeviceSpec:
    return DeviceSpec(name=name, kind=kind, memory_bytes=1, bandwidth_Bps=1.0, rates={} if kind == "disk" else {"fp32": 1.0})


def _target(names, links=(), switches=(), kinds=None) -> ResolvedTarget:
    devices = {n: _device(n, (kinds or {}).get(n, "gpu")) for n in names}
    specs = [LinkSpec(a=a, b=b, rate_Bps=r * GB, latency_s=l) for a, b, r, l in links]
    keyed = {**{(s.a, s.b): s for s in specs}, **{(s.b, s.a): s for s in specs}}
    return ResolvedTarget(devices=devices, links=keyed, switches=tuple(switches),
                          routes=route_table(devices, specs, switches))


def test_the_fastest_path_runs_at_its_slowest_hop_with_latencies_summed():
    target = _target(["a", "b", "c"], [("a", "b", 100, 1e-6), ("b", "c", 50, 2e-6), ("a", "c", 10, 1e-6)])
    route = target.route("a", "c")
    assert route.hops == ("a", "b", "c") and route.rate_Bps == 50 * GB and route.latency_s == pytest.approx(3e-6)
    assert target.route("c", "a").rate_Bps == 50 * GB


def test_among_equally_wide_paths_the_lowest_latency():
    target = _target(["a", "b", "c", "d"], [("a", "b", 10, 1e-6), ("b", "d", 10, 1e-6), ("a", "c", 10, 5e-6),
                                             ("c", "d", 10, 5e-6)])
    assert target.route("a", "d").hops == ("a", "b", "d")


def test_a_disk_never_relays_and_no_path_is_no_route():
    target = _target(["g0", "ssd", "g1"], [("g0", "ssd", 10, 0), ("ssd", "g1", 10, 0)], kinds={"ssd": "disk"})
    assert target.route("g0", "g1") is None  # only through the disk: impossible, not free
    assert target.route("ssd", "g1").rate_Bps == 10 * GB
    assert ring_link(["g0", "g1"], target) is None


def test_a_switch_joins_its_members_at_its_port_rate_and_latency_once():
    switch = SwitchSpec(name="nv", devices=("g0", "g1", "g2", "g3"), rate_Bps=450 * GB, latency_s=2e-6)
    target = _target(["g0", "g1", "g2", "g3"], switches=[switch])
    route = target.route("g0", "g3")
    assert route.rate_Bps == 450 * GB and route.latency_s == pytest.approx(2e-6) and route.hops[1] == "switch:nv"
    ring = ring_link(["g0", "g1", "g2", "g3"], target)
    assert ring.rate_Bps == 450 * GB and ring.latency_s == pytest.approx(2e-6)


def test_a_chain_is_a_ring_at_the_link_rate_with_the_closing_edges_latency():
    names = [f"g{i}" for i in range(8)]
    links = [(a, b, 450, 1e-6) for a, b in zip(names, names[1:])]
    ring = ring_link(names, _target(names, links))
    assert ring.rate_Bps == 450 * GB  # each directed link carries one ring edge
    # not g0 -> ... -> g7 -> g0 (the closing edge seven hops long) but g0 g2 g4 g6 g7 g5 g3 g1: every
    # edge two hops, every directed link still one flow
    assert ring.latency_s == pytest.approx(2e-6)


def test_shared_hops_split_their_rate_and_the_best_ring_avoids_them():
    from lwdsl.hardware.topology import _graph, _ring_step

    links = [("h1", "g0", 100, 0), ("h1", "g1", 100, 0), ("h2", "g2", 100, 0), ("h2", "g3", 100, 0),
             ("h1", "h2", 100, 0)]
    target = _target(["h1", "h2", "g0", "g1", "g2", "g3"], links, kinds={"h1": "cpu", "h2": "cpu"})
    graph = _graph(target.links.values(), ())
    capacity = {(a, b): rate for a, near in graph.items() for b, (rate, _) in near.items()}
    routes = {(a, b): target.route(a, b) for a in ("g0", "g1", "g2", "g3") for b in ("g0", "g1", "g2", "g3") if a != b}
    rate, _ = _ring_step(("g0", "g2", "g1", "g3"), routes, capacity)
    assert rate == pytest.approx(50 * GB)  # h1 -> h2 carries g0->g2 and g1->g3
    assert ring_link(["g0", "g2", "g1", "g3"], target).rate_Bps == pytest.approx(100 * GB)  # g0 g1 g2 g3 does not


def test_a_switch_without_a_rate_takes_the_catalog_interconnect():
    plan = expand_plan(parse_text('plan p { model "arch:gpt2" target { device gpu[8] gpu "h100-sxm"\n'
                                  ' switch nv { gpu[*] } } }'))
    target = resolve_target(plan.target)
    assert target.switches[0].rate_Bps == 450e9  # NVLink 4: 900 GB/s both ways together
    assert target.route("gpu0", "gpu7").rate_Bps == 450e9
    pcie = expand_plan(parse_text('plan p { model "arch:gpt2" target { device gpu[2] gpu "rtx-4090"\n'
                                  ' switch s { gpu[*] } } }'))
    assert resolve_target(pcie.target).switches[0].rate_Bps == 31.5e9


def test_tensor_parallel_over_a_chain_is_priced_not_impossible():
    from lwdsl.cost import terms
    from lwdsl.inventory import load_inventory

    text = ('plan p { model "arch:llama-3.1-70b" target { device gpu[4] gpu "h100-sxm"\n'
            ' link gpu0 <-> gpu1 450 GB/s link gpu1 <-> gpu2 450 GB/s link gpu2 <-> gpu3 450 GB/s } }')
    plan = expand_plan(parse_text(text))
    target = resolve_target(plan.target)
    inventory = load_inventory(plan.model, ".")
    collective = terms.collective_terms(inventory.arch, ["gpu0", "gpu1", "gpu2", "gpu3"], target, plan.workload)
    assert math.isfinite(collective.token_s) and collective.token_s > 0


def test_the_405b_plan_over_a_chain_of_links_solves(tmp_path):
    """The issue's case: 8 x H100 described as a chain g0-g1-...-g7 (how many users write it) made
    sharding impossible and the plan INFEASIBLE; routed, it shards over the chain."""
    from pathlib import Path

    from lwdsl.plans import load_plan
    from lwdsl.solve.search import solve_plan

    text = (Path(__file__).resolve().parent.parent / "plans" / "llama405b_8xh100.lwp").read_text()
    chain = "\n".join(f"    link gpu{i} <-> gpu{i + 1} 450 GB/s latency 2 us" for i in range(7))
    text = text.replace("    switch nvlink { gpu[*] } 450 GB/s latency 2 us", chain)
    assert "switch" not in text.split("workload")[0]
    path = tmp_path / "chain.lwp"
    path.write_text(text)
    solution = solve_plan(load_plan(path)).solution
    assert solution.status == "OPTIMAL" and solution.tensor_parallel > 1
