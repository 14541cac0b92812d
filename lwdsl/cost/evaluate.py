"""The whole model's predicted figures as sums of the per-layer and per-block terms. Pure; no torch.

    predicted = evaluate(inventory, target, workload, layers, kv_format)

`breakdown` returns the same figures with their components (for `lwdsl estimate`); `evaluate` is
its `predicted` part. Every summand comes from `lwdsl.cost.terms`, which the solver uses as its
linear coefficients, so the two agree exactly.
"""
from __future__ import annotations

import math
from collections import defaultdict

from pydantic import BaseModel, ConfigDict, Field

from lwdsl.ast import InferenceWorkload, TrainingWorkload
from lwdsl.cost import formats, gpu, memory, quality, terms, training
from lwdsl.errors import fail
from lwdsl.hardware.records import ResolvedTarget
from lwdsl.inventory.records import Inventory, Weight
from lwdsl.solution import (DeviceMemory, LatencyPrediction, LayerChoice, MemoryPrediction, Predicted,
                            QualityPrediction, QualityProfile, QuantFormat, TrainingPrediction)


class PhaseTimes(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_s: float = 0.0
    token_s: float = 0.0


class Breakdown(BaseModel):
    """`Predicted` plus where the bytes and seconds come from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    predicted: Predicted
    time_by_component: dict[str, PhaseTimes] = Field(default_factory=dict)  # linear, elementwise, attention, ...
    other_bytes_by_device: dict[str, int] = Field(default_factory=dict)  # norms and biases (fp32)
    notes: list[str] = Field(default_factory=list)
    layers: list[LayerChoice] = Field(default_factory=list)  # the choices evaluated, defaults filled in
    training_activations_bytes: int | None = None


def default_choices(inventory: Inventory, target: ResolvedTarget) -> list[LayerChoice]:
    """The model as it is: every linear and embedding weight as loaded, on the first compute device."""
    if not target.compute_devices():
        raise fail("E411", "the target has no device that computes (only disks)")
    device = target.compute_devices()[0]
    return [LayerChoice(name=w.module, block=w.block, device=device, compute_device=device)
            for w in _choosable(inventory)]


def _choosable(inventory: Inventory) -> list[Weight]:
    return [w for w in inventory.weights if not w.is_bias and (w.is_linear or w.role == "embedding")]


def _shared(weight: Weight, choices: dict[str, LayerChoice], inventory: Inventory) -> bool:
    if weight.tied_to is None:
        return False
    partner_weight = inventory.weight(weight.tied_to)
    partner = choices.get(partner_weight.module)
    mine = choices[weight.module]
    if partner is None:
        return False
    # compare what each really gets: a format that cannot apply leaves the weight as loaded
    return (terms.effective_format(partner_weight, partner)[0], partner.prune, partner.device) == (
        terms.effective_format(weight, mine)[0], mine.prune, mine.device)


def _profile_quality(profile: QualityProfile | None, choice: LayerChoice) -> tuple[float, float] | None:
    if profile is None:
        return None
    for entry in profile.entries:
        if entry.layer == choice.name and entry.format == choice.format and entry.prune == choice.prune:
            if not (math.isfinite(entry.perplexity_increase) and math.isfinite(entry.kld)):
                return None  # a broken measurement (a profile stored before non-finite ones were re-measured)
            return entry.perplexity_increase, entry.kld
    return None


def decode_fused(inventory: Inventory, target: ResolvedTarget, workload: InferenceWorkload,
                 choices: list[LayerChoice], kv_format: QuantFormat, tensor_parallel: int = 1) -> bool:
    """Whether the executor runs these choices' decode steps fused (`lwdsl.runtime.fused`): one
    computing device that has the step, every weight held where it computes, every linear in a
    format the step computes."""
    devices = {c.compute_device for c in choices} | {c.device for c in choices}
    if len(devices) != 1:
        return False
    if not terms.fuses(inventory.arch, target.device(devices.pop()), workload, kv_format, tensor_parallel):
        return False
    by_name = {c.name: c for c in choices}
    for weight in _choosable(inventory):
        choice = by_name.get(weight.module)
        if choice is None or not weight.is_linear:
            continue
        fmt, _ = terms.effective_format(weight, choice)
        shape = formats.pruned_shape(weight.shape, weight.role, choice.prune, inventory.arch.head_dim)
        if terms.fused_family(fmt, shape[1], choice.prune) is None:
            return False
    return True


def decode_working_set(inventory: Inventory, choices: dict[str, LayerChoice], workload: InferenceWorkload,
                       kv_format: QuantFormat | None = None, tensor_parallel: int = 1) -> dict[str, float]:
    """Bytes one decode step reads on each computing device: the linears it multiplies there (a
    shard's share) and the KV cache at the mean decode position (on block 0's device)."""
    arch = inventory.arch
    p = max(1, tensor_parallel)
    reads: dict[str, float] = defaultdict(float)
    first = None
    for weight in _choosable(inventory):
        choice = choices.get(weight.module)
        if choice is None or not weight.is_linear:
            continue
        fmt, _ = terms.effective_format(weight, choice)
        reads[choice.compute_device] += formats.weight_bytes(weight.shape, fmt, choice.prune, weight.role,
                                                             arch.head_dim) / p
        if first is None and weight.block is not None:
            first = choice.compute_device
    if first is not None:
        reads[first] += (workload.batch * terms.mean_decode_position(workload) * arch.layers
                         * memory.kv_bytes_per_token_layer(arch, kv_format or QuantFormat()) / p)
    return dict(reads)


def with_working_set(target: ResolvedTarget, reads: dict[str, float]) -> ResolvedTarget:
    """`target` with each device's decode working set (`DeviceSpec.working_set_bytes`) set to `reads`
    (others 0); the same target where no device has in-cache rates for it to matter."""
    if not any(spec.fused_stream_cached for spec in target.devices.values()):
        return target
    devices = {name: spec.model_copy(update={"working_set_bytes": float(reads.get(name, 0.0))})
               for name, spec in target.devices.items()}
    return target.model_copy(update={"devices": devices})


def breakdown(inventory: Inventory, target: ResolvedTarget, workload: InferenceWorkload,
              layers: list[LayerChoice] | None = None, kv_format: QuantFormat | None = None,
              tensor_parallel: int = 1, activation: str = "fp32",
              quality_profile: QualityProfile | None = None) -> Breakdown:
    """Whole-model inference figures with their components (see the module docstring)."""
    arch = inventory.arch
    kv_format = kv_format or QuantFormat()
    compute = target.compute_devices()
    choices = {c.name: c for c in default_choices(inventory, target)}
    choices.update({c.name: c for c in (layers or [])})
    p = max(1, tensor_parallel)
    # what the caches keep from one decode step to the next depends on these choices' bytes
    target = with_working_set(target, decode_working_set(inventory, choices, workload, kv_format, p))
    group = compute[:p] if p > 1 else []
    weights_on: dict[str, float] = defaultdict(float)
    kv_on: dict[str, int] = defaultdict(int)
    other_on: dict[str, int] = defaultdict(int)
    times: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    notes: list[str] = []
    log_ppl = kld = 0.0  # perplexity ratios multiply: each layer's NLL change adds
    measured_all = quality_profile is not None
    total_linear = quality.prior_numel(inventory.weights)
    fused = decode_fused(inventory, target, workload, list(choices.values()), kv_format, p)

    def place(device: str, nbytes: float, table: dict) -> None:
        for member in (group if p > 1 and device in group else [device]):
            table[member] += nbytes

    def add_time(component: str, t: terms.Terms) -> None:
        times[component][0] += t.prefill_s
        times[component][1] += t.token_s

    block_device: dict[int, str] = {}
    in_flight: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))  # streamed bytes by block
    block_numel = terms.block_linear_numel(inventory)
    for weight in _choosable(inventory):
        choice = choices[weight.module]
        fraction = terms.stream_share(weight, block_numel) if choice.device != choice.compute_device else 0.0
        # a streamed layer's read also overlaps its share of its block's attention and overhead
        own = terms.block_own_terms(arch, choice.compute_device, target, workload, kv_format, p, activation,
                                    fused, fraction, weight.block) if fraction else None
        t = terms.layer_terms(weight, choice, inventory, target, workload, p, activation, total_linear,
                              shared=_shared(weight, choices, inventory), fused=fused, own_share=own)
        place(choice.device, t.weight_bytes, weights_on)
        if choice.device != choice.compute_device and weight.block is not None:
            in_flight[choice.compute_device][weight.block] += t.weight_bytes
        linear_only = terms.layer_terms(weight, choice.model_copy(update={"device": choice.compute_device}),
                                        inventory, target, workload, p, activation, total_linear, fused=fused)
        # the prefill's elementwise ops that consume this layer's output, shown apart from its matmul
        elementwise = terms.elementwise_prefill_s(
            weight.role, formats.pruned_shape(weight.shape, weight.role, choice.prune, arch.head_dim), arch,
            target.device(choice.compute_device), workload, p,
            gpu.activation_of(target.device(choice.compute_device), activation)) if weight.is_linear else 0.0
        add_time("linear", linear_only.model_copy(update={"prefill_s": linear_only.prefill_s - elementwise}))
        add_time("elementwise", terms.Terms(prefill_s=elementwise))
        add_time("transfer", terms.Terms(prefill_s=t.prefill_s - linear_only.prefill_s,
                                         token_s=t.token_s - linear_only.token_s))
        measured = _profile_quality(quality_profile, choice) if weight.is_linear else None
        if weight.is_linear and measured is None and (choice.format != QuantFormat() or choice.prune.kind != "none"):
            measured_all = False
        layer_ppl, layer_kld = measured or (t.ppl_increase, t.kld)
        log_ppl, kld = log_ppl + math.log1p(layer_ppl), kld + layer_kld
        if t.note:
            notes.append(t.note)
        if weight.block is not None:
            block_device.setdefault(weight.block, choice.compute_device)
    for device, blocks in in_flight.items():  # the streamer's blocks in memory at once
        weights_on[device] += terms.STREAM_UNITS_IN_FLIGHT * max(blocks.values())
    first = compute[0]
    for weight in inventory.weights:  # norms and biases stay fp32 next to what uses them
        if weight.is_bias or not (weight.is_linear or weight.role == "embedding"):
            owner = choices.get(weight.module)
            device = owner.compute_device if owner else block_device.get(weight.block, first)
            other_on[device] += weight.numel * memory.ACTIVATION_BYTES[activation]
    for block in range(arch.layers):
        device = block_device.get(block, first)
        attention = terms.attention_terms(arch, device, target, workload, kv_format, p, activation, fused, block)
        place(device, attention.weight_bytes, kv_on)
        add_time("attention", attention)
        add_time("overhead", terms.overhead_terms(arch, device, target, fused=fused))
        if p > 1:
            add_time("collective", terms.collective_terms(arch, group, target, workload, activation))
    stages = [choices[w.module].compute_device for w in _choosable(inventory) if w.role == "embedding"][:1]
    stages += [block_device.get(b, first) for b in range(arch.layers)]
    stages += [choices[w.module].compute_device for w in _choosable(inventory) if w.role == "head"]
    add_time("overhead", terms.overhead_terms(arch, stages[0] if stages else first, target, per_block=False,
                                              fused=fused))
    for source, destination in zip(stages, stages[1:]):
        add_time("pipeline", terms.hop_terms(arch, source, destination, target, workload, activation))
    activations = memory.activation_bytes_per_shard(arch, workload.batch, workload.context, workload.generate,
                                                    activation, len(group) or 1)
    computing = sorted({c.compute_device for c in choices.values()} | set(group), key=compute.index)
    by_device = {}
    for name, spec in target.devices.items():
        w, kv, other = int(round(weights_on.get(name, 0))), kv_on.get(name, 0), other_on.get(name, 0)
        act, runtime = device_workspace(inventory, spec, workload, p, activations) if name in computing else (0, 0)
        if w or kv or other or act:
            by_device[name] = DeviceMemory(weights_bytes=w + other, kv_cache_bytes=kv, activations_bytes=act,
                                           runtime_bytes=runtime, total_bytes=w + other + kv + act + runtime)
    prefill = sum(v[0] for v in times.values())
    token = sum(v[1] for v in times.values())
    used = set(by_device) | set(computing)
    if not measured_all and log_ppl > 0:
        notes.append(quality.prior_note(math.expm1(log_ppl)))
    predicted = Predicted(
        memory=MemoryPrediction(by_device=by_device, total_bytes=sum(
            m.total_bytes for n, m in by_device.items() if target.device(n).computes)),
        latency=LatencyPrediction(prefill_s=prefill, token_s=token, request_s=prefill + workload.generate * token),
        throughput_tok_s=workload.batch / token if token > 0 else None,
        quality=QualityPrediction(perplexity_increase=math.expm1(log_ppl), kld=kld,
                                  source="profile" if measured_all else "prior"),
        cost_per_h=sum(target.device(n).price_per_h for n in used),
    )
    return Breakdown(predicted=predicted, notes=notes, layers=list(choices.values()),
                     time_by_component={k: PhaseTimes(prefill_s=v[0], token_s=v[1]) for k, v in times.items()},
                     other_bytes_by_device=dict(other_on))


def device_workspace(inventory: Inventory, spec, workload: InferenceWorkload, tensor_parallel: int,
                     activations: int) -> tuple[int, int]:
    """(activation bytes, runtime bytes) a computing device holds: the GPU executor's (`cost.gpu`: one
    prefill chunk's block tensors per rank, the CUDA context), else `activations` and the probed runtime."""
    if gpu.graphed(spec):
        return (gpu.activation_bytes(inventory.arch, workload.batch, workload.context, workload.generate,
                                     tensor_parallel),
                gpu.context_bytes(spec))
    return activations, spec.runtime_bytes


def training_breakdown(inventory: Inventory, target: ResolvedTarget, workload: TrainingWorkload,
                       zero_stage: int = 0, data_parallel: int | None = None, checkpoint: bool = False,
                       accumulate: int = 1, offload_optimizer: str | None = None,
                       mfu: float = training.DEFAULT_MFU) -> Breakdown:
    """Training figures: per-rank model states and activations, C = 6·P·D, T = C / (N · achieved)."""
    compute = target.compute_devices()
    ranks = compute[: max(1, data_parallel or 1)]
    params = inventory.params()
    states = training.model_states(params, zero_stage, len(ranks), workload.precision, workload.optimizer,
                                   offload_optimizer is not None)
    micro_batch = max(1, -(-workload.batch // (len(ranks) * max(1, accumulate))))
    activations = training.activation_bytes(inventory.arch, micro_batch, workload.sequence, checkpoint,
                                            workload.precision)
    by_device = {name: DeviceMemory(weights_bytes=states.total_bytes, activations_bytes=activations,
                                    total_bytes=states.total_bytes + activations) for name in ranks}
    if offload_optimizer is not None:
        held = states.offloaded_bytes * len(ranks)
        by_device[offload_optimizer] = DeviceMemory(weights_bytes=held, total_bytes=held)
    flops = training.training_flops(params, workload.tokens, checkpoint)
    peak = min(target.device(n).rate(workload.precision) for n in ranks)
    seconds = training.training_time_s(flops, len(ranks), peak, mfu)
    if all(target.device(n).catalog == "local" for n in ranks):  # lwdsl's own trainer, measured here
        by_device, states, activations, seconds = _trainer_figures(inventory, target, workload, ranks, zero_stage,
                                                                   checkpoint, accumulate, offload_optimizer, by_device)
    used = set(by_device)
    predicted = Predicted(
        memory=MemoryPrediction(by_device=by_device, total_bytes=sum(
            m.total_bytes for n, m in by_device.items() if target.device(n).computes)),
        cost_per_h=sum(target.device(n).price_per_h for n in used),
        training=TrainingPrediction(zero_stage=zero_stage, checkpoint_activations=checkpoint,
                                    accumulate=accumulate, data_parallel=len(ranks),
                                    optimizer_offload=offload_optimizer, model_states_bytes=states.total_bytes,
                                    flops=flops, time_s=seconds),
    )
    return Breakdown(predicted=predicted, training_activations_bytes=activations)


def _trainer_figures(inventory, target, workload, ranks, zero_stage, checkpoint, accumulate, offload_optimizer,
                     by_device):
    """Ranks on this measured machine run lwdsl's trainer (`lwdsl.train`): its per-rank peak and its
    step time on the probe's figures (`training.step_figures`), the run `tokens / (batch · sequence)`
    steps. Catalog devices keep the published estimators above."""
    step = training.step_figures(inventory, target, workload, zero_stage, len(ranks), checkpoint, accumulate,
                                 offload_optimizer)
    states = training.ModelStates(params_bytes=step.params_bytes, grads_bytes=step.grads_bytes,
                                  optimizer_bytes=step.optimizer_bytes)
    activations = step.peak_bytes - step.runtime_bytes - states.total_bytes
    rows = dict(by_device)
    for name in ranks:
        rows[name] = DeviceMemory(weights_bytes=states.total_bytes, activations_bytes=activations,
                                  runtime_bytes=step.runtime_bytes, total_bytes=step.peak_bytes)
    steps = -(-max(1, workload.tokens) // max(1, workload.batch * workload.sequence))
    return rows, states, activations, steps * step.step_s


def evaluate(inventory: Inventory, target: ResolvedTarget, workload, layers: list[LayerChoice] | None = None,
             kv_format: QuantFormat | None = None, tensor_parallel: int = 1, **options) -> Predicted:
    """The predicted whole-model figures of a set of layer choices (missing layers: as loaded).

    Inference: memory by device (weights incl. norms/biases, KV cache, activations), latency
    (prefill, token, request), throughput = batch / token time, quality prior (or profile), price.
    Training (`TrainingWorkload`): `options` are those of `training_breakdown`.
    """
    if isinstance(workload, TrainingWorkload):
        return training_breakdown(inventory, target, workload, **options).predicted
    return breakdown(inventory, target, workload, layers, kv_format, tensor_parallel, **options).predicted
