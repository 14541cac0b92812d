"""Routed traffic (v1): from a target's links and switches, the fastest path between two devices and
the rate a collective among N devices runs at.

The graph: every device is a node, every `link` an edge both ways; a `switch` is a node of its own
with one port edge to each member (each way at the switch's rate, half its latency on either port,
so a crossing pays the switch's latency once). Traffic may pass through a CPU or a GPU (a host's
root complex, a GPU forwarding peer traffic: what NCCL does over a chain of NVLinks) and through a
switch, never through a disk: a disk only sends and receives.

- `route_table`: between two devices the *widest* path (the largest slowest-hop rate), and among the
  widest the one with the smallest summed latency: Dijkstra on (rate, latency) labels, which is
  exact for this order because a path's bottleneck only falls and its latency only grows hop by hop
  (Wang & Crowcroft 1996, "Quality-of-service routing for supporting multimedia applications").
  No path: no entry, and the cost model prices that traffic as impossible, never free.
- `ring_link`: a ring all-reduce among the group (Patarasuk & Yuan 2009; NCCL's ring) sends, at each
  of its 2(p-1) steps, one chunk from every member to the next one at once. The ring's members are
  placed in the order that makes its slowest step fastest; each ring edge travels its route, and a
  directed link or switch port that k ring edges cross gives each of them 1/k of its rate. The step
  rate is the slowest edge's share and the step latency the slowest edge's route latency. A chain
  g0-g1-...-g7 is a valid ring: g0 g1 ... g7 back to g0 (the closing edge travels the chain back, on
  the other direction of each link) runs at the link rate with seven hops of latency a step, and the
  interleaved g0 g2 g4 g6 g7 g5 g3 g1 at the link rate too with two hops (every directed link still
  carries one flow): that one is chosen. Why a ring: it is what NCCL runs between GPUs without a
  switch, its bandwidth term is optimal (Patarasuk & Yuan), and its cost on a topology is set by its
  slowest step. Up to 8 members every ring order is tried (2,520 rings for 8); beyond that the
  declaration order and a nearest-neighbour order, the better of the two.
"""
from __future__ import annotations

import heapq
import itertools
import math
from functools import lru_cache
from typing import Iterable

from lwdsl.hardware.records import DeviceSpec, LinkSpec, ResolvedTarget, SwitchSpec

EXHAUSTIVE_RING = 8  # members up to which every ring order is tried

Edge = tuple[str, str]  # a directed hop between two graph nodes (devices and switches)


def _graph(links: Iterable[LinkSpec], switches: Iterable[SwitchSpec]) -> dict[str, dict[str, tuple[float, float]]]:
    """node -> neighbour -> (rate B/s, latency s); the fastest of parallel edges is kept."""
    graph: dict[str, dict[str, tuple[float, float]]] = {}

    def add(a: str, b: str, rate: float, latency: float) -> None:
        for x, y in ((a, b), (b, a)):
            old = graph.setdefault(x, {}).get(y)
            if old is None or (rate, -latency) > (old[0], -old[1]):
                graph[x][y] = (rate, latency)

    for link in links:
        add(link.a, link.b, link.rate_Bps, link.latency_s)
    for switch in switches:
        node = switch_node(switch.name)
        for member in switch.devices:
            add(member, node, switch.rate_Bps, switch.latency_s / 2)
    return graph


def switch_node(name: str) -> str:
    return f"switch:{name}"


def _widest_paths(graph, source: str, relays: set[str]) -> dict[str, tuple[float, float, tuple[str, ...]]]:
    """node -> (bottleneck rate, latency, nodes from source) of the widest-then-shortest path."""
    best: dict[str, tuple[float, float, tuple[str, ...]]] = {source: (math.inf, 0.0, (source,))}
    queue = [(-math.inf, 0.0, (source,))]
    done: set[str] = set()
    while queue:
        negative_rate, latency, path = heapq.heappop(queue)
        node = path[-1]
        if node in done:
            continue
        done.add(node)
        if node != source and node not in relays:
            continue  # a disk receives, never forwards
        for neighbour, (rate, hop_latency) in graph.get(node, {}).items():
            if neighbour in done:
                continue
            label = (min(-negative_rate, rate), latency + hop_latency)
            old = best.get(neighbour)
            if old is None or (label[0], -label[1]) > (old[0], -old[1]):
                best[neighbour] = (*label, path + (neighbour,))
                heapq.heappush(queue, (-label[0], label[1], path + (neighbour,)))
    return best


