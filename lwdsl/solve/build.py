"""Plan + inventory + resolved target + cost model -> Problems (one per global scenario).

Every coefficient is a summand of `lwdsl.cost.evaluate` (`lwdsl.cost.terms`), so the model's figures
and the estimate's agree. Integer scales live here and nowhere else: KiB, microseconds, 1e-6 of a
perplexity ratio or a nat, micro-dollars per hour; times and losses round up (a line that holds in
the model holds in the estimate). Coarser units matter: with nanoseconds and 1e-9 losses CP-SAT took
6.6 s to prove the 70B bench scenario optimal, with these 0.02 s (measured here).

Decisions: per linear layer a (format, prune) option; per unit (each block, and the embedding + head
together) a place (compute device, storage device: itself or an `offload` device linked to it);
global: tensor degree and KV format (one Problem each), and with `shard pipeline` a compute device
per unit (else one for all). Channel and head prunes are per block: the layers of one MLP (or one
attention) agree on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lwdsl import ast
from lwdsl.cost import quality, terms
from lwdsl.cost.evaluate import device_workspace
from lwdsl.cost.formats import format_applies, pruned_shape
from lwdsl.cost.memory import ACTIVATION_BYTES, MEASURED_MARGIN, activation_bytes_per_shard
from lwdsl.errors import fail
from lwdsl.hardware.records import ResolvedTarget
from lwdsl.inventory.records import Inventory, Weight
from lwdsl.solution import LayerChoice, PruneChoice, QualityProfile, QuantFormat
from lwdsl.solve.aggregate import aggregate, drop_dominated
from lwdsl.solve.allowed import AS_LOADED, NO_PRUNE, Allowance, label
from lwdsl.solve.problem import Layer, Objective, Option, Place, Problem, Requirement, Unit

ACTIVATION = "fp32"
SCALES = {"bytes": 1024.0, "time": 1e-6, "quality": 1e-6, "cost": 1e-6}
DEFAULT_OBJECTIVE = (("minimize", "quality", None), ("minimize", "memory", None), ("minimize", "latency", "token"))
_CHANNEL_ROLES = {"mlp_gate", "mlp_up", "mlp_down"}
_HEAD_ROLES = {"attn_q", "attn_k", "attn_v", "attn_o"}


@dataclass(frozen=True)
class Scenario:
    """One setting of the global choices, and its Problem."""

    tensor_parallel: int
    kv_format: QuantFormat
    problem: Problem
    group: tuple[str, ...]  # the tensor-parallel group (empty when 1)


def scale_of(metric: str) -> float:
    head = metric.split(":")[0]
    return {"memory": SCALES["bytes"], "latency": SCALES["time"], "time": SCALES["time"],
            "quality": SCALES["quality"], "cost": SCALES["cost"]}.get(head, 1.0)


def to_units(metric: str, value: float) -> float:
    """A figure in base units -> the problem's integer unit (not rounded). Relative perplexity
    increases compose multiplicatively (each layer's NLL change adds; `cost.evaluate`), so the
    problem adds their logarithms, `log1p(increase)`, and bounds the sum by `log1p(bound)`."""
    if metric == "quality:perplexity":
        value = math.log1p(max(value, -1.0 + 1e-12))
    return value / scale_of(metric)


def from_units(metric: str, units: float) -> float:
    """`to_units` undone: the problem's integer unit -> base units."""
    value = units * scale_of(metric)
    return math.expm1(value) if metric == "quality:perplexity" else value


def _ns(seconds: float) -> int:
    """Seconds in the model's time unit, rounded up: a `<=` line that holds in the model holds in the
    cost model too."""
    return math.ceil(seconds / SCALES["time"] - 1e-9)


def _q(value: float) -> int:
    return math.ceil(value / SCALES["quality"] - 1e-9)


def metric_key(metric: ast.Metric) -> tuple[str, int]:
    """An ast metric -> (problem metric, sign): throughput is handled by the caller as token time."""
    if metric.name == "memory":
        return (f"memory:{metric.qualifier}" if metric.qualifier else "memory"), 1
    if metric.name == "latency":
        return f"latency:{metric.qualifier or 'token'}", 1
    if metric.name == "quality":
        return f"quality:{metric.qualifier or 'perplexity'}", 1
    if metric.name == "throughput":
        return "latency:token", -1
    return metric.name, 1


# A measured quality runs above a profile's prediction by up to ~17% on held-out windows of the same
# text (Qwen2.5-Coder int4 g32: +9.3% measured, +8.0% predicted on the docs; +15.9% / +13.5% on prose),
# so an upper quality bound is planned at this fraction less (in log-likelihood for perplexity), as a
# memory bound is planned MEASURED_MARGIN below: a solution that fills its bound still meets it.
QUALITY_MARGIN = 0.2


def planned_bound(metric: str, value: float, inverse: bool = False) -> float:
    """An upper bound as the solver plans it (`inverse`: the line's value back from a planned one)."""
    if metric.startswith("memory"):
        keep = 1.0 - MEASURED_MARGIN
    elif metric.startswith("quality"):
        keep = 1.0 - QUALITY_MARGIN
    else:
        return value
    if metric == "quality:perplexity" and value > -1.0:  # ratios compose in log-likelihood
        return math.expm1(math.log1p(value) / keep if inverse else math.log1p(value) * keep)
    return value / keep if inverse else value * keep


def requirement_of(constraint: ast.Constraint, workload, line_text: str,
                   baseline_perplexity: float | None) -> Requirement:
    """One `require` line as an integer bound (throughput becomes a bound on the token time)."""
    metric, sign = metric_key(constraint.metric)
    value, op = constraint.value.value, constraint.op
    if constraint.metric.name == "throughput":
        if value <= 0:
            return Requirement(metric, "<=", 2 ** 62, constraint.span.line, line_text, column=constraint.span.column)
        value, op = workload.batch / value, {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}[op]
    if op in ("<=", "<"):  # planned below the bound by what measurement adds (`planned_bound`)
        value = planned_bound(metric, value)
    if metric == "quality:perplexity" and not constraint.value.relative and constraint.value.kind != "percent":
        if not baseline_perplexity:
            raise fail("E501", "an absolute perplexity needs a measured baseline; write it relative (`<= +5%`)",
                       constraint.span, hint="or run `lwdsl profile` first")
        value = value / baseline_perplexity - 1.0
    units = to_units(metric, value)
    if op == "<=":
        bound = math.floor(units + 1e-9)
    elif op == "<":
        bound = math.ceil(units - 1e-9) - 1
    elif op == ">=":
        bound = math.ceil(units - 1e-9)
    else:
        bound = math.floor(units + 1e-9) + 1
    return Requirement(metric, "<=" if op in ("<=", "<") else ">=", bound, constraint.span.line, line_text,
                       column=constraint.span.column)


def objectives_of(plan: ast.Plan) -> tuple[Objective, ...]:
    terms_ = ([(t.direction, t.metric) for t in plan.objective.terms] if plan.objective else
              [(d, ast.Metric(name=n, qualifier=q)) for d, n, q in DEFAULT_OBJECTIVE])
    objectives = []
    for direction, metric in terms_:
        key, sign = metric_key(metric)
        if metric.name == "quality":
            sense = "min"  # quality objectives always mean less loss
        else:
            sense = "min" if (direction == "minimize") == (sign > 0) else "max"
        objectives.append(Objective(key, sense))
    return tuple(objectives)


def _line(source: str, line: int) -> str:
    lines = source.splitlines()
    return lines[line - 1].strip() if 1 <= line <= len(lines) else ""


def plan_requirements(plan: ast.Plan, target: ResolvedTarget, source: str,
                      baseline_perplexity: float | None) -> tuple[Requirement, ...]:
    """Every `require` line, and every device's capacity (guarded too: it is a line of the plan)."""
    found = [requirement_of(c, plan.workload, _line(source, c.span.line), baseline_perplexity) for c in plan.require]
    for device in plan.target.devices:
        spec = target.device(device.name)
        found.append(Requirement(f"memory:{device.name}", "<=", int(spec.memory_bytes // SCALES["bytes"]),
                                 (device.memory or device).span.line,
                                 _line(source, (device.memory or device).span.line) or f"device {device.name}",
                                 kind="capacity"))
    return tuple(found)


class _Costs:
    """Memoised `terms.layer_terms`: layers of equal shape and role share their coefficients."""

    def __init__(self, inventory: Inventory, target: ResolvedTarget, workload, tp: int,
                 profile: QualityProfile | None, fused: bool = False, kv_format: QuantFormat | None = None,
                 shared: dict | None = None):
        self.inventory, self.target, self.workload, self.tp = inventory, target, workload, tp
        self.fused, self.kv_format = fused, kv_format or QuantFormat()
        self.block_numel = terms.block_linear_numel(inventory)
        self.total_linear = quality.prior_numel(inventory.weights)
        # `shared`: one dict for every scenario of a plan (a layer's terms do not depend on the KV format
        # unless it streams, which the key then says), keyed by what the terms read
        self.cache: dict = {} if shared is None else shared.setdefault((tp, fused), {})
        self.profile = {(e.layer, e.format, e.prune): (e.perplexity_increase, e.kld)
                        for e in (profile.entries if profile else [])
                        if math.isfinite(e.perplexity_increase) and math.isfinite(e.kld)}  # as evaluate reads it

    def layer(self, weight: Weight, fmt: QuantFormat, prune: PruneChoice, storage: str, compute: str,
              group: tuple[str, ...]) -> tuple[dict[str, int], bool]:
        shared = weight.tied_to is not None and fmt == AS_LOADED and prune == NO_PRUNE
        share = terms.stream_share(weight, self.block_numel) if storage != compute else 0.0
        window = weight.block in self.inventory.arch.sliding_layers  # a sliding-window block's own work differs
        key = (weight.shape, weight.role, weight.is_linear, shared, fmt, prune, storage, compute, share,
               self.kv_format if share else None, window)
        if key not in self.cache:
            choice = LayerChoice(name=weight.module, block=weight.block, format=fmt, prune=prune,
                                 device=storage, compute_device=compute)
            own = terms.block_own_terms(self.inventory.arch, compute, self.target, self.workload, self.kv_format,
                                        self.tp, ACTIVATION, self.fused, share, weight.block) if share else None
            t = terms.layer_terms(weight, choice, self.inventory, self.target, self.workload, self.tp,
                                  ACTIVATION, self.total_linear, shared=shared, fused=self.fused, own_share=own)
            if math.isinf(t.token_s) or math.isinf(t.prefill_s):
                self.cache[key] = None
            else:
                coefs = {"latency:prefill": _ns(t.prefill_s), "latency:token": _ns(t.token_s)}
                holders = group if (self.tp > 1 and storage in group) else (storage,)
                for device in holders:
                    coefs[f"memory:{device}"] = t.weight_bytes
                self.cache[key] = (coefs, t.ppl_increase, t.kld)
        cached = self.cache[key]
        if cached is None:
            return None, False
        coefs, ppl, kld = cached
        measured = self.profile.get((weight.module, fmt, prune)) if weight.is_linear else None
        if fmt == AS_LOADED and prune == NO_PRUNE:
            measured = (0.0, 0.0)
        ppl, kld = measured or (ppl, kld)
        return {**coefs, "quality:perplexity": _q(math.log1p(ppl)), "quality:kld": _q(kld)}, measured is not None


def _options(weight: Weight, allowance: Allowance, arch_head_dim: int) -> tuple[list, str | None]:
    allowed = allowance.for_module(weight.module)
    if allowed.kept or not weight.is_linear:
        return [(AS_LOADED, NO_PRUNE)], ("kept as it is" if allowed.kept else None)
    options, refused = [], {}
    for prune in allowed.prunes:
        if prune.kind == "channels" and weight.role not in _CHANNEL_ROLES:
            continue
        if prune.kind == "heads" and weight.role not in _HEAD_ROLES:
            continue
        shape = pruned_shape(weight.shape, weight.role, prune, arch_head_dim)
        for fmt in allowed.formats:
            reason = format_applies(shape, fmt)
            if reason is None:
                options.append((fmt, prune))
            else:
                refused.setdefault(fmt.label(), reason)
    note = "; ".join(f"{name} is not an option: {why}" for name, why in refused.items()) or None
    return options, note


def _places(compute: list[str], allowance: Allowance, target: ResolvedTarget, tp_group: tuple[str, ...]):
    """(compute, storage) pairs a unit may take: on its compute device, or offloaded over a link."""
    computes = [tp_group[0]] if tp_group else compute
    places = []
    for device in computes:
        places.append((device, device))
        for store in allowance.offload:
            if store != device and target.route(store, device) is not None:
                places.append((device, store))
    return places


def _fused(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget, allowance: Allowance, tp: int,
           kv_format: QuantFormat, choosable: list[Weight]) -> bool:
    """Whether every solution of this scenario decodes fused (`terms.fuses`): one computing device that
    has the step, nothing offloaded, and every option of every layer a format the step computes. A
    scenario where some could not is priced eagerly throughout (the executor fuses all or nothing)."""
    compute = target.compute_devices()
    if len(compute) != 1 or allowance.offload or \
            not terms.fuses(inventory.arch, target.device(compute[0]), plan.workload, kv_format, tp):
        return False
    for weight in choosable:
        if not weight.is_linear:
            continue
        for fmt, prune in _options(weight, allowance, inventory.arch.head_dim)[0]:
            shape = pruned_shape(weight.shape, weight.role, prune, inventory.arch.head_dim)
            if terms.fused_family(fmt, shape[1], prune) is None:
                return False
    return True


def build_scenario(plan: ast.Plan, inventory: Inventory, target: ResolvedTarget, allowance: Allowance,
                   requirements: tuple[Requirement, ...], objectives: tuple[Objective, ...], tp: int,
                   kv_format: QuantFormat, profile: QualityProfile | None,
                   shared_costs: dict | None = None) -> tuple[Problem, dict]:
    """The Problem of one tensor degree and KV format; also the facts read-back needs."""
    arch, workload = inventory.arch, plan.workload
    compute = target.compute_devices()
    group = tuple(compute[:tp]) if tp > 1 else ()
    choosable = [w for w in inventory.weights if not w.is_bias and (w.is_linear or w.role == "embedding")]
    fused = _fused(plan, inventory, target, allowance, tp, kv_format, choosable)
    costs = _Costs(inventory, target, workload, tp, profile, fused, kv_format, shared_costs)
    spots = _places(compute, allowance, target, group)
    others = [w for w in inventory.weights if w.is_bias or not (w.is_linear or w.role == "embedding")]
    act_bytes = ACTIVATION_BYTES[ACTIVATION]

    def members(device: str) -> tuple[str, ...]:
        return group if (tp > 1 and device in group) else (device,)

    def uses(device: str, store: str) -> tuple[str, ...]:
        tokens = [f"compute:{m}" for m in members(device)] + [f"any:{m}" for m in members(device)]
        return tuple(tokens + [f"any:{store}"])

    def add(coefs: dict, metric: str, value: int) -> None:
        if value:
            coefs[metric] = coefs.get(metric, 0) + value

    # units: 0 = embedding + head (+ what sits outside the blocks), 1..L = blocks
    io_places, block_places = [], {b: [] for b in range(arch.layers)}
    for device, store in spots:
        attention = terms.attention_terms(arch, device, target, workload, kv_format, tp, ACTIVATION, fused)
        seconds = (attention.prefill_s, attention.token_s)
        if not all(math.isfinite(x) for x in seconds):
            continue  # this device cannot run a block at all (no rate or bandwidth)
        coefs: dict[str, int] = {}
        overhead = terms.overhead_terms(arch, device, target, per_block=False, fused=fused)
        add(coefs, "latency:prefill", _ns(overhead.prefill_s))
        add(coefs, "latency:token", _ns(overhead.token_s))
        for weight in others:  # the head's bias sits with the head; the final norm: see `forced`
            if weight.block is None and weight.is_bias:
                add(coefs, f"memory:{device}", weight.numel * act_bytes)
        if store == device:  # the executor streams blocks, not the embedding/head (apply: E631)
            io_places.append(Place(device, device, store, coefs, uses(device, store)))
        overhead = terms.overhead_terms(arch, device, target, fused=fused)
        for b in range(arch.layers):
            coefs = {}
            if b in arch.sliding_layers:  # a sliding-window block: its cache and attention are bounded
                attention = terms.attention_terms(arch, device, target, workload, kv_format, tp, ACTIVATION, fused, b)
            elif arch.sliding_layers:
                attention = terms.attention_terms(arch, device, target, workload, kv_format, tp, ACTIVATION, fused)
            for m in members(device):
                add(coefs, f"memory:{m}", attention.weight_bytes)
            add(coefs, "latency:prefill", _ns(attention.prefill_s + overhead.prefill_s))
            add(coefs, "latency:token", _ns(attention.token_s + overhead.token_s))
            block_places[b].append(Place(f"{device}<-{store}" if store != device else device, device, store,
                                         coefs, uses(device, store)))
    for weight in others:
        if weight.block is not None:
            for spot in block_places[weight.block]:
                spot.coefs[f"memory:{spot.compute}"] = spot.coefs.get(f"memory:{spot.compute}", 0) + weight.numel * act_bytes
    units = [Unit("embedding + head", tuple(io_places))] + [Unit(f"block {b}", tuple(block_places[b]))
                                                           for b in range(arch.layers)]

    layers, same_tag, unit_of, measured_all = [], {}, {}, True
    memo: dict[tuple, tuple] = {}  # equal layers of different blocks share one options table
    for weight in choosable:
        u = 0 if weight.block is None else weight.block + 1
        unit_of[weight.module] = u
        key = (weight.shape, weight.role, weight.is_linear, weight.tied_to is not None, weight.block is None,
               allowance.for_module(weight.module), weight.module if profile else None)
        if key in memo:
            options, note = memo[key]
            if weight.block is not None and (weight.role in _CHANNEL_ROLES or weight.role in _HEAD_ROLES):
                family = "mlp" if weight.role in _CHANNEL_ROLES else "attn"
                same_tag.setdefault((weight.block, family), []).append(len(layers))
            layers.append(Layer(weight.module, u, options, note))
            continue
        options = []
        choices, note = _options(weight, allowance, arch.head_dim)
        for fmt, prune in choices:
            by_place = []
            for spot in units[u].places:
                coefs, measured = costs.layer(weight, fmt, prune, spot.storage, spot.compute, group)
                measured_all &= measured or (fmt == AS_LOADED and prune == NO_PRUNE) or not weight.is_linear
                by_place.append(coefs)
            tag = f"{prune.kind} {prune.fraction}" if prune.kind in ("channels", "heads") else ""
            options.append(Option(label(fmt, prune), tuple(by_place), (fmt, prune), tag))
        if weight.block is not None and (weight.role in _CHANNEL_ROLES or weight.role in _HEAD_ROLES):
            family = "mlp" if weight.role in _CHANNEL_ROLES else "attn"
            same_tag.setdefault((weight.block, family), []).append(len(layers))
        memo[key] = (tuple(options), note)
        layers.append(Layer(weight.module, u, tuple(options), note))

    # a pipeline: blocks fill the compute devices in declaration order (contiguous stages), so each
    # device used pays about one hop of the hidden state in (an upper bound: the slowest of its
    # links); devices with no link between them cannot both compute
    hop_charge: dict[str, dict[str, int]] = {}
    exclusive = []
    if allowance.pipeline and not group:
        for source in compute:
            slowest = None
            for dest in compute:
                if dest == source:
                    continue
                if target.route(source, dest) is None:
                    if source < dest:
                        exclusive.append((f"compute:{source}", f"compute:{dest}"))
                    continue
                t = terms.hop_terms(arch, source, dest, target, workload, ACTIVATION)
                slowest = t if slowest is None or t.token_s > slowest.token_s else slowest
            if slowest is not None:
                hop_charge[source] = {"latency:prefill": _ns(slowest.prefill_s), "latency:token": _ns(slowest.token_s)}

    constants: dict[str, int] = {}
    if group:
        collective = terms.collective_terms(arch, list(group), target, workload, ACTIVATION)
        constants["latency:prefill"] = _ns(collective.prefill_s) * arch.layers
        constants["latency:token"] = _ns(collective.token_s) * arch.layers
    first = compute[0]
    forced = set()
    final_norms = [w for w in others if w.block is None and not w.is_bias]
    if final_norms:  # the cost model keeps norms outside the blocks on the first compute device
        constants[f"memory:{first}"] = sum(w.numel for w in final_norms) * act_bytes
        forced |= {f"any:{first}"}
    activations = activation_bytes_per_shard(arch, workload.batch, workload.context, workload.generate, ACTIVATION,
                                             len(group) or 1)
    charges = {}
    for name, spec in target.devices.items():
        charges[f"compute:{name}"] = {f"memory:{name}": sum(device_workspace(inventory, spec, workload, tp, activations)),
                                      **hop_charge.get(name, {})}
        charges[f"any:{name}"] = {"cost": int(round(spec.price_per_h / SCALES["cost"]))}
    computing = [n for n in target.devices if target.device(n).computes]
    derived = {"memory": {f"memory:{n}": 1 for n in computing},
               "latency:request": {"latency:prefill": 1, "latency:token": max(workload.generate, 0)}}
    problem = drop_dominated(aggregate(coarsen_memory(Problem(
        units=tuple(units), layers=tuple(layers), requirements=requirements, objectives=objectives,
        constants=constants, charges=charges, forced_used=frozenset(forced), derived=derived, exclusive=tuple(exclusive),
        single_compute=not allowance.pipeline or bool(group),
        same_tag=tuple(tuple(v) for v in same_tag.values() if len(v) > 1),
        scales={m: scale_of(m) for m in ("memory", "latency:token", "quality:perplexity", "cost")},
        in_flight=terms.STREAM_UNITS_IN_FLIGHT if allowance.offload else 0))))
    return problem, {"measured_all": measured_all and profile is not None}


def coarsen_memory(problem: Problem) -> Problem:
    """Byte counts -> the model's memory unit (KiB), rounded up term by term (never optimistic)."""
    unit = SCALES["bytes"]

    def scaled(coefs):
        if coefs is None:
            return None
        return {m: (math.ceil(v / unit) if m.startswith("memory") else v) for m, v in coefs.items()}

    units = tuple(replace(u, places=tuple(replace(p, coefs=scaled(p.coefs)) for p in u.places)) for u in problem.units)
    done: dict[int, tuple] = {}  # shared options tables stay shared (aggregation relies on it)
    for layer in problem.layers:
        if id(layer.options) not in done:
            done[id(layer.options)] = (layer.options, tuple(
                replace(o, by_place=tuple(scaled(c) for c in o.by_place)) for o in layer.options))
    layers = tuple(replace(l, options=done[id(l.options)][1]) for l in problem.layers)
    return replace(problem, units=units, layers=layers, constants=scaled(problem.constants),
                   charges={d: scaled(c) for d, c in problem.charges.items()})


def tensor_degrees(allowance: Allowance, inventory: Inventory, target: ResolvedTarget) -> list[int]:
    compute = target.compute_devices()
    arch = inventory.arch
    top = min(allowance.tensor_up_to, len(compute))
    return [n for n in range(1, top + 1)
            if arch.heads % n == 0 and arch.kv_heads % n == 0 and arch.intermediate % n == 0
            and all(target.route(a, b) for a in compute[:n] for b in compute[:n] if a != b)]