def route_table(devices: dict[str, DeviceSpec], links: Iterable[LinkSpec],
                switches: Iterable[SwitchSpec]) -> dict[tuple[str, str], LinkSpec]:
    """(a, b) -> the route between two distinct devices, as a LinkSpec: the slowest hop's rate, the hops'
    latencies summed, `hops` the nodes passed (switches as `switch:NAME`). Pairs no path joins are absent.

        >>> table = route_table(devices, [LinkSpec(a="g0", b="g1", rate_Bps=4e11), LinkSpec(a="g1", b="g2", ...)], [])
        >>> table["g0", "g2"].hops
        ('g0', 'g1', 'g2')
    """
    graph = _graph(links, switches)
    relays = {name for name, spec in devices.items() if spec.computes} | {n for n in graph if n.startswith("switch:")}
    table: dict[tuple[str, str], LinkSpec] = {}
    for source in devices:
        for dest, (rate, latency, path) in _widest_paths(graph, source, relays).items():
            if dest != source and dest in devices:
                table[source, dest] = LinkSpec(a=source, b=dest, rate_Bps=rate, latency_s=latency, hops=path)
    return table


def _ring_step(order: tuple[str, ...], routes: dict[tuple[str, str], LinkSpec],
               capacity: dict[Edge, float]) -> tuple[float, float] | None:
    """(step rate, step latency) of a ring in this order: each directed hop's rate shared among the ring
    edges that cross it, the slowest share; the slowest edge's latency. None when an edge has no route."""
    load: dict[Edge, int] = {}
    latency = 0.0
    for a, b in zip(order, order[1:] + order[:1]):
        route = routes.get((a, b))
        if route is None:
            return None
        latency = max(latency, route.latency_s)
        for hop in zip(route.hops, route.hops[1:]):
            load[hop] = load.get(hop, 0) + 1
    return min(capacity[hop] / count for hop, count in load.items()), latency


def ring_link(group: list[str], target: ResolvedTarget) -> LinkSpec | None:
    """The link a ring all-reduce among `group` runs at: rate = its slowest step's per-edge rate, latency =
    its slowest edge's route latency, over the best ring order (see the module text). None when some
    member cannot reach another (the collective is impossible).

        >>> ring_link(["gpu0", "gpu1", "gpu2"], target).rate_Bps   # three GPUs on one 450 GB/s switch
        450000000000.0
    """
    members = tuple(dict.fromkeys(group))
    routes = tuple(((a, b), target.route(a, b)) for a in members for b in members if a != b)
    if len(members) < 2 or any(route is None for _, route in routes):
        return None
    graph = _graph(target.links.values(), target.switches)
    capacity = tuple(sorted(((a, b), rate) for a, neighbours in graph.items() for b, (rate, _) in neighbours.items()))
    return _best_ring(members, routes, capacity)


@lru_cache(maxsize=256)
def _best_ring(members: tuple[str, ...], route_items: tuple, capacity_items: tuple) -> LinkSpec | None:
    """`ring_link` on hashable inputs, remembered: the solver prices each tensor group several times."""
    routes = dict(route_items)
    capacity = dict(capacity_items)
    if len(members) <= EXHAUSTIVE_RING:
        first, rest = members[0], members[1:]
        orders = ((first, *perm) for perm in itertools.permutations(rest) if len(rest) < 2 or perm[0] < perm[-1])
    else:
        orders = iter((tuple(members), _nearest_neighbour(members, routes)))
    best: tuple[float, float, tuple[str, ...]] | None = None
    for order in orders:
        step = _ring_step(order, routes, capacity)
        if step is not None and (best is None or (step[0], -step[1]) > (best[0], -best[1])):
            best = (*step, order)
    if best is None:
        return None
    return LinkSpec(a=best[2][0], b=best[2][-1], rate_Bps=best[0], latency_s=best[1], hops=best[2])


def _nearest_neighbour(members: list[str], routes) -> tuple[str, ...]:
    order = [members[0]]
    left = members[1:]
    while left:
        here = order[-1]
        following = max(left, key=lambda m: (routes[here, m].rate_Bps, -routes[here, m].latency_s, -left.index(m)))
        order.append(following)
        left.remove(following)
    return tuple(order)
